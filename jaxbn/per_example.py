"""Layer, RMS, group and instance normalization on batch norm's statistics path.

Each function here only chooses axes: its statistics are per example, so a NaN or Inf in one
example leaves every other example's output finite, and there is no running state. Semantics,
defaults and parameter shapes are flax.linen's; the Flax modules in :mod:`jaxbn.linen` own the
parameters and call these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _train_step, _validation, stats

__all__ = ["layer_norm", "rms_norm", "group_norm", "instance_norm"]

Params = Mapping[str, jax.Array]
Axes = int | Sequence[int]

number_of_groups = _validation.number_of_groups  # flax GroupNorm's rule (the Flax modules use it)


def _normalize(
    kind: str, x: Any, params: Any, reduction_axes: Any, feature_axes: Any, epsilon: Any, mask: Any,
    axis_name: Any, axis_index_groups: Any, dtype: Any, num_groups: Any = None, group_size: Any = None,
) -> jax.Array:
    """The ``kind`` of norm. Layer, group and instance norm of real ``x`` run batch norm's training
    step over their axes, then ``y * scale + bias``; RMS norm (``E[|x|^2] = var + |mean|^2``) and
    complex ``x`` normalize with :func:`jaxbn._train_step.affine_normalize` and JAX's autodiff."""
    x, params, axes, mask, groups, compute, out = _validation.check_per_example(
        kind, x, params, reduction_axes, feature_axes, epsilon, mask, dtype, axis_name,
        axis_index_groups, num_groups, group_size,
    )
    shape = x.shape[:-2] + (x.shape[-2] * x.shape[-1],) if kind == "group_norm" else x.shape
    if not axes:  # instance norm without a spatial axis: x - x in the compute dtype, the bias
        wide = x.astype(compute)
        return _train_step.affine_normalize(wide, wide, None, jnp.zeros((), jnp.float32), params, (),
                                            epsilon, compute, out)
    plan = stats.Plan(axes, jnp.dtype(compute), jnp.dtype(jnp.finfo(compute).dtype), axis_name,
                      groups, jnp.dtype(out))
    if kind != "rms_norm" and not jnp.iscomplexobj(x):
        with jax.named_scope(f"jaxbn.{kind}"):
            params = {key: jnp.asarray(value, compute) for key, value in params.items()}
            epsilon = jnp.asarray(epsilon, compute)
            y = _train_step.normalize_then_affine_train(x, params, plan, epsilon, mask)
        return y.reshape(shape)
    # One cast up front: the gradient's paths then meet in the compute dtype and round to x's dtype
    # once. The statistics read the narrow x.
    narrow, x = x, x.astype(compute)
    with jax.named_scope(f"jaxbn.{kind}"):
        feature_shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
        batch = stats.batch_moments(plan, x, mask, jnp.zeros(feature_shape, compute),
                                    None if narrow is x else jax.lax.stop_gradient(narrow))
        if kind != "rms_norm":
            shift, offset, var = batch.shift, batch.mean_minus_shift, batch.var
            shift, offset, var = (jnp.expand_dims(v, axes) for v in (shift, offset, var))
        else:  # E[|x|^2], real for complex x
            shift, offset = jnp.zeros((), compute), None
            var = jnp.expand_dims(batch.var + stats.abs_square(batch.mean), axes)
        # Normalized first, then scaled: autodiff's scale gradient is then sum(dy * x_hat), 0 where
        # the variance is beyond the dtype (sum(dy * (x - mean)) * 0 would be inf * 0 = NaN).
        y = _train_step.affine_normalize(x, shift, offset, var, {}, (), epsilon, compute, compute,
                                         mask)
        if "scale" in params:
            y = y * jnp.asarray(params["scale"], compute)
        if "bias" in params:
            y = y + jnp.asarray(params["bias"], compute)
    return y.astype(out).reshape(shape)


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

    Statistics per example over ``reduction_axes`` (the stable, shifted variance of
    :func:`jaxbn.moments`); ``scale`` (γ) and ``bias`` (β) have the ``feature_axes``' shape:

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Args:
      x: floating or complex input (complex: complex mean, real variance ``E[|x - E[x]|^2]``);
        half-precision statistics are computed in float32.
      params: ``{'scale', 'bias'}``, each optional, of the ``feature_axes`` sizes.
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes scale and bias vary along.
      epsilon: > 0, added to the variance.
      mask: optional boolean array broadcastable to ``x``: the elements that count towards
        the statistics (all are normalized).
      axis_name: device axis name(s) to reduce over as well; None under plain ``jit``.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: output dtype; default: the promotion of ``x`` and the params (flax's rule).

    Returns:
      The normalized array, shaped as ``x``.

    Raises:
      TypeError / ValueError: an argument that does not fit (``docs/errors.md``).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 3.0], [10.0, 30.0]])
    >>> layer_norm(x, {'scale': jnp.array([1.0, 2.0])}, epsilon=1e-12)
    Array([[-1.,  2.],
           [-1.,  2.]], dtype=float32)
    """
    return _normalize("layer_norm", x, params, reduction_axes, feature_axes, epsilon, mask,
                      axis_name, axis_index_groups, dtype)


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

    with γ (``scale``) of the ``feature_axes``' shape and ``E[x^2] = var + mean^2``, a sum of
    non-negative terms from :func:`jaxbn.moments`.

    Args:
      x: floating or complex input (complex: ``E[|x|^2]``).
      params: ``{'scale'}`` (optional) of the ``feature_axes`` sizes.
      reduction_axes: the axes the mean square is taken over.
      feature_axes: the axes scale varies along.
      epsilon: > 0, added to the mean square.
      mask: as in :func:`layer_norm`.
      axis_name: as in :func:`layer_norm`.
      axis_index_groups: as in :func:`layer_norm`.
      dtype: as in :func:`layer_norm`.

    Returns:
      The normalized array, shaped as ``x``.

    Raises:
      TypeError / ValueError: an argument that does not fit (``docs/errors.md``).

    >>> import jax.numpy as jnp
    >>> rms_norm(jnp.array([[3.0, -4.0, 0.0, 0.0]]), epsilon=1e-12)
    Array([[ 1.2, -1.6,  0. ,  0. ]], dtype=float32)
    """
    return _normalize("rms_norm", x, params, reduction_axes, feature_axes, epsilon, mask, axis_name,
                      axis_index_groups, dtype)


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

    Channels are last, split into ``G`` consecutive groups; statistics per example and per group
    over the group's channels and the other ``reduction_axes``:

    .. math::
        y_{\dots,c} = \frac{x_{\dots,c} - \mu_{g(c)}}{\sqrt{\sigma^2_{g(c)} + \epsilon}}
        \gamma_c + \beta_c

    ``num_groups=1`` is layer norm over all non-batch axes, ``group_size=1`` instance norm.

    Args:
      x: floating or complex input ``(batch, ..., C)``.
      params: ``{'scale', 'bias'}``, each optional, of shape ``(C,)``.
      num_groups: the number of groups (flax's default 32), dividing ``C``; None when
        ``group_size`` is given.
      group_size: the channels per group, instead of ``num_groups``.
      reduction_axes: the axes of the statistics, the last (channel) axis among them.
        Default: every axis but the first (the batch).
      epsilon: > 0, added to the variance.
      mask: as in :func:`layer_norm`.
      axis_name: as in :func:`layer_norm`.
      axis_index_groups: as in :func:`layer_norm`.
      dtype: as in :func:`layer_norm`.

    Returns:
      The normalized array, shaped as ``x``.

    Raises:
      TypeError / ValueError: an argument that does not fit (``docs/errors.md``).

    >>> import jax.numpy as jnp
    >>> group_norm(jnp.array([[1.0, 3.0, 10.0, 30.0]]), num_groups=2, epsilon=1e-12)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
    """
    return _normalize("group_norm", x, params, reduction_axes, None, epsilon, mask, axis_name,
                      axis_index_groups, dtype, num_groups, group_size)


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

    Statistics per example (the first axis) and per feature, over every other (spatial) axis:

    .. math::
        y_{n,\dots,c} = \frac{x_{n,\dots,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}
        \gamma_c + \beta_c

    Args:
      x: floating or complex input ``(batch, ...)`` with at least one spatial axis (without one
        the output is the bias, with a :class:`jaxbn.DegenerateBatchWarning`).
      params: ``{'scale', 'bias'}``, each optional, of the ``feature_axes`` sizes.
      feature_axes: the channel axes (not 0, the batch axis): ``-1`` for
        NHWC, ``1`` for NCHW.
      epsilon: > 0, added to the variance.
      mask: as in :func:`layer_norm`.
      axis_name: as in :func:`layer_norm`.
      axis_index_groups: as in :func:`layer_norm`.
      dtype: as in :func:`layer_norm`.

    Returns:
      The normalized array, shaped as ``x``.

    Raises:
      TypeError / ValueError: an argument that does not fit (``docs/errors.md``).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (batch 1, length 2, channels 2)
    >>> instance_norm(x, epsilon=1e-12)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
    """
    return _normalize("instance_norm", x, params, None, feature_axes, epsilon, mask, axis_name,
                      axis_index_groups, dtype)
