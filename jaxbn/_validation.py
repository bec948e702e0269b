"""Trace-time argument checks, one entry per public function (``check_batch_norm`` and others),
on static information only: each error names the argument, its value and what it should be."""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_PARAM_KEYS = ("scale", "bias")
_STATE_KEYS = ("mean", "var")


class DegenerateBatchWarning(UserWarning):
    """A batch (or instance) with one value per feature: there is no variance to estimate.

    The output is then the bias, as in flax; batch norm updates its running
    mean and keeps its running variance. Silence it with ``warnings.filterwarnings("ignore",
    category=jaxbn.DegenerateBatchWarning)``.
    """


def static_float(value: Any, name: str, expected: str) -> float | None:
    """``float(value)``, or None for a traced value (which must still be a real scalar)."""
    if isinstance(value, jax.core.Tracer):
        dtype = value.dtype
        if np.ndim(value) != 0 or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(
                f"{name} must be {expected}, got a traced array of shape {np.shape(value)} and dtype {dtype}: "
                "a traced value may be any real scalar (its range is not checked), not an array."
            )
        return None
    is_number = isinstance(value, numbers.Real) or (
        isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0
    )
    if not is_number or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}.")
    return float(value)


def check_momentum(momentum: Any) -> None:
    """Raises unless ``momentum`` lies in [0, 1] (flax's convention)."""
    value = static_float(momentum, "momentum", "a real number in [0, 1]")
    if value is not None and not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"momentum must lie in [0, 1], got {value}. jaxbn follows flax's "
            "convention new = momentum * old + (1 - momentum) * batch, so the "
            "usual values are 0.9-0.999; a PyTorch momentum m corresponds to 1 - m."
        )


def check_not_traced(value: Any, name: str) -> None:
    """Raises ``TypeError`` for a traced ``value`` of an argument that selects the code path at trace time."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python bool (or None), got a traced value {value}. It selects the code path at "
            "trace time; pass it as a static argument (e.g. jax.jit(..., static_argnames=...)), or switch "
            "inside jit with lax.cond over two calls."
        )


def check_static_bool(value: Any, name: str, *, none_ok: bool = False) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python bool (or None if ``none_ok``)."""
    if isinstance(value, bool) or (none_ok and value is None):
        return
    raise TypeError(
        f"{name} must be a Python bool{' or None' if none_ok else ''}, got {value!r}. It "
        "selects the code path at trace time; to switch inside jit, use lax.cond over two calls."
    )


def check_epsilon(epsilon: Any, dtype: Any = jnp.float32) -> None:
    """Raises unless ``epsilon`` stays finite and normal in ``dtype`` (XLA flushes subnormals to 0)."""
    value = static_float(epsilon, "epsilon", "a positive real number")
    if value is None:
        return
    info = jnp.finfo(dtype)
    with np.errstate(over="ignore", under="ignore"):
        in_dtype = float(np.asarray(value, np.dtype(info.dtype)))
    if not (in_dtype >= float(info.tiny) and np.isfinite(in_dtype)):
        raise ValueError(
            f"epsilon must be a finite number > 0 in the {jnp.dtype(dtype)} the statistics are "
            f"computed in, and not below its smallest normal number {float(info.tiny):.4g} (XLA flushes "
            f"subnormal numbers to 0), got {epsilon!r} (which is {in_dtype} there): it is added to the "
            "variance before the inverse square root. The usual value is 1e-5."
        )


def positive_int(value: Any, name: str, *, none_ok: bool = False) -> int | None:
    """Returns ``value`` as an int, raising unless it is a positive integer (or None if ``none_ok``)."""
    if value is None and none_ok:
        return None
    expected = "a positive int" + (" or None" if none_ok else "")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}.") from None
    if number < 1:
        raise ValueError(f"{name} must be {expected}, got {number}.")
    return number


