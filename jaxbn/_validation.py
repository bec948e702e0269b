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

_PARAM_KEYS, _STATE_KEYS = ("scale", "bias"), ("mean", "var")
# an integer or real floating dtype: a real number's (bool and complex are not)
is_real_dtype = lambda dtype: any(jnp.issubdtype(dtype, t) for t in (jnp.integer, jnp.floating))


class DegenerateBatchWarning(UserWarning):
    """A batch (or instance) with one value per feature: no variance to estimate. The output is
    then the bias, as in flax; batch norm updates its running mean and keeps its running variance.
    Silence it with ``warnings.filterwarnings("ignore", category=jaxbn.DegenerateBatchWarning)``."""


def static_float(value: Any, name: str, expected: str) -> float | None:
    """``float(value)``, or None for a traced value (which must still be a real scalar)."""
    if isinstance(value, jax.core.Tracer):
        if np.ndim(value) != 0 or not is_real_dtype(value.dtype):
            raise TypeError(
                f"{name} must be {expected}, got a traced array of shape {np.shape(value)} and "
                f"dtype {value.dtype}: a traced value may be any real scalar (its range is not "
                "checked), not an array."
            )
        return None
    scalar = isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0
    if not (isinstance(value, numbers.Real) or scalar) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}.")
    return float(value)


def check_momentum(momentum: Any) -> None:
    """Raises unless ``momentum`` lies in [0, 1] (flax's convention)."""
    value = static_float(momentum, "momentum", "a real number in [0, 1]")
    if value is not None and not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"momentum must lie in [0, 1], got {value}. jaxbn follows flax's convention new = "
            "momentum * old + (1 - momentum) * batch, so the usual values are 0.9-0.999; a "
            "PyTorch momentum m corresponds to 1 - m."
        )


def check_not_traced(value: Any, name: str) -> None:
    """Raises ``TypeError`` for a traced ``value`` of an argument that selects the code path."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python bool (or None), got a traced value {value}. It selects the "
            "code path at trace time; pass it as a static argument (e.g. jax.jit(..., "
            "static_argnames=...)), or switch inside jit with lax.cond over two calls."
        )


def check_static_bool(value: Any, name: str, *, none_ok: bool = False) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python bool (or None if ``none_ok``)."""
    if not (isinstance(value, bool) or (none_ok and value is None)):
        raise TypeError(
            f"{name} must be a Python bool{' or None' * none_ok}, got {value!r}. It selects the "
            "code path at trace time; to switch inside jit, use lax.cond over two calls."
        )


def check_epsilon(epsilon: Any, dtype: Any = jnp.float32) -> None:
    """Raises unless ``epsilon`` stays finite and normal in ``dtype`` (XLA flushes subnormals)."""
    value = static_float(epsilon, "epsilon", "a positive real number")
    if value is None:
        return
    info = jnp.finfo(dtype)
    with np.errstate(over="ignore", under="ignore"):
        in_dtype = float(np.asarray(value, np.dtype(info.dtype)))
    if not (in_dtype >= float(info.tiny) and np.isfinite(in_dtype)):
        raise ValueError(
            f"epsilon must be a finite number > 0 in the {jnp.dtype(dtype)} the statistics are "
            f"computed in, and not below its smallest normal number {float(info.tiny):.4g} (XLA "
            f"flushes subnormal numbers to 0), got {epsilon!r} (which is {in_dtype} there): it is "
            "added to the variance before the inverse square root. The usual value is 1e-5."
        )


def positive_int(value: Any, name: str, *, none_ok: bool = False) -> int | None:
    """``value`` as an int, raising unless it is a positive integer (or None if ``none_ok``)."""
    if value is None and none_ok:
        return None
    expected = "a positive int" + (" or None" if none_ok else "")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be {expected}, got {value!r} of type {type(value).__name__}."
        ) from None
    if number < 1:
        raise ValueError(f"{name} must be {expected}, got {number}.")
    return number


