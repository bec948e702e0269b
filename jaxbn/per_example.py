"""Layer, RMS, group and instance normalization on the one statistics path.

Each function here only chooses axes: its statistics come from
:func:`jaxbn.stats.moments` (count-weighted, masked, at least float32,
stable at large offsets, one collective with ``axis_name``), through
:func:`_normalize_over`. Layer, group and instance norm of real input run
batch norm's training step over their axes, with the parameters outside it
(:func:`jaxbn._train_step.normalize_then_affine_train`): its hand-written
backward reads a half-precision ``x`` in its own dtype and rounds ``dx``
once; RMS norm and complex input normalize with
:func:`jaxbn._train_step.affine_normalize` and JAX's autodiff.
Semantics, defaults and parameter shapes are flax.linen's
(``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm``); the Flax
modules in :mod:`jaxbn.linen` own the parameters and call these functions.

Unlike batch norm, these statistics are per example, so a NaN or Inf in one
example leaves every other example's output finite, and there is no running
state.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _train_step, _validation, stats

__all__ = ["layer_norm", "rms_norm", "group_norm", "instance_norm"]

Params = Mapping[str, jax.Array]
Axes = int | Sequence[int]

_PARAM_KEYS = ("scale", "bias")


def _checked_params(
    x: Any, params: Params | None, allowed: Sequence[str], feature_axes: tuple[int, ...], epsilon: Any, dtype: Any
) -> dict[str, Any]:
    """The checks every function here shares; returns the validated params."""
    _validation.check_epsilon(epsilon, _validation.compute_dtype(x, dtype))
    _validation.check_output_dtype(x.dtype, dtype)
    feature_shape = tuple(x.shape[i] for i in feature_axes)
    return _validation.check_feature_arrays(params, allowed, (), feature_shape, "params")


def _normalize_over(
    name: str,
    x: jax.Array,
    params: dict[str, Any],
    reduction_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    *,
    epsilon: float,
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
    dtype: Any,
    center: bool = True,
    out_shape: tuple[int, ...] | None = None,
) -> jax.Array:
    """``moments`` over ``reduction_axes``, then one ``affine_normalize`` pass; for layer, group and
    instance norm of real ``x``, batch norm's training step over those axes, without parameters, then
    the parameters (:func:`jaxbn._train_step.normalize_then_affine_train`).

    The statistics keep their reduced axes as size 1 and ``params`` are
    reshaped to ``x``'s rank (size 1 off ``feature_axes``), so the kernel's
    broadcasting needs no axes of its own: features and statistics may lie on
    different axes (layer norm's scale is per feature, its statistics per
    example). The output has flax's dtype (the requested one, else the
    promotion of ``x`` and the params) and is reshaped to ``out_shape`` if
    given. ``center=False`` is RMS normalization: the divisor is
    ``E[|x|^2] = var + |mean|^2``, a sum of non-negative terms (no cancellation;
    ``var`` itself is the shifted, stable one), and nothing is subtracted.
    Complex ``x`` works throughout (complex mean, real variance ``E|x - mu|^2``,
    as in :func:`jaxbn.stats.moments`); on the ``moments`` path (RMS norm, complex ``x``) gradients
    are JAX's autodiff.
    """
    compute_dtype = _validation.compute_dtype(x, dtype)
    out_dtype = _validation.output_dtype(x, params, dtype)
    if mask is not None:
        mask = _validation.check_mask(mask, x.shape)
    broadcast_shape = tuple(x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
    params = {key: jnp.reshape(value, broadcast_shape) for key, value in params.items()}
    if center and not jnp.iscomplexobj(x):
        # batch norm's step: its backward reads x in its own dtype (no float32 copy of a half-precision x)
        # and sums the gradient's paths in the compute dtype, rounding dx once
        groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
        config = _train_step.StepConfig(reduction_axes, axis_name, groups, jnp.dtype(compute_dtype),
                                        jnp.dtype(out_dtype))
        with jax.named_scope(f"jaxbn.{name}"):
            params = {key: jnp.asarray(value, compute_dtype) for key, value in params.items()}
            y = _train_step.normalize_then_affine_train(x, params, config, jnp.asarray(epsilon, compute_dtype), mask)
        return y if out_shape is None else y.reshape(out_shape)
    # One cast up front: the gradient's paths (through the statistics and the normalization) then
    # meet in the compute dtype and round to x's dtype once; cast separately, a float16/bfloat16
    # cotangent would sum cancelling terms in half precision. The statistics read the narrow x.
    narrow, x = x, x.astype(compute_dtype)
    with jax.named_scope(f"jaxbn.{name}"):
        batch = stats.moments(
            x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
            dtype=compute_dtype, source=None if narrow is x else narrow,
        )
        keep = functools.partial(jnp.expand_dims, axis=reduction_axes)
        if center:
            shift, mean_minus_shift, var = keep(batch.shift), keep(batch.mean_minus_shift), keep(batch.var)
        else:
            shift, mean_minus_shift = jnp.zeros((), compute_dtype), None
            var = keep(batch.var + stats.abs_square(batch.mean))  # E[|x|^2], real for complex x
        # Normalized first, then scaled: autodiff's scale gradient is then sum(dy * x_hat), which is
        # 0 where the variance is beyond the dtype (sum(dy * (x - mean)) * 0 would be inf * 0 = NaN).
        y = _train_step.affine_normalize(
            x, shift, mean_minus_shift, var, {}, (), epsilon, compute_dtype, compute_dtype, mask
        )
        if "scale" in params:
            y = y * jnp.asarray(params["scale"], compute_dtype)
        if "bias" in params:
            y = y + jnp.asarray(params["bias"], compute_dtype)
    y = y.astype(out_dtype)
    return y if out_shape is None else y.reshape(out_shape)


def layer_norm(
    x: jax.Array,
    params: Params | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
) -> jax.Array:
    r"""Layer normalization (Ba et al., 2016), as :class:`flax.linen.LayerNorm`.

    Statistics are taken per example over ``reduction_axes``; ``scale`` (γ)
    and ``bias`` (β) have the shape of ``feature_axes`` and broadcast along
    every other axis:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The variance is the stable, shifted one of :func:`jaxbn.stats.moments`
    (flax's default ``E[x^2] - E[x]^2`` loses it at large offsets).

    Args:
      x: floating or complex input; bfloat16/float16 statistics are computed
        in float32. For complex ``x`` the mean is complex and the variance
        the real ``E[|x - E[x]|^2]`` (as flax).
      params: ``{'scale', 'bias'}``, each optional, of the ``feature_axes``
        sizes; None or ``{}`` for neither.
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes scale and bias vary along.
      epsilon: > 0, added to the variance.
      mask: optional boolean array broadcastable to ``x``: the elements that
        count towards the statistics (all elements are normalized).
      axis_name: device axis name(s) to reduce over as well (the features
        sharded over ``pmap``/``shard_map``); None under plain ``jit``.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: output dtype (and minimum statistics dtype); default: the
        promotion of ``x`` and the params (flax's rule).

    Returns:
      The normalized array, shaped as ``x``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 3.0], [10.0, 30.0]])
    >>> layer_norm(x, {'scale': jnp.array([1.0, 2.0])}, epsilon=1e-12)
    Array([[-1.,  2.],
           [-1.,  2.]], dtype=float32)
    >>> layer_norm(jnp.array([[1 + 1j, 3 - 1j]]), epsilon=1e-12)  # mean 2, E|x - 2|^2 = 2
    Array([[-0.70710677+0.70710677j,  0.70710677-0.70710677j]], dtype=complex64)
    """
    x = _validation.check_inexact(x)
    reduction = _validation.canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
    features = _validation.canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    params = _checked_params(x, params, _PARAM_KEYS, features, epsilon, dtype)
    return _normalize_over(
        "layer_norm",
        x, params, reduction, features, epsilon=epsilon, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype,
    )


def rms_norm(
    x: jax.Array,
    params: Params | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
) -> jax.Array:
    r"""RMS normalization (Zhang & Sennrich, 2019), as :class:`flax.linen.RMSNorm`.

    No re-centering and no bias: per example, over ``reduction_axes``,

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \gamma

    with γ (``scale``) of the ``feature_axes`` shape. ``E[x^2]`` is taken from
    :func:`jaxbn.stats.moments` as ``var + mean^2``: both terms are
    non-negative, so the sum is exact to rounding (no cancellation), and it
    shares the one statistics path (masks, counts, devices, float32).

    Args:
      x: floating or complex input; bfloat16/float16 statistics are computed
        in float32. For complex ``x`` the mean square is ``E[|x|^2]``.
      params: ``{'scale'}`` (optional) of the ``feature_axes`` sizes; None or
        ``{}`` for none.
      reduction_axes: the axes the mean square is taken over.
      feature_axes: the axes scale varies along.
      epsilon: > 0, added to the mean square.
      mask: optional boolean array broadcastable to ``x``: the elements that
        count towards the mean square.
      axis_name: device axis name(s) to reduce over as well.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: output dtype; default: the promotion of ``x`` and the scale.

    Returns:
      The normalized array, shaped as ``x``.

    >>> import jax.numpy as jnp
    >>> rms_norm(jnp.array([[3.0, -4.0, 0.0, 0.0]]), epsilon=1e-12)
    Array([[ 1.2, -1.6,  0. ,  0. ]], dtype=float32)
    >>> rms_norm(jnp.array([[3j, -4.0, 0.0, 0.0]]), epsilon=1e-12)  # E|x|^2 = 25/4
    Array([[ 0. +1.2j, -1.6+0.j ,  0. +0.j ,  0. +0.j ]], dtype=complex64)
    """
    x = _validation.check_inexact(x)
    reduction = _validation.canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
    features = _validation.canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    params = _checked_params(x, params, ("scale",), features, epsilon, dtype)
    return _normalize_over(
        "rms_norm",
        x, params, reduction, features, epsilon=epsilon, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype, center=False,
    )


def number_of_groups(
    channels: int, num_groups: Any, group_size: Any, channels_are: str = "channels of the input (its last axis)"
) -> int:
    """flax GroupNorm's rule: exactly one of the two, dividing the channels (``channels_are`` says whose)."""
    num_groups = _validation.positive_int(num_groups, "num_groups", none_ok=True)
    group_size = _validation.positive_int(group_size, "group_size", none_ok=True)
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