def check_floating(x: Any, name: str = "x") -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is real floating."""
    x = check_inexact(x, name)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must have a real floating dtype here, got {x.dtype}: this function does not "
            "support complex input (moments, normalize, batch_norm, layer_norm, rms_norm, "
            "group_norm and instance_norm do)."
        )
    return x


def check_inexact(x: Any, name: str = "x") -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is floating or complex."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)  # NumPy input: at JAX's default precision
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64) or "
            f"a complex one (complex64, complex128), got {x.dtype}. Cast it first, e.g. "
            f"{name}.astype(jnp.float32)."
        )
    return x


def check_dtype(dtype: Any, name: str = "dtype", *, complex_ok: bool = False) -> None:
    """Raises unless ``dtype`` is None or a floating (or, if ``complex_ok``, complex) dtype."""
    if dtype is None:
        return
    expected = "a floating or complex dtype" if complex_ok else "a floating dtype"
    try:
        canonical = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name} must be {expected} or None, got {dtype!r}.") from err
    if not jnp.issubdtype(canonical, jnp.inexact if complex_ok else jnp.floating):
        raise TypeError(f"{name} must be {expected} or None, got {canonical}.")


def check_output_dtype(x_dtype: Any, dtype: Any, name: str = "dtype") -> None:
    """Raises unless ``dtype`` is None, floating for real input, or complex for complex input."""
    is_complex = jnp.issubdtype(x_dtype, jnp.complexfloating)
    check_dtype(dtype, name, complex_ok=is_complex)
    if is_complex and dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
        raise TypeError(
            f"{name}={jnp.dtype(dtype)} is real, but the input is {jnp.dtype(x_dtype)}: the output "
            "would lose its imaginary part. Pass a complex dtype (complex64, complex128) or None."
        )


def canonicalize_axes(ndim: int, axis: Any, name: str = "axis", *, allow_empty: bool = False) -> tuple[int, ...]:
    """Returns ``axis`` (an int or a sequence of ints) as sorted non-negative axes."""
    if ndim == 0:
        raise ValueError(
            "normalization needs an input with at least one axis, got a 0-d (scalar) input x of shape (); "
            "reshape it, e.g. x.reshape(1, -1)."
        )
    axes = (axis,) if not isinstance(axis, Sequence) else tuple(axis)
    if not axes and not allow_empty:
        raise ValueError(f"{name} must name at least one axis, got {axis!r}.")
    result = []
    for ax in axes:
        if isinstance(ax, (bool, np.bool_)) or not isinstance(ax, (numbers.Integral, np.integer)):
            raise TypeError(f"{name} must be an int or a sequence of ints, got {axis!r}.")
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an input with {ndim} "
                f"dimensions: each axis must lie in [{-ndim}, {ndim - 1}]."
            )
        result.append(int(ax) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"{name}={axis!r} names the same axis twice.")
    return tuple(sorted(result))


def check_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array:
    """Returns ``mask`` as a boolean array, raising unless it broadcasts to ``shape``."""
    mask_shape = np.shape(mask)
    try:
        broadcast = jnp.broadcast_shapes(mask_shape, tuple(shape))  # jax's: symbolic dimensions too
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"mask of shape {mask_shape} does not broadcast to the input shape "
            f"{tuple(shape)}. Give it the input's shape, or size 1 along the axes "
            "it does not vary over (e.g. (batch, 1, 1, 1) to mask whole examples)."
        )
    dtype = getattr(mask, "dtype", None)
    mask = jnp.asarray(mask) if dtype is None else mask
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array (True where an element counts), got dtype {mask.dtype}. "
            "jaxbn does not weight elements; for a 0/1 array pass mask.astype(bool) or mask > 0."
        )
    return mask


def check_feature_arrays(
    arrays: Mapping[str, Any] | None,
    allowed: Sequence[str],
    required: Sequence[str],
    feature_shape: tuple[int, ...],
    name: str,
    scalars: Sequence[str] = (),
) -> dict[str, Any]:
    """Checks a ``params``/``state`` dict: known and required keys, floating dtypes, and the feature
    shape (one value per feature, nothing broadcast), or a scalar for the keys in ``scalars``."""
    allowed = tuple(allowed) + tuple(scalars)
    if arrays is None:
        arrays = {}
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"{name} must be a dict with keys {list(allowed)}, got {type(arrays).__name__}."
        )
    unknown = sorted(set(arrays) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name} has unknown keys {unknown}; expected only {list(allowed)} (flax's names)."
        )
    missing = [key for key in required if arrays.get(key) is None]
    if missing:
        raise ValueError(f"{name} is missing {missing}; expected keys {list(required)}.")
    checked = {}
    for key, value in arrays.items():
        if value is None:
            continue
        if not hasattr(value, "dtype"):
            try:
                value = jnp.asarray(value)
            except TypeError:
                raise TypeError(
                    f"{name}['{key}'] must be an array, got {type(value).__name__}: {value!r}."
                ) from None
        if key not in scalars and not jnp.issubdtype(value.dtype, jnp.inexact):
            raise TypeError(
                f"{name}['{key}'] must have a floating dtype, got {value.dtype} (an integer or "
                f"boolean {name} would be truncated). Create it with a float dtype, e.g. "
                f"jnp.asarray(..., jnp.float32)."
            )
        value_shape = tuple(np.shape(value))
        if key in scalars:
            if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
                raise TypeError(
                    f"{name}['{key}'] must be an integer or floating scalar (a counter), got dtype {value.dtype}: "
                    "a boolean counter would stop at 1."
                )
            if value_shape != ():
                raise ValueError(f"{name}['{key}'] must be a scalar, got shape {value_shape}.")
        elif value_shape != tuple(feature_shape):
            raise ValueError(
                f"{name}['{key}'] has shape {value_shape}, but the input has "
                f"feature shape {tuple(feature_shape)} along its feature axes; "
                "check the argument that names them (batch norm's `axis`: -1 for "
                "NHWC, 1 for NCHW; `feature_axes` for layer and instance norm) and "
                "the number of features the parameters were created with."
            )
        checked[key] = value
    return checked


def feature_axes(
    x: jax.Array, axis: Any, name: str = "axis"
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(feature axes, reduction axes, feature shape)`` of ``x`` for the feature ``axis``."""
    features = canonicalize_axes(x.ndim, axis, name)
    reduction = tuple(i for i in range(x.ndim) if i not in features)
    return features, reduction, tuple(x.shape[i] for i in features)