def check_inexact(x: Any, name: str = "x", *, real: bool = False) -> jax.Array:
    """``x`` as an array, raising ``TypeError`` unless floating (or complex, unless ``real``)."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)  # NumPy input: at JAX's default precision
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64) or "
            f"a complex one (complex64, complex128), got {x.dtype}. Cast it first, e.g. "
            f"{name}.astype(jnp.float32)."
        )
    if real and jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must have a real floating dtype here, got {x.dtype}: this function does not "
            "support complex input (moments, normalize, batch_norm, layer_norm, rms_norm, "
            "group_norm and instance_norm do)."
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


def _compute_dtype(x: jax.Array, epsilon: Any, dtype: Any) -> Any:
    """The compute dtype (at least float32, not below ``x``'s or ``dtype``), ``epsilon`` checked."""
    requested = x.dtype if dtype is None else jnp.promote_types(x.dtype, dtype)
    compute = jax.dtypes.canonicalize_dtype(jnp.promote_types(requested, jnp.float32))
    check_epsilon(epsilon, compute)
    is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
    check_dtype(dtype, complex_ok=is_complex)
    if is_complex and dtype is not None and jnp.dtype(dtype).kind != "c":
        raise TypeError(
            f"dtype={jnp.dtype(dtype)} is real, but the input is {x.dtype}: the output would lose "
            "its imaginary part. Pass a complex dtype (complex64, complex128) or None."
        )
    return compute


def output_dtype(x: jax.Array, params: Mapping[str, Any], dtype: Any) -> Any:
    """flax's rule: the requested ``dtype``, else the promotion of the input and the parameters."""
    if dtype is not None:
        return jax.dtypes.canonicalize_dtype(dtype)
    return jnp.result_type(x, *params.values())


def canonicalize_axes(ndim: int, axis: Any, name: str = "axis", *, allow_empty=False) -> tuple:
    """Returns ``axis`` (an int or a sequence of ints) as sorted non-negative axes."""
    if ndim == 0:
        raise ValueError(
            "normalization needs an input with at least one axis, got a 0-d (scalar) input x of "
            "shape (); reshape it, e.g. x.reshape(1, -1)."
        )
    axes = (axis,) if not isinstance(axis, Sequence) else tuple(axis)
    if not axes and not allow_empty:
        raise ValueError(f"{name} must name at least one axis, got {axis!r}.")
    result = []
    for ax in axes:
        if isinstance(ax, (bool, np.bool_)) or not isinstance(ax, (numbers.Integral, np.integer)):
            raise TypeError(f"{name} must be an int or a sequence of ints, got {axis!r}.")
        if not -ndim <= int(ax) < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an input with {ndim} "
                f"dimensions: each axis must lie in [{-ndim}, {ndim - 1}]."
            )
        result.append(int(ax) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"{name}={axis!r} names the same axis twice.")
    return tuple(sorted(result))


def _split_axes(x: Any, axis: Any, name: str = "axis") -> tuple[tuple[int, ...], tuple]:
    """``(reduction axes, feature shape)`` of ``x`` for the feature ``axis``."""
    features = canonicalize_axes(x.ndim, axis, name)
    return tuple(i for i in range(x.ndim) if i not in features), tuple(x.shape[i] for i in features)


def feature_shape(x: Any, axes: Any, name: str = "axis") -> tuple[int, ...]:
    """The sizes of ``x`` along the feature ``axes`` (argument ``name``): its parameters' shape."""
    x = x if hasattr(x, "shape") and hasattr(x, "ndim") else jnp.asarray(x)
    return _split_axes(x, axes, name)[1]


def check_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array:
    """Returns ``mask`` as a boolean array, raising unless it broadcasts to ``shape``."""
    try:
        broadcast = jnp.broadcast_shapes(np.shape(mask), tuple(shape))  # (symbolic shapes too)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"mask of shape {np.shape(mask)} does not broadcast to the input shape "
            f"{tuple(shape)}. Give it the input's shape, or size 1 along the axes "
            "it does not vary over (e.g. (batch, 1, 1, 1) to mask whole examples)."
        )
    mask = mask if hasattr(mask, "dtype") else jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array (True where an element counts), got dtype {mask.dtype}. "
            "jaxbn does not weight elements; for a 0/1 array pass mask.astype(bool) or mask > 0."
        )
    return mask


