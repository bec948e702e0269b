"""Trace-time argument checks shared by every jaxbn function.

Each check runs while JAX traces, on static information only (shapes, dtypes,
Python hyperparameters), and raises a ``ValueError`` or ``TypeError`` that names
the argument, the value it got and what it expected. Traced hyperparameters (a
momentum computed inside ``jit``) cannot be checked and are let through.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _static_float(value: Any, name: str, expected: str) -> float | None:
    """``float(value)``, or None for a traced value that cannot be checked."""
    if isinstance(value, jax.core.Tracer):
        return None
    is_number = isinstance(value, numbers.Real) or (
        isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0
    )
    if not is_number or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}.")
    return float(value)


def check_momentum(momentum: Any) -> None:
    """Raises unless ``momentum`` lies in [0, 1] (flax's convention)."""
    value = _static_float(momentum, "momentum", "a real number in [0, 1]")
    if value is not None and not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"momentum must lie in [0, 1], got {value}. jaxbn follows flax's "
            "convention new = momentum * old + (1 - momentum) * batch, so the "
            "usual values are 0.9-0.999; a PyTorch momentum m corresponds to 1 - m."
        )


def check_static_bool(value: Any, name: str, *, none_ok: bool = False) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python bool (or None if ``none_ok``)."""
    if isinstance(value, bool) or (none_ok and value is None):
        return
    raise TypeError(
        f"{name} must be a Python bool{' or None' if none_ok else ''}, got {value!r}. It "
        "selects the code path at trace time; to switch inside jit, use lax.cond over two calls."
    )


def check_epsilon(epsilon: Any) -> None:
    """Raises unless ``epsilon`` is a finite number > 0."""
    value = _static_float(epsilon, "epsilon", "a positive real number")
    if value is not None and not (value > 0.0 and np.isfinite(value)):
        raise ValueError(
            f"epsilon must be a finite number > 0, got {value}: it is added to the "
            "variance before the inverse square root, so 0 divides by zero on a "
            "constant channel. The usual value is 1e-5."
        )


def check_floating(x: Any, name: str = "x") -> jax.typing.ArrayLike:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is floating."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = jnp.asarray(x)
        dtype = x.dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must have a real floating dtype here, got {dtype}: this function does not "
            "support complex input (moments, normalize, batch_norm, layer_norm, rms_norm, "
            "group_norm and instance_norm do)."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {dtype}. Cast it first, e.g. {name}.astype(jnp.float32)."
        )
    return x


def check_inexact(x: Any, name: str = "x") -> jax.typing.ArrayLike:
    """Returns ``x`` as an array, raising ``TypeError`` unless it is floating or complex."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = jnp.asarray(x)
        dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64) or "
            f"a complex one (complex64, complex128), got {dtype}. Cast it first, e.g. "
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


def canonicalize_axes(ndim: int, axis: Any, name: str = "axis") -> tuple[int, ...]:
    """Returns ``axis`` (an int or a sequence of ints) as sorted non-negative axes."""
    axes = (axis,) if not isinstance(axis, Sequence) else tuple(axis)
    if not axes:
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
        broadcast = np.broadcast_shapes(mask_shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"mask of shape {mask_shape} does not broadcast to the input shape "
            f"{tuple(shape)}. Give it the input's shape, or size 1 along the axes "
            "it does not vary over (e.g. (batch, 1, 1, 1) to mask whole examples)."
        )
    return jnp.asarray(mask).astype(bool)


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
        value_shape = tuple(np.shape(value))
        if key in scalars:
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