def compute_dtype(x: jax.Array, dtype: Any) -> Any:
    """The compute dtype: at least float32, never below ``x``'s or ``dtype``."""
    requested = x.dtype if dtype is None else jnp.promote_types(x.dtype, dtype)
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(requested, jnp.float32))


def output_dtype(x: jax.Array, params: Mapping[str, Any], dtype: Any) -> Any:
    """flax's rule: the requested ``dtype``, else the promotion of the input and the parameters."""
    if dtype is not None:
        return jax.dtypes.canonicalize_dtype(dtype)
    return jnp.result_type(x, *params.values())


def feature_shape(x: Any, axes: Any, name: str = "axis") -> tuple[int, ...]:
    """The sizes of ``x`` along the feature ``axes`` (argument ``name``): its parameters' shape."""
    x = x if hasattr(x, "shape") and hasattr(x, "ndim") else jnp.asarray(x)
    return feature_axes(x, axes, name)[2]


def check_variable_size(value: Any, size: int, name: str, owner: str) -> None:
    """Raises unless the stored variable ``value`` (``name``) holds ``size`` values, one per feature."""
    shape = tuple(np.shape(value))
    if int(np.prod(shape)) != size:
        raise ValueError(
            f"{owner}: {name} has shape {shape}, but this layer has {size} features: it comes from another "
            "layer or model (a checkpoint or state of a different network?). Restore the variables of this "
            "layer, or build the layer with the number of features the variables were created with."
        )


def axis_size(axis_name: Any, axis_index_groups: Sequence[Sequence[int]] | None = None) -> int:
    """Returns the number of devices a reduction over ``axis_name`` combines (known at trace time).

    Args:
      axis_name: None (1), a name, or a tuple of names bound by ``pmap``, ``shard_map`` or ``vmap``.
      axis_index_groups: optional groups of device indices along the axis (then: one group's size).

    Raises:
      ValueError: an unbound ``axis_name``, or groups of several sizes or not covering the axis.

    >>> import jax, jax.numpy as jnp
    >>> jax.vmap(lambda x: x * axis_size('batch'), axis_name='batch')(jnp.ones(2))
    Array([2., 2.], dtype=float32)
    """
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                "axis_index_groups was given without axis_name; groups subdivide a "
                "named device axis, so pass the axis_name they index."
            )
        return 1
    try:
        size = int(lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here ({err}). Call this function "
            f"inside jax.shard_map(..., mesh=...) or jax.pmap(..., axis_name="
            f"{axis_name!r}) (or jax.vmap with that axis_name) whose axes include "
            f"{axis_name!r}. Under plain jax.jit with a sharded batch, pass "
            "axis_name=None: XLA inserts the cross-device reduction itself."
        ) from None
    if axis_index_groups is None:
        return size
    groups = axis_index_groups  # (every index once, in groups of one size)
    expected = (
        f"a list of equally sized lists of device indices that together name each index "
        f"0..{size - 1} of axis {axis_name!r} exactly once"
    )
    try:
        flat = [index for group in groups for index in group]
        sizes = {len(group) for group in groups}
    except TypeError:
        raise TypeError(f"axis_index_groups must be {expected}, got {groups!r}.") from None
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in flat):
        raise TypeError(f"axis_index_groups must be {expected}, got {groups!r}.")
    if len(sizes) != 1:
        raise ValueError(f"axis_index_groups must all have the same size, got sizes {sorted(sizes)}.")
    if sorted(flat) != list(range(size)):
        raise ValueError(f"axis_index_groups must be {expected}, got {groups!r}.")
    return len(groups[0])