def check_feature_arrays(arrays, name, shape, keys, required=False, scalars=()) -> dict[str, Any]:
    """Checks a ``params``/``state`` dict: keys, floating dtypes, the feature ``shape``."""
    allowed, arrays = [*keys, *scalars], {} if arrays is None else arrays
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{name} must be a dict with keys {allowed}, got {type(arrays).__name__}.")
    if unknown := sorted(set(arrays) - set(allowed)):
        raise ValueError(
            f"{name} has unknown keys {unknown}; expected only {allowed} (flax's names)."
        )
    if required and (missing := [key for key in keys if arrays.get(key) is None]):
        raise ValueError(f"{name} is missing {missing}; expected keys {list(keys)}.")
    checked = {}
    for key, value in arrays.items():
        if value is None:
            continue
        where = f"{name}['{key}']"
        if not hasattr(value, "dtype"):
            try:
                value = jnp.asarray(value)
            except TypeError:
                raise TypeError(
                    f"{where} must be an array, got {type(value).__name__}: {value!r}."
                ) from None
        if key in scalars and not is_real_dtype(value.dtype):
            raise TypeError(
                f"{where} must be an integer or floating scalar (a counter), got dtype "
                f"{value.dtype}: a boolean counter would stop at 1."
            )
        if key in scalars and np.shape(value) != ():
            raise ValueError(f"{where} must be a scalar, got shape {tuple(np.shape(value))}.")
        if key not in scalars and not jnp.issubdtype(value.dtype, jnp.inexact):
            raise TypeError(
                f"{where} must have a floating dtype, got {value.dtype} (an integer or boolean "
                f"{name} would be truncated). Create it with a float dtype, e.g. "
                "jnp.asarray(..., jnp.float32)."
            )
        if key not in scalars and tuple(np.shape(value)) != tuple(shape):
            raise ValueError(
                f"{where} has shape {tuple(np.shape(value))}, but the input has feature shape "
                f"{tuple(shape)} along its feature axes; check the argument that names them "
                "(batch norm's `axis`: -1 for NHWC, 1 for NCHW; `feature_axes` for layer and "
                "instance norm) and the number of features the parameters were created with."
            )
        checked[key] = value
    return checked


def check_variable_size(value: Any, size: int, name: str, owner: str) -> None:
    """Raises unless the stored variable ``value`` (``name``) holds ``size`` values."""
    if int(np.prod(np.shape(value))) != size:
        raise ValueError(
            f"{owner}: {name} has shape {tuple(np.shape(value))}, but this layer has {size} "
            "features: it comes from another layer or model (a checkpoint or state of a different "
            "network?). Restore the variables of this layer, or build the layer with the number "
            "of features the variables were created with."
        )


def axis_size(axis_name: Any, axis_index_groups: Sequence[Sequence[int]] | None = None) -> int:
    """How many devices a reduction over ``axis_name`` combines (with groups: one group's size)."""
    groups = axis_index_groups
    if axis_name is None and groups is not None:
        raise ValueError(
            "axis_index_groups was given without axis_name; groups subdivide a named device "
            "axis, so pass the axis_name they index."
        )
    if axis_name is None:
        return 1
    try:
        size = int(lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here ({err}). Call this function inside "
            f"jax.shard_map(..., mesh=...) or jax.pmap(..., axis_name={axis_name!r}) (or jax.vmap "
            f"with that axis_name) whose axes include {axis_name!r}. Under plain jax.jit with a "
            "sharded batch, pass axis_name=None: XLA inserts the cross-device reduction itself."
        ) from None
    if groups is None:
        return size
    invalid = (
        "axis_index_groups must be a list of equally sized lists of device indices that together "
        f"name each index 0..{size - 1} of axis {axis_name!r} exactly once, got {groups!r}."
    )
    try:  # (every index once, in groups of one size)
        flat, sizes = [i for group in groups for i in group], {len(group) for group in groups}
    except TypeError:
        raise TypeError(invalid) from None
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in flat):
        raise TypeError(invalid)
    if len(sizes) != 1:
        raise ValueError(
            f"axis_index_groups must all have the same size, got sizes {sorted(sizes)}."
        )
    if sorted(flat) != list(range(size)):
        raise ValueError(invalid)
    return len(groups[0])


