"""Trace-time argument checks shared by every jaxbn function.

Each check runs while JAX traces, on static information only (shapes, dtypes,
Python hyperparameters), and raises a ``ValueError`` or ``TypeError`` that names
the argument, the value it got and what it expected. Traced hyperparameters (a
momentum computed inside ``jit``) cannot be checked and are let through.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class DegenerateBatchWarning(UserWarning):
    """A batch (or instance) with one value per feature: there is no variance to estimate.

    The output is then the bias, as in flax; batch norm updates its running
    mean and keeps its running variance. Silence it with ``warnings.filterwarnings("ignore",
    category=jaxbn.DegenerateBatchWarning)``.
    """


def static_float(value: Any, name: str, expected: str) -> float | None:
    """``float(value)``, or None for a traced value that cannot be checked.

    A traced value is still checked for what its type says: it must be a real
    (integer or floating) scalar, which otherwise would broadcast into the
    results or change the shape of a running state.
    """
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
    """Raises unless ``epsilon`` is a number that stays finite and normal (> 0, not subnormal) in ``dtype``.

    XLA flushes subnormal numbers to 0 (on CPU and GPU), so a subnormal
    epsilon would be 0: ``rsqrt(0 + 0)`` for a constant feature, NaN outputs.
    A traced ``epsilon`` cannot be checked and is let through.
    """
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


def _as_array(x: Any) -> jax.Array:
    """``x`` as a JAX array: NumPy input is converted once, at JAX's default precision."""
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def check_floating(x: Any, name: str = "x") -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is real floating."""
    x = _as_array(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must have a real floating dtype here, got {x.dtype}: this function does not "
            "support complex input (moments, normalize, batch_norm, layer_norm, rms_norm, "
            "group_norm and instance_norm do)."
        )
    return check_inexact(x, name)


def check_inexact(x: Any, name: str = "x") -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is floating or complex."""
    x = _as_array(x)
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
    """Raises unless ``dtype`` is None or a dtype the output of an ``x_dtype`` input can take.

    A real input takes a floating dtype; a complex input a complex one (a real
    output dtype would silently drop the imaginary part).
    """
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
    """Checks a ``params``/``state`` dict: known keys, required keys, shapes.

    Each entry must have the feature shape (the sizes of the feature axes, in
    order, as flax stores them): one value per feature, nothing broadcast;
    the keys in ``scalars`` (also allowed) must be scalars instead (batch
    norm's cumulative ``'count'``).
    """
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
            f"{name} has unknown keys {unknown}; expected only {list(allowed)} "
            "(flax's names)."
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
    """``(feature axes, reduction axes, feature shape)`` of ``x`` for the feature ``axis`` (called ``name``)."""
    features = canonicalize_axes(x.ndim, axis, name)
    reduction = tuple(i for i in range(x.ndim) if i not in features)
    return features, reduction, tuple(x.shape[i] for i in features)


def compute_dtype(x: jax.Array, dtype: Any) -> Any:
    """The dtype statistics and normalization are computed in: at least float32, never below ``x`` or ``dtype``."""
    requested = x.dtype if dtype is None else jnp.promote_types(x.dtype, dtype)
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(requested, jnp.float32))


def output_dtype(x: jax.Array, params: Mapping[str, Any], dtype: Any) -> Any:
    """flax's rule: the requested ``dtype``, else the promotion of the input and the parameters."""
    if dtype is not None:
        return jax.dtypes.canonicalize_dtype(dtype)
    return jnp.result_type(x, *params.values())


def feature_shape(x: Any, axes: Any, name: str = "axis") -> tuple[int, ...]:
    """The sizes of ``x`` along the feature ``axes`` (the argument ``name``): the shape of its parameters."""
    x = x if hasattr(x, "shape") and hasattr(x, "ndim") else jnp.asarray(x)
    return feature_axes(x, axes, name)[2]


def check_variable_size(value: Any, size: int, name: str, owner: str) -> None:
    """Raises unless the stored variable ``value`` (called ``name``) holds ``size`` values, one per feature.

    A variable of another size comes from another layer or model (a checkpoint
    of a different network, state merged into the wrong module).
    """
    shape = tuple(np.shape(value))
    if int(np.prod(shape)) != size:
        raise ValueError(
            f"{owner}: {name} has shape {shape}, but this layer has {size} features: it comes from another "
            "layer or model (a checkpoint or state of a different network?). Restore the variables of this "
            "layer, or build the layer with the number of features the variables were created with."
        )