def check_renorm_limits(r_max: Any, d_max: Any) -> None:
    """Raises unless ``r_max >= 1`` and ``d_max >= 0`` (scalars; inf allowed; traced let through)."""
    for name, value, lower, meaning in (
        ("r_max", r_max, 1.0, "r is clipped to [1/r_max, r_max]"),
        ("d_max", d_max, 0.0, "d is clipped to [-d_max, d_max]"),
    ):
        expected = f"a real scalar >= {lower:g} (inf for no clipping)"
        if isinstance(value, jax.core.Tracer):
            if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number):
                raise TypeError(f"{name} must be {expected}, got a traced array of shape {jnp.shape(value)} "
                                f"and dtype {value.dtype}.")
            continue
        number = static_float(value, name, expected)
        if not number >= lower:  # also rejects NaN
            raise ValueError(
                f"{name} must be a real scalar >= {lower:g} (inf for no clipping), got {number}: {meaning}, "
                "and r_max=1, d_max=0 is plain batch norm. Ioffe (2017) uses r_max=3, d_max=5 after "
                "a warm-up; see renorm_clipping for that schedule."
            )


def number_of_groups(
    channels: int, num_groups: Any, group_size: Any, channels_are: str = "channels of the input (its last axis)"
) -> int:
    """flax GroupNorm's rule: exactly one of the two, dividing the channels (``channels_are`` says whose)."""
    num_groups = positive_int(num_groups, "num_groups", none_ok=True)
    group_size = positive_int(group_size, "group_size", none_ok=True)
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"exactly one of num_groups and group_size must be given, got num_groups={num_groups!r} "
            f"and group_size={group_size!r}. To give group_size, pass num_groups=None as well "
            "(num_groups defaults to 32)."
        )
    if group_size is not None:
        if channels % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {channels} {channels_are}; choose a divisor "
                "of the channel count."
            )
        return channels // group_size
    if channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} does not divide the {channels} {channels_are}; choose a divisor "
            "of the channel count, or pass group_size instead."
        )
    return num_groups


def _check_state_dtypes(state: Mapping[str, jax.Array], x: jax.Array, update: bool) -> None:
    """Raises for running statistics that would lose precision or their dtype."""
    for key in _STATE_KEYS:
        if state[key].dtype == jnp.float16:
            raise TypeError(
                f"state['{key}'] is float16, whose range (6.5e4) a running variance easily exceeds; "
                "keep running statistics in float32 (or bfloat16). The input itself may be float16."
            )
    if jnp.iscomplexobj(state["var"]):
        raise TypeError(f"state['var'] must be real (the variance E|x - mean|^2), got {state['var'].dtype}.")
    if update and jnp.iscomplexobj(x) and not jnp.iscomplexobj(state["mean"]):
        raise TypeError(
            f"the input is {x.dtype} but state['mean'] is {state['mean'].dtype}: a complex batch "
            "mean cannot be averaged into a real running mean without changing its dtype. Create "
            "the state with batch_norm_init(..., dtype=jnp.complex64)."
        )