def check_renorm_limits(r_max: Any, d_max: Any) -> None:
    """Raises unless ``r_max >= 1`` and ``d_max >= 0`` (scalars, inf allowed; traced: unchecked)."""
    for name, value, lower in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        expected = f"a real scalar >= {lower:g} (inf for no clipping)"
        clipped = "[1/r_max, r_max]" if name == "r_max" else "[-d_max, d_max]"
        if isinstance(value, jax.core.Tracer):
            if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number):
                raise TypeError(
                    f"{name} must be {expected}, got a traced array of shape "
                    f"{jnp.shape(value)} and dtype {value.dtype}."
                )
            continue
        number = static_float(value, name, expected)
        if number is not None and not number >= lower:  # (not NaN either)
            raise ValueError(
                f"{name} must be {expected}, got {number}: {name[0]} is clipped to {clipped}, and "
                "r_max=1, d_max=0 is plain batch norm. Ioffe (2017) uses r_max=3, d_max=5 after a "
                "warm-up; see renorm_clipping for that schedule."
            )


def number_of_groups(channels: int, num_groups, group_size, channels_are: str = "") -> int:
    """flax GroupNorm's rule: exactly one of the two, dividing the ``channels``."""
    num_groups = positive_int(num_groups, "num_groups", none_ok=True)
    group_size = positive_int(group_size, "group_size", none_ok=True)
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"exactly one of num_groups and group_size must be given, got num_groups="
            f"{num_groups!r} and group_size={group_size!r}. To give group_size, pass "
            "num_groups=None as well (num_groups defaults to 32)."
        )
    name, given = ("num_groups", num_groups) if group_size is None else ("group_size", group_size)
    if channels % given:
        raise ValueError(
            f"{name}={given} does not divide the {channels} "
            f"{channels_are or 'channels of the input (its last axis)'}; choose a divisor of the "
            f"channel count{', or pass group_size instead' if group_size is None else ''}."
        )
    return channels // given if group_size else given


def _check_state(state, shape, scalars, x, update, momentum, unbiased) -> dict[str, Any]:
    """The checked running statistics (and ``momentum``, and ``count`` iff momentum is None)."""
    state = check_feature_arrays(state, "state", shape, _STATE_KEYS, True, scalars)
    if half := [key for key in _STATE_KEYS if state[key].dtype == jnp.float16]:
        raise TypeError(
            f"state['{half[0]}'] is float16, whose range (6.5e4) a running variance easily "
            "exceeds; keep running statistics in float32 (or bfloat16). The input itself may "
            "be float16."
        )
    if jnp.iscomplexobj(state["var"]):
        raise TypeError(
            f"state['var'] must be real (the variance E|x - mean|^2), got {state['var'].dtype}."
        )
    if update and jnp.iscomplexobj(x) and not jnp.iscomplexobj(state["mean"]):
        raise TypeError(
            f"the input is {x.dtype} but state['mean'] is {state['mean'].dtype}: a complex batch "
            "mean cannot be averaged into a real running mean without changing its dtype. Create "
            "the state with batch_norm_init(..., dtype=jnp.complex64)."
        )
    check_static_bool(unbiased, "unbiased_running_var")
    if momentum is not None:
        check_momentum(momentum)
    if update and momentum is None and "count" not in state:
        raise ValueError(
            "momentum=None (a cumulative average of all batch statistics) needs state['count'], "
            "the number of batches averaged so far; create the state with batch_norm_init(..., "
            "cumulative=True)."
        )
    if update and momentum is not None and "count" in state:
        raise ValueError(
            f"state has a 'count' entry (a cumulative average, from batch_norm_init(..., "
            f"cumulative=True)), but momentum={momentum!r} asks for an exponential average, which "
            "would leave it stale. Pass momentum=None, or a state without 'count'."
        )
    return state