def group_norm(
    x: jax.Array,
    params: Params | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
) -> jax.Array:
    r"""Group normalization (Wu & He, 2018), as :class:`flax.linen.GroupNorm`.

    Channels are last. They are split into ``G`` consecutive groups of
    ``C / G``; statistics are taken per example and per group over the
    group's channels and the other ``reduction_axes``:

    .. math::
        y_{\dots,c} = \frac{x_{\dots,c} - \mu_{g(c)}}{\sqrt{\sigma^2_{g(c)} + \epsilon}}
        \gamma_c + \beta_c

    with ``scale`` (γ) and ``bias`` (β) of shape ``(C,)``. ``num_groups=1`` is
    layer norm over all non-batch axes, ``group_size=1`` instance norm.

    Args:
      x: floating or complex input ``(batch, ..., C)`` (complex: complex
        mean, real variance ``E[|x - mu|^2]``).
      params: ``{'scale', 'bias'}``, each optional, of shape ``(C,)``.
      num_groups: the number of groups (flax's default 32); None when
        ``group_size`` is given. Must divide ``C``.
      group_size: the channels per group, instead of ``num_groups``.
      reduction_axes: the axes of the statistics; must include the last
        (channel) axis. Default: every axis but the first (the batch).
      epsilon: > 0, added to the variance.
      mask: optional boolean array broadcastable to ``x``: the elements that
        count towards the statistics.
      axis_name: device axis name(s) to reduce over as well.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: output dtype; default: the promotion of ``x`` and the params.

    Returns:
      The normalized array, shaped as ``x``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> group_norm(x, num_groups=2, epsilon=1e-12)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
    """
    x = _validation.check_inexact(x)
    _validation.canonicalize_axes(x.ndim, -1)  # a 0-d input has no channel axis: the shared message
    if reduction_axes is None:
        reduction = tuple(range(1, x.ndim)) or (0,)
    else:
        reduction = _validation.canonicalize_axes(x.ndim, reduction_axes, name="reduction_axes")
    if reduction[-1] != x.ndim - 1:
        raise ValueError(
            f"reduction_axes={reduction_axes!r} must include the last axis ({x.ndim - 1}, or -1) of "
            f"the input of shape {x.shape}: group norm takes channels last and reduces over each group."
        )
    channels = x.shape[-1]
    groups = number_of_groups(channels, num_groups, group_size)
    params = _checked_params(x, params, _PARAM_KEYS, (x.ndim - 1,), epsilon, dtype)
    grouped_shape = x.shape[:-1] + (groups, channels // groups)
    if mask is not None:
        mask = jnp.broadcast_to(_validation.check_mask(mask, x.shape), x.shape).reshape(grouped_shape)
    return _normalize_over(
        "group_norm",
        x.reshape(grouped_shape), params, reduction[:-1] + (x.ndim,), (x.ndim - 1, x.ndim),
        epsilon=epsilon, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
        dtype=dtype, out_shape=x.shape,
    )


def instance_norm(
    x: jax.Array,
    params: Params | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
) -> jax.Array:
    r"""Instance normalization (Ulyanov et al., 2016), as :class:`flax.linen.InstanceNorm`.

    Statistics per example (the first axis) and per feature, over every other
    axis (the spatial ones):

    .. math::
        y_{n,\dots,c} = \frac{x_{n,\dots,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}
        \gamma_c + \beta_c

    Args:
      x: floating or complex input ``(batch, ...)`` with at least one
        spatial axis (complex: complex mean, real variance ``E[|x - mu|^2]``).
      params: ``{'scale', 'bias'}``, each optional, of the ``feature_axes``
        sizes.
      feature_axes: the channel axes (not 0, the batch axis): ``-1`` for
        NHWC, ``1`` for NCHW.
      epsilon: > 0, added to the variance.
      mask: optional boolean array broadcastable to ``x``: the elements that
        count towards the statistics.
      axis_name: device axis name(s) to reduce over as well.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: output dtype; default: the promotion of ``x`` and the params.

    Returns:
      The normalized array, shaped as ``x``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (batch 1, length 2, channels 2)
    >>> instance_norm(x, epsilon=1e-12)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
    """
    x = _validation.check_inexact(x)
    features = _validation.canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    if 0 in features:
        raise ValueError(
            f"feature_axes={feature_axes!r} includes axis 0, which instance norm takes as the "
            f"batch axis (input shape {x.shape}); put the batch first and name the channel axes."
        )
    reduction = tuple(i for i in range(1, x.ndim) if i not in features)
    params = _checked_params(x, params, _PARAM_KEYS, features, epsilon, dtype)
    if not reduction:
        warnings.warn(
            f"instance_norm: an input of shape {x.shape} with feature_axes={feature_axes!r} has no "
            "spatial axis, so each value is its own mean: the output is the bias (as in flax).",
            _validation.DegenerateBatchWarning,
            stacklevel=2,
        )
        # x - x: exactly the bias, with flax's gradients (none into x or scale); in the compute
        # dtype, where the two cotangents cancel (in float16 they may be opposite infinities).
        broadcast_shape = tuple(x.shape[i] if i in features else 1 for i in range(x.ndim))
        params = {key: jnp.reshape(value, broadcast_shape) for key, value in params.items()}
        out_dtype, compute_dtype = _validation.output_dtype(x, params, dtype), _validation.compute_dtype(x, dtype)
        wide = x.astype(compute_dtype)
        return _train_step.affine_normalize(
            wide, wide, None, jnp.zeros((), jnp.float32), params, (), epsilon, compute_dtype, out_dtype,
        )
    return _normalize_over(
        "instance_norm",
        x, params, reduction, features, epsilon=epsilon, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype,
    )