def _check_cumulative_state(state: Mapping[str, Any], momentum: Any) -> None:
    """Raises unless ``state`` has a ``'count'`` exactly when ``momentum`` is None."""
    if momentum is None and "count" not in state:
        raise ValueError(
            "momentum=None (a cumulative average of all batch statistics) needs "
            "state['count'], the number of batches averaged so far; create the state "
            "with batch_norm_init(..., cumulative=True)."
        )
    if momentum is not None and "count" in state:
        raise ValueError(
            f"state has a 'count' entry (a cumulative average, from batch_norm_init(..., "
            f"cumulative=True)), but momentum={momentum!r} asks for an exponential "
            "average, which would leave it stale. Pass momentum=None, or a state "
            "without 'count'."
        )


def _check_ghost_batch_size(ghost, x, axes, mask, statistics, single_value):
    """``ghost_batch_size`` as an int, or None where there are no ghost batches to form."""
    if ghost is None:
        return None
    ghost = positive_int(ghost, "ghost_batch_size", none_ok=True)
    if 0 not in axes:
        raise ValueError(
            f"ghost_batch_size={ghost} splits axis 0 (the batch) into groups, but axis 0 is a "
            f"feature axis here (input shape {x.shape}); put the batch first."
        )
    if not statistics or single_value:  # no batch statistics normalize
        return None
    if x.shape[0] % ghost:
        raise ValueError(
            f"ghost_batch_size={ghost} does not divide the batch size {x.shape[0]} (axis 0 of the "
            f"input of shape {x.shape}, on this device); choose a divisor of {x.shape[0]}."
        )
    if mask is None and ghost * math.prod(x.shape[i] for i in axes if i != 0) == 1:
        raise ValueError(
            f"ghost_batch_size={ghost} leaves one value per feature in each ghost batch of an "
            f"input of shape {x.shape}: its variance is 0. Use a larger ghost_batch_size."
        )
    return int(ghost)


class BatchNormCall(NamedTuple):
    """The checked arguments of :func:`jaxbn.batch_norm` (or :func:`jaxbn.batch_renorm`)."""

    x: jax.Array
    params: dict[str, jax.Array]
    state: dict[str, jax.Array]
    given_state: Any  # returned as it is when nothing updates it
    mask: jax.Array | None  # None where no batch statistics are taken
    axes: tuple[int, ...]  # the reduction axes
    training: bool
    update: bool
    momentum: Any
    unbiased: bool
    epsilon: Any
    axis_name: Any
    groups: tuple[tuple[int, ...], ...] | None
    compute_dtype: Any
    out_dtype: Any
    ghost: int | None
    single_value: bool  # one value per feature across devices: no variance to take
    want_moments: bool
    correction: Any  # batch renormalization's (r, d) in training, else None
    correction_args: tuple


def check_batch_norm(
    function: str, x: Any, params: Any, state: Any, *, training, update_running_stats, axis,
    momentum, unbiased_running_var, epsilon, axis_name, axis_index_groups, mask, dtype,
    ghost_batch_size, return_moments, correction: Any = None, limits: tuple = (),
) -> BatchNormCall:
    """Checks every argument of :func:`jaxbn.batch_norm` (``function`` names it in messages), or of
    :func:`jaxbn.batch_renorm`, given its ``correction`` and ``limits`` (``r_max``, ``d_max``)."""
    check_static_bool(training, "training")
    renorm = correction is not None
    if renorm:
        check_renorm_limits(*limits)
    check_static_bool(return_moments, "return_moments")
    check_static_bool(update_running_stats, "update_running_stats", none_ok=True)
    check_static_bool(unbiased_running_var, "unbiased_running_var")
    update = training if update_running_stats is None else update_running_stats
    x = check_floating(x) if renorm and training else check_inexact(x)
    compute = compute_dtype(x, dtype)
    check_epsilon(epsilon, compute)
    check_output_dtype(x.dtype, dtype)
    _, axes, shape = feature_axes(x, axis)
    params = check_feature_arrays(params, _PARAM_KEYS, (), shape, "params")
    scalars = ("count", "steps") if renorm else ("count",)
    checked = check_feature_arrays(state, _STATE_KEYS, _STATE_KEYS, shape, "state",
                                   scalars=scalars)
    _check_state_dtypes(checked, x, update)
    if momentum is not None:
        check_momentum(momentum)
    if update:
        _check_cumulative_state(checked, momentum)
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    statistics = training or update or return_moments  # batch statistics are taken (mask counts)
    if statistics and math.prod(x.shape[i] for i in axes) == 0:
        raise ValueError(
            f"{function}: x of shape {x.shape} is a zero-size batch: with axis={axis!r} there are no elements "
            f"along the reduction axes {axes} to take batch statistics over. Skip the call for an "
            "empty batch, or normalize it with the running statistics (training=False, "
            "update_running_stats=False)."
        )
    single_value = False
    if statistics and mask is None:
        single_value = math.prod(x.shape[i] for i in axes) * axis_size(axis_name, groups) == 1
        if single_value:
            warnings.warn(
                f"{function}: an input of shape {x.shape} with axis={axis!r} has one value per feature "
                "(across all devices), so its batch variance is no estimate: the output is the bias (the "
                "normalized value is 0, as in flax), the running mean is updated and the running "
                "variance kept.",
                DegenerateBatchWarning,
                stacklevel=4,
            )
    if mask is not None and statistics:
        mask = check_mask(mask, x.shape)
    ghost = _check_ghost_batch_size(ghost_batch_size, x, axes, mask, statistics, single_value)
    if statistics and mask is not None and not ghost:
        axis_size(axis_name, groups)
    return BatchNormCall(
        x, params, checked, state, mask if statistics else None, axes, training, update, momentum,
        unbiased_running_var, epsilon, axis_name, groups, compute, output_dtype(x, params, dtype),
        ghost, single_value, return_moments, correction if training else None,
        tuple(limits) if training else (),
    )