class Plan(NamedTuple):
    """The static configuration of the statistics (and of a training step); ``dtype``: compute."""

    axes: tuple[int, ...]  # the reduction axes
    dtype: Any
    real_dtype: Any
    axis_name: Any  # a hashable name or a tuple of names
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    out_dtype: Any = None
    correction: Any = None  # batch renormalization's (r, d) in training
    centred: bool = True  # False: moments around 0, ``var`` the mean square (RMS norm)
    # > 1: each statistic also spans this many consecutive elements of the last axis, so a
    # statistic's vectors hold one value per ``inner`` of them (group norm's channels of a group)
    inner: int = 1


class BatchNormCall(NamedTuple):
    """:func:`jaxbn.batch_norm`'s arguments by name, checked by :func:`check_batch_norm`."""

    x: jax.Array
    params: dict[str, jax.Array]
    state: dict[str, jax.Array]
    training: bool
    update_running_stats: bool  # (None resolved)
    axis: Any
    momentum: Any
    unbiased_running_var: bool
    epsilon: Any
    axis_name: Any
    axis_index_groups: Any
    mask: jax.Array | None  # None where no batch statistics are taken
    dtype: Any
    ghost_batch_size: int | None  # None where there are no ghost batches
    return_moments: bool
    r_max: Any = None  # batch renormalization's limits, the arguments of its correction
    d_max: Any = None
    given_state: Any = None  # returned as it is when nothing updates it
    plan: Any = None  # a Plan
    single_value: bool = False  # one value per feature across devices: no variance to take


def check_batch_norm(function: str, correction: Any = None, **arguments: Any) -> BatchNormCall:
    """Checks :func:`jaxbn.batch_norm`'s (with ``correction``: batch_renorm's) arguments."""
    call = BatchNormCall(**arguments)
    training, axis, axis_name, mask = call.training, call.axis, call.axis_name, call.mask
    check_static_bool(training, "training")
    renorm = correction is not None
    if renorm:
        check_renorm_limits(call.r_max, call.d_max)
    check_static_bool(call.return_moments, "return_moments")
    check_static_bool(call.update_running_stats, "update_running_stats", none_ok=True)
    check_static_bool(call.unbiased_running_var, "unbiased_running_var")
    update = training if call.update_running_stats is None else call.update_running_stats
    x = check_inexact(call.x, real=renorm and training)
    compute = _compute_dtype(x, call.epsilon, call.dtype)
    axes, shape = _split_axes(x, axis)
    params = check_feature_arrays(call.params, "params", shape, _PARAM_KEYS)
    scalars = ("count", "steps") if renorm else ("count",)
    unbiased = call.unbiased_running_var
    state = _check_state(call.state, shape, scalars, x, update, call.momentum, unbiased)
    call = call._replace(x=x, params=params, state=state, given_state=call.state)
    groups = None if call.axis_index_groups is None else tuple(map(tuple, call.axis_index_groups))
    statistics = training or update or call.return_moments  # batch statistics are taken
    size = math.prod(x.shape[i] for i in axes)
    if statistics and size == 0:
        raise ValueError(
            f"{function}: x of shape {x.shape} is a zero-size batch: with axis={axis!r} there are "
            f"no elements along the reduction axes {axes} to take batch statistics over. Skip the "
            "call for an empty batch, or normalize it with the running statistics "
            "(training=False, update_running_stats=False)."
        )
    single_value = statistics and mask is None and size * axis_size(axis_name, groups) == 1
    if single_value:
        warnings.warn(
            f"{function}: an input of shape {x.shape} with axis={axis!r} has one value per "
            "feature (across all devices), so its batch variance is no estimate: the output is "
            "the bias (the normalized value is 0, as in flax), the running mean is updated and "
            "the running variance kept.",
            DegenerateBatchWarning,
            stacklevel=4,
        )
    if mask is not None and statistics:
        mask = check_mask(mask, x.shape)
    ghost = positive_int(call.ghost_batch_size, "ghost_batch_size", none_ok=True)
    if ghost is not None and 0 not in axes:
        raise ValueError(
            f"ghost_batch_size={ghost} splits axis 0 (the batch) into groups, but axis 0 is a "
            f"feature axis here (input shape {x.shape}); put the batch first."
        )
    if not statistics or single_value:  # no batch statistics normalize: no ghost batches
        ghost = None
    if ghost and x.shape[0] % ghost:
        raise ValueError(
            f"ghost_batch_size={ghost} does not divide the batch size {x.shape[0]} (axis 0 of the "
            f"input of shape {x.shape}, on this device); choose a divisor of {x.shape[0]}."
        )
    if ghost and mask is None and ghost * math.prod(x.shape[i] for i in axes[1:]) == 1:
        raise ValueError(
            f"ghost_batch_size={ghost} leaves one value per feature in each ghost batch of an "
            f"input of shape {x.shape}: its variance is 0. Use a larger ghost_batch_size."
        )
    if statistics and mask is not None and not ghost:
        axis_size(axis_name, groups)
    out, correction = output_dtype(x, params, call.dtype), correction if training else None
    plan = Plan(axes, compute, jnp.finfo(compute).dtype, axis_name, groups, out, correction)
    call = call._replace(update_running_stats=update, ghost_batch_size=ghost, plan=plan)
    return call._replace(mask=mask if statistics else None, single_value=single_value)


