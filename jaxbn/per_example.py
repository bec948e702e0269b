"""Layer, RMS, group and instance normalization on batch norm's statistics path, with flax.linen's
semantics: statistics per example (no running state), parameters per feature."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _train_step, _validation, stats

__all__ = ["group_norm", "instance_norm", "layer_norm", "rms_norm"]

Params = Mapping[str, jax.Array]
Axes = int | Sequence[int]
Groups = Sequence[Sequence[int]] | None


def _normalize(kind: str, arguments: dict[str, Any]) -> jax.Array:
    """The ``kind`` of norm of its ``arguments``: batch norm's training step over the norm's axes,
    then ``y * scale + bias``; for RMS norm (``E[|x|^2] = var + |mean|^2``) and complex ``x``,
    :func:`jaxbn._train_step.affine_normalize` differentiated by JAX."""
    x, params, plan, mask = _validation.check_per_example(kind, **arguments)
    epsilon, axes, compute, out = arguments["epsilon"], plan.axes, plan.dtype, plan.out_dtype
    grouped = kind == "group_norm" and plan.inner == 1  # (x split into groups: merged after)
    shape = x.shape[:-2] + (x.shape[-2] * x.shape[-1],) if grouped else x.shape
    if not axes:  # instance norm without a spatial axis: x - x in the compute dtype, the bias
        wide, zero = x.astype(compute), jnp.zeros((), jnp.float32)
        return _train_step.affine_normalize(wide, wide, zero, params, (), epsilon, compute, out)
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
        zeros = jnp.zeros(tuple(n for i, n in enumerate(x.shape) if i not in axes), compute)
        source = None if narrow is x else jax.lax.stop_gradient(narrow)
        batch = stats.batch_moments(plan, x, mask, zeros, source)
        if kind != "rms_norm":
            shift, offset, var = batch.shift, batch.mean_minus_shift, batch.var
            shift, offset, var = (jnp.expand_dims(v, axes) for v in (shift, offset, var))
        else:  # statistics around 0 (the plan's centred is False): var is E[|x|^2]
            shift, offset = jnp.zeros((), compute), None
            var = jnp.expand_dims(batch.var, axes)
        # Normalized first, then scaled: autodiff's scale gradient is then sum(dy * x_hat), 0 where
        # the variance is beyond the dtype (sum(dy * (x - mean)) * 0 would be inf * 0 = NaN).
        y = _train_step.affine_normalize(
            x, shift, var, {}, (), epsilon, compute, compute, mask, offset
        )
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
    axis_index_groups: Groups = None,
    dtype: Any = None,
) -> jax.Array:
    r"""Layer normalization (Ba et al., 2016), as :class:`flax.linen.LayerNorm`: ``y = (x - E[x])
    / sqrt(Var[x] + epsilon) * scale + bias``, the statistics per example over ``reduction_axes``
    (:func:`jaxbn.moments`), the parameters of the ``feature_axes``' shape.

    Args:
      x: floating or complex input (complex: real variance ``E[|x - E[x]|^2]``).
      params: ``{'scale', 'bias'}``, each optional, of the ``feature_axes`` sizes.
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes scale and bias vary along.
      epsilon: > 0, added to the variance.
      mask: optional boolean array broadcastable to ``x``: the elements the statistics count.
      axis_name: device axis name(s) to reduce over as well; None under plain ``jit``.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: output dtype; default: the promotion of ``x`` and the params (flax's rule).

    Raises:
      TypeError: an argument of the wrong type or dtype (``docs/errors.md`` lists them).
      ValueError: an argument of the wrong value or shape.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 3.0], [10.0, 30.0]])
    >>> layer_norm(x, {'scale': jnp.array([1.0, 2.0])}, epsilon=1e-12)
    Array([[-1.,  2.],
           [-1.,  2.]], dtype=float32)
    """
    return _normalize("layer_norm", locals())


def rms_norm(
    x: jax.Array,
    params: Params | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Groups = None,
    dtype: Any = None,
) -> jax.Array:
    r"""RMS normalization (Zhang & Sennrich, 2019), as :class:`flax.linen.RMSNorm`: ``y = x /
    sqrt(E[x^2] + epsilon) * scale`` per example over ``reduction_axes``, ``E[x^2]`` a sum of
    squares on the statistics' path of :func:`jaxbn.moments` (one pass over ``x``, no mean).
    ``mask``, ``axis_name``, ``axis_index_groups`` and ``dtype`` are as in :func:`layer_norm`.

    Args:
      x: floating or complex input (complex: ``E[|x|^2]``).
      params: ``{'scale'}`` (optional) of the ``feature_axes`` sizes.
      reduction_axes: the axes the mean square is taken over.
      feature_axes: the axes scale varies along.
      epsilon: > 0, added to the mean square.

    Raises:
      TypeError: an argument of the wrong type or dtype (``docs/errors.md`` lists them).
      ValueError: an argument of the wrong value or shape.

    >>> import jax.numpy as jnp
    >>> rms_norm(jnp.array([[3.0, -4.0, 0.0, 0.0]]), epsilon=1e-12)
    Array([[ 1.2, -1.6,  0. ,  0. ]], dtype=float32)
    """
    return _normalize("rms_norm", locals())


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
    axis_index_groups: Groups = None,
    dtype: Any = None,
) -> jax.Array:
    r"""Group normalization (Wu & He, 2018), as :class:`flax.linen.GroupNorm`: the channels, last,
    split into consecutive groups, each normalized per example over its channels and the other
    ``reduction_axes``, then scaled and shifted per channel. ``epsilon``, ``mask``, ``axis_name``,
    ``axis_index_groups`` and ``dtype`` are as in :func:`layer_norm`.

    Args:
      x: floating or complex input ``(batch, ..., C)``.
      params: ``{'scale', 'bias'}``, each optional, of shape ``(C,)``.
      num_groups: the number of groups, dividing ``C``; None when ``group_size`` is given.
      group_size: the channels per group, instead of ``num_groups``.
      reduction_axes: the axes of the statistics, the last among them (default: all but 0).

    Raises:
      TypeError: an argument of the wrong type or dtype (``docs/errors.md`` lists them).
      ValueError: an argument of the wrong value or shape, or groups that do not divide ``C``.

    >>> import jax.numpy as jnp
    >>> group_norm(jnp.array([[1.0, 3.0, 10.0, 30.0]]), num_groups=2, epsilon=1e-12)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
    """
    return _normalize("group_norm", locals())


def instance_norm(
    x: jax.Array,
    params: Params | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Groups = None,
    dtype: Any = None,
) -> jax.Array:
    r"""Instance normalization (Ulyanov et al., 2016), as :class:`flax.linen.InstanceNorm`: each
    example (the first axis) and feature normalized over the other (spatial) axes, then scaled
    and shifted per feature. ``epsilon``, ``mask``, ``axis_name``, ``axis_index_groups`` and
    ``dtype`` are as in :func:`layer_norm`.

    Args:
      x: floating or complex input ``(batch, ...)``; without a spatial axis the output is the bias
        (with a :class:`jaxbn.DegenerateBatchWarning`).
      params: ``{'scale', 'bias'}``, each optional, of the ``feature_axes`` sizes.
      feature_axes: the channel axes (not 0): ``-1`` for NHWC, ``1`` for NCHW.

    Raises:
      TypeError: an argument of the wrong type or dtype (``docs/errors.md`` lists them).
      ValueError: an argument of the wrong value or shape.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (batch 1, length 2, channels 2)
    >>> instance_norm(x, epsilon=1e-12)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
    """
    return _normalize("instance_norm", locals())