def check_running_update(state: Any, batch: Any, momentum: Any, unbiased: Any) -> dict[str, Any]:
    """Checks :func:`jaxbn.update_running_stats`' arguments; returns the checked state."""
    from jaxbn.stats import Moments  # (stats imports this module)

    if not isinstance(batch, Moments):
        raise TypeError(f"batch must be jaxbn.Moments, got {type(batch).__name__}.")
    shape = tuple(jnp.shape(batch.mean))
    for field in ("mean", "var", "count"):
        value = getattr(batch, field)
        dtype = jnp.result_type(value)
        if not jnp.issubdtype(dtype, jnp.inexact if field == "mean" else jnp.floating):
            raise TypeError(
                f"batch.{field} must have a {'floating or complex' if field == 'mean' else 'real floating'} dtype, "
                f"got {dtype}; pass the Moments that jaxbn.moments, batch_norm(..., return_moments=True) or "
                "merge_moments returned."
            )
        if tuple(jnp.shape(value)) != shape:
            raise ValueError(
                f"batch.{field} has shape {tuple(jnp.shape(value))}, but batch.mean has shape {shape}: "
                "a Moments holds one value per feature in each field."
            )
    checked = check_feature_arrays(state, _STATE_KEYS, _STATE_KEYS, shape, "state",
                                   scalars=("count", "steps"))
    _check_state_dtypes(checked, batch.mean, update=True)
    check_static_bool(unbiased, "unbiased_running_var")
    if momentum is not None:
        check_momentum(momentum)
    _check_cumulative_state(checked, momentum)
    return checked


def check_init(num_features: Any, dtype: Any) -> tuple[int, ...]:
    """Checks :func:`jaxbn.batch_norm_init`'s arguments; returns the feature shape."""
    sizes = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
    if not sizes:
        raise ValueError("num_features must be a positive int or a non-empty tuple of them, got ().")
    shape = tuple(positive_int(n, "num_features") for n in sizes)
    check_dtype(dtype, complex_ok=True)
    return shape


def check_normalize(x, mean, var, scale, bias, axis, epsilon, dtype) -> tuple:
    """Checks :func:`jaxbn.normalize`'s arguments (and returns them, with the dtypes)."""
    x = check_inexact(x)
    compute = compute_dtype(x, dtype)
    check_epsilon(epsilon, compute)
    check_output_dtype(x.dtype, dtype)
    _, axes, shape = feature_axes(x, axis)
    params = check_feature_arrays({"scale": scale, "bias": bias}, _PARAM_KEYS, (), shape, "params")
    stats = check_feature_arrays({"mean": mean, "var": var}, _STATE_KEYS, _STATE_KEYS, shape,
                                 "state")
    if jnp.iscomplexobj(stats["var"]):
        raise TypeError(f"var must be real (the variance E|x - mean|^2), got {stats['var'].dtype}.")
    return x, stats["mean"], stats["var"], params, axes, compute, output_dtype(x, params, dtype)