def check_running_update(moments: Any, state, batch, momentum, unbiased) -> dict[str, Any]:
    """Checks :func:`jaxbn.update_running_stats`' arguments (``moments``: the Moments class)."""
    if not isinstance(batch, moments):
        raise TypeError(f"batch must be jaxbn.Moments, got {type(batch).__name__}.")
    shape = tuple(jnp.shape(batch.mean))
    for field in ("mean", "var", "count"):
        value, dtype = getattr(batch, field), jnp.result_type(getattr(batch, field))
        if not jnp.issubdtype(dtype, jnp.inexact if field == "mean" else jnp.floating):
            raise TypeError(
                f"batch.{field} must have a "
                f"{'floating or complex' if field == 'mean' else 'real floating'} dtype, got "
                f"{dtype}; pass the Moments that jaxbn.moments, batch_norm(..., "
                "return_moments=True) or merge_moments returned."
            )
        if tuple(jnp.shape(value)) != shape:
            raise ValueError(
                f"batch.{field} has shape {tuple(jnp.shape(value))}, but batch.mean has shape "
                f"{shape}: a Moments holds one value per feature in each field."
            )
    return _check_state(state, shape, ("count", "steps"), batch.mean, True, momentum, unbiased)


def check_init(num_features: Any, dtype: Any) -> tuple:
    """Checks :func:`jaxbn.batch_norm_init`'s arguments; returns the feature shape."""
    sizes = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
    if not sizes:
        raise ValueError(
            "num_features must be a positive int or a non-empty tuple of them, got ()."
        )
    shape = tuple(positive_int(n, "num_features") for n in sizes)
    check_dtype(dtype, complex_ok=True)
    return shape


def check_normalize(x, mean, var, scale, bias, axis, epsilon, dtype) -> tuple:
    """Checks :func:`jaxbn.normalize`'s arguments (and returns them, with the dtypes)."""
    x = check_inexact(x)
    compute = _compute_dtype(x, epsilon, dtype)
    axes, shape = _split_axes(x, axis)
    params = check_feature_arrays({"scale": scale, "bias": bias}, "params", shape, _PARAM_KEYS)
    stats = check_feature_arrays({"mean": mean, "var": var}, "state", shape, _STATE_KEYS, True)
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
    stats_dtype = jnp.dtype(jnp.promote_types(requested, jnp.float32))
    axis_size(axis_name, axis_index_groups)
    if mask is not None:
        mask = check_mask(mask, x.shape)
    source = None if source is None else check_inexact(source)
    if source is not None and source.shape != x.shape:
        raise ValueError(
            f"source must have x's shape {x.shape} (the same values), got {source.shape}."
        )
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    plan = Plan(axes, stats_dtype, jnp.finfo(stats_dtype).dtype, axis_name, groups)
    return x, plan, mask, source


def check_per_example(kind, x, params, epsilon, mask, axis_name, axis_index_groups, dtype, **axes):
    """Checks a per-example norm's arguments; returns ``(x, params, plan, mask)`` (groups split)."""
    x = check_inexact(x)
    reduction_axes, feature_axes = axes.get("reduction_axes"), axes.get("feature_axes")
    if kind == "group_norm":
        if reduction_axes is None:  # all but the batch axis (-1 for a 0-d x: the shared message)
            reduction_axes = tuple(range(1, x.ndim)) or -1
        reduction = canonicalize_axes(x.ndim, reduction_axes, "reduction_axes")
        if reduction[-1] != x.ndim - 1:
            raise ValueError(
                f"reduction_axes={reduction_axes!r} must include the last axis ({x.ndim - 1}, or "
                f"-1) of the input of shape {x.shape}: group norm takes channels last and reduces "
                "over each group."
            )
        features = (x.ndim - 1,)
        n_groups = number_of_groups(x.shape[-1], axes["num_groups"], axes["group_size"])
    elif kind == "instance_norm":
        features = canonicalize_axes(x.ndim, feature_axes, "feature_axes")
        if 0 in features:
            raise ValueError(
                f"feature_axes={feature_axes!r} includes axis 0, which instance norm takes as the "
                f"batch axis (input shape {x.shape}); put the batch first and name the channel "
                "axes."
            )
        reduction = tuple(i for i in range(1, x.ndim) if i not in features)
    else:
        reduction = canonicalize_axes(x.ndim, reduction_axes, "reduction_axes")
        features = canonicalize_axes(x.ndim, feature_axes, "feature_axes")
    compute = _compute_dtype(x, epsilon, dtype)
    allowed = ("scale",) if kind == "rms_norm" else _PARAM_KEYS
    shape = tuple(x.shape[i] for i in features)
    params = check_feature_arrays(params, "params", shape, allowed)
    out = output_dtype(x, params, dtype)
    groups = axis_index_groups
    if not reduction:  # (instance norm only)
        warnings.warn(
            f"instance_norm: an input of shape {x.shape} with feature_axes={feature_axes!r} has "
            "no spatial axis, so each value is its own mean: the output is the bias (as in flax).",
            DegenerateBatchWarning,
            stacklevel=4,
        )
        mask = None
    else:
        mask = None if mask is None else check_mask(mask, x.shape)
        axis_size(axis_name, axis_index_groups)
        groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    inner = 1
    if kind == "group_norm":
        size, complex_x = x.shape[-1] // n_groups, jnp.iscomplexobj(x)
        # channels explicitly sharded (sharding in types: a group's channels split over devices;
        # stats.explicit_sharding's test, written here: this module cannot import stats)
        spec = tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ())
        split = len(spec) == x.ndim and spec[-1] is not None
        if isinstance(size, int) and size > 1 and reduction[:-1] and not split and not complex_x:
            # x as it is, each group's statistics over the other axes and its channels: the sums
            # read rows of all channels (docs/internals.md), the parameters per channel
            reduction, inner = reduction[:-1], size
        else:  # x split into groups: (..., G, C / G), reduced over the last axis too
            grouped = x.shape[:-1] + (n_groups, size)
            mask = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(grouped)
            reduction, features = reduction[:-1] + (x.ndim,), (x.ndim - 1, x.ndim)
            x = x.reshape(grouped)
    shape = tuple(x.shape[i] if i in features else 1 for i in range(x.ndim))
    params = {key: jnp.reshape(value, shape) for key, value in params.items()}
    real = jnp.finfo(compute).dtype
    centred = kind != "rms_norm"
    plan = Plan(reduction, compute, real, axis_name, groups, out, centred=centred, inner=inner)
    return x, params, plan, mask