def check_moments(x, axes, mask, axis_name, axis_index_groups, dtype, source) -> tuple:
    """Checks :func:`jaxbn.moments`' arguments (and returns them, with the dtypes)."""
    x = check_inexact(x)
    is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
    check_dtype(dtype, complex_ok=is_complex)
    axes = canonicalize_axes(x.ndim, axes, name="axes", allow_empty=True)
    requested = x.dtype if dtype is None else dtype
    if is_complex:  # a real dtype sets the precision; the statistics stay complex
        requested = jnp.promote_types(requested, jnp.complex64)
    stats_dtype = jnp.promote_types(requested, jnp.float32)
    axis_size(axis_name, axis_index_groups)
    if mask is not None:
        mask = check_mask(mask, x.shape)
    if source is not None:
        source = check_inexact(source)
        if source.shape != x.shape:
            raise ValueError(f"source must have x's shape {x.shape} (the same values), got {source.shape}.")
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    real_dtype = jnp.finfo(stats_dtype).dtype
    return x, axes, mask, source, groups, jnp.dtype(stats_dtype), jnp.dtype(real_dtype)


def check_per_example(kind, x, params, reduction_axes, feature_axes_, epsilon, mask, dtype,
                      axis_name, axis_index_groups, num_groups=None, group_size=None) -> tuple:
    """Checks the arguments of a ``kind`` of per-example norm; returns them to normalize (group norm's
    ``x`` and ``mask`` split into groups, the params broadcastable to ``x``) with the dtypes."""
    x = check_inexact(x)
    if kind == "group_norm":
        canonicalize_axes(x.ndim, -1)  # a 0-d input has no channel axis: the shared message
        if reduction_axes is None:
            reduction = tuple(range(1, x.ndim)) or (0,)
        else:
            reduction = canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
        if reduction[-1] != x.ndim - 1:
            raise ValueError(
                f"reduction_axes={reduction_axes!r} must include the last axis ({x.ndim - 1}, or -1) of "
                f"the input of shape {x.shape}: group norm takes channels last and reduces over each group."
            )
        features = (x.ndim - 1,)
        groups = number_of_groups(x.shape[-1], num_groups, group_size)
    else:
        if kind != "instance_norm":
            reduction = canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
        features = canonicalize_axes(x.ndim, feature_axes_, name="feature_axes")
        if kind == "instance_norm":
            if 0 in features:
                raise ValueError(
                    f"feature_axes={feature_axes_!r} includes axis 0, which instance norm takes as the "
                    f"batch axis (input shape {x.shape}); put the batch first and name the channel axes."
                )
            reduction = tuple(i for i in range(1, x.ndim) if i not in features)
    compute = compute_dtype(x, dtype)
    check_epsilon(epsilon, compute)
    check_output_dtype(x.dtype, dtype)
    allowed = ("scale",) if kind == "rms_norm" else _PARAM_KEYS
    shape = tuple(x.shape[i] for i in features)
    params = check_feature_arrays(params, allowed, (), shape, "params")
    out = output_dtype(x, params, dtype)
    if not reduction:  # (instance norm only)
        warnings.warn(
            f"instance_norm: an input of shape {x.shape} with feature_axes={feature_axes_!r} has no "
            "spatial axis, so each value is its own mean: the output is the bias (as in flax).",
            DegenerateBatchWarning,
            stacklevel=4,
        )
        mask = None
    else:
        if mask is not None:
            mask = check_mask(mask, x.shape)
        axis_size(axis_name, axis_index_groups)
        if axis_index_groups is not None:
            axis_index_groups = tuple(map(tuple, axis_index_groups))
    if kind == "group_norm":
        grouped = x.shape[:-1] + (groups, x.shape[-1] // groups)
        if mask is not None:
            mask = jnp.broadcast_to(mask, x.shape).reshape(grouped)
        reduction, features = reduction[:-1] + (x.ndim,), (x.ndim - 1, x.ndim)
        x = x.reshape(grouped)
    shape = tuple(x.shape[i] if i in features else 1 for i in range(x.ndim))
    params = {key: jnp.reshape(value, shape) for key, value in params.items()}
    return x, params, reduction, mask, axis_index_groups, compute, out
