"""The passes over the activation tensor: the normalization and the training step, a
``jax.custom_jvp`` whose transposed tangent is the hand-written backward (``docs/internals.md``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import stats


def finite_outside_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with masked-out non-finite values replaced by 0 (padding must not leak NaN)."""
    if mask is None:
        return x
    keep = mask | jnp.isfinite(x)
    return _kept_bits(x, keep) if jnp.dtype(x.dtype).itemsize == 2 else jnp.where(keep, x, 0)


@jax.custom_jvp
def _kept_bits(x: jax.Array, keep: jax.Array) -> jax.Array:
    """``where(keep, x, 0)`` of a 16-bit float ``x``, selected on its bits: a select of half-precision
    values whose readers compute in float32 was written as float32 (XLA moved their cast before it:
    2S more in a masked bfloat16 backward, RESULTS.md, thirteenth); its derivative ``where(keep,
    dx, 0)``."""
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    return lax.bitcast_convert_type(jnp.where(keep, bits, jnp.uint16(0)), x.dtype)


@_kept_bits.defjvp
def _kept_bits_jvp(primals, tangents):
    x, keep = primals
    return _kept_bits(x, keep), jnp.where(keep, tangents[0], 0)


@jax.custom_jvp
def inverse_sqrt(v: jax.Array) -> jax.Array:
    """``rsqrt(v)``, whose derivative keeps its precision for large ``v`` and is 0 at ``v = inf``
    (autodiff's ``-rsqrt(v) / v / 2`` underflows in float32 above ~1e25, and is NaN at inf)."""
    return lax.rsqrt(v)


@inverse_sqrt.defjvp
def _inverse_sqrt_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    out = lax.rsqrt(v)
    # -rsqrt(v)^3 dv / 2, one factor at a time: each intermediate stays near dv's scale over std's
    d_out = (-0.5 * (out * (out * (out * dv)))).astype(out.dtype)
    return out, lax.select(out == 0, jnp.zeros_like(d_out), d_out)


def affine_normalize(
    x, shift, var, params, reduction_axes, epsilon, compute_dtype, out_dtype, mask=None, offset=None
) -> jax.Array:
    """``((x - shift) - offset) * rsqrt(var + epsilon) * scale + bias`` over ``reduction_axes``
    (``offset``: the mean minus the shift, if given) in one pass, the per-feature factors computed
    once (:func:`jaxbn.stats.computed_once`); masked-out non-finite elements count as 0."""
    expand = lambda v: jnp.expand_dims(jnp.asarray(v, compute_dtype), reduction_axes)
    multiplier = inverse_sqrt(jnp.asarray(var, compute_dtype) + epsilon)
    beyond = multiplier == 0  # a variance beyond the dtype: centred on 0, the output is the bias
    shift = jnp.where(beyond, 0, shift)
    offset = None if offset is None else jnp.where(beyond, 0, offset)
    if "scale" in params:
        multiplier = multiplier * jnp.asarray(params["scale"], compute_dtype)
    shift, offset, multiplier = stats.computed_once(shift, offset, multiplier)
    y = finite_outside_mask(x, mask).astype(compute_dtype) - expand(shift)
    if offset is not None:
        y = y - expand(offset)
    y = y * expand(multiplier)
    if "bias" in params:
        y = y + expand(params["bias"])
    return y.astype(out_dtype)


def corrected_affine(r: jax.Array, d: jax.Array, scale, bias, dtype) -> tuple:
    """Batch renorm's ``(r, d)`` folded into the affine parameters: scale ``γ r``, bias ``γ d + β``."""
    if scale is not None:
        r, d = scale.astype(dtype) * r, scale.astype(dtype) * d
    return r, d if bias is None else d + bias.astype(dtype)


def fill_empty_features(batch: stats.Moments, running_mean, running_var) -> stats.Moments:
    """``batch`` with features without a valid element taking the (finite) running statistics."""
    empty = batch.count == 0
    sharding = stats.explicit_sharding(batch.mean)  # (a select takes one sharding)
    running_mean, running_var = (stats.sharded_as(v, sharding) for v in (running_mean, running_var))
    mean = jnp.where(jnp.isfinite(running_mean), running_mean, 0).astype(batch.mean.dtype)
    var = jnp.where(jnp.isfinite(running_var) & (running_var >= 0), running_var, 1)
    var = var.astype(batch.var.dtype)
    filled = jnp.where(empty, mean, batch.mean), jnp.where(empty, var, batch.var)
    offset = jnp.where(empty, mean - batch.shift, batch.mean_minus_shift)
    return batch._replace(mean=filled[0], var=filled[1], mean_minus_shift=offset)


_RESIDUAL = "jaxbn_train_step"  # the per-feature values reverse mode saves (besides x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _train(x, scale, bias, outer_scale, outer_bias, plan: stats.Plan, inputs: tuple):
    """``(y, batch Moments, centre)``: ``x`` normalized with its batch statistics over
    ``plan.axes``, ``* scale + bias`` (per feature), ``* outer_scale + outer_bias``
    (broadcasting), and the centre it was normalized around (see below). ``inputs``:
    ``(shift, epsilon, mask, running_mean, running_var, args)``, the running statistics for empty
    features; ``plan.correction(batch, *inputs[3:5], epsilon, *args)`` gives ``(r, d)``, if set."""
    shift, epsilon, mask, running_mean, running_var, correction_args = inputs
    axes, dtype = plan.axes, plan.dtype
    shift = jnp.asarray(shift, dtype)
    # (where a feature's first element is not finite, its sums are not either: any finite K will do)
    fallback = (
        jnp.where(jnp.isfinite(shift), shift, 0) if mask is not None else jnp.zeros_like(shift)
    )
    count, shift, offset, var, mean = stats.batch_statistics(plan, x, mask, fallback)
    batch = stats.Moments(mean, var, count, shift, offset)
    if mask is not None or x.size == 0:  # only then can a feature be empty
        batch = fill_empty_features(batch, running_mean, running_var)
    # the centre: (K, mean - K), or (0, 0) where the variance is beyond the dtype (then rsqrt is 0
    # and x - K may overflow: centred on 0, the output is the bias); computed once with the rest
    # (the count only where it varies; K stays out, as in stats.moments)
    beyond = batch.var == np.inf
    zeroed = tuple(lax.select(beyond, jnp.zeros_like(v), v) for v in batch[3:])
    varies = mask is not None or plan.axis_name is not None
    rows = (batch.count if varies else None, batch.mean_minus_shift, batch.var, batch.mean)
    once, offset, var, mean, *centre = stats.computed_once(*rows, *zeroed)
    batch = stats.Moments(mean, var, batch.count if once is None else once, batch.shift, offset)
    if plan.correction is not None:  # batch norm with scale γ r and bias γ d + β
        r, d = plan.correction(batch, running_mean, running_var, epsilon, *correction_args)
        scale, bias = corrected_affine(r, d, scale, bias, dtype)
    multiplier = lax.rsqrt(var + epsilon)  # (inverse_sqrt's value)
    if scale is not None:
        multiplier = multiplier * jnp.asarray(scale, dtype)
    # (a plan's inner elements share their statistic: each value repeated along the last axis)
    shift, offset, multiplier = (
        jnp.expand_dims(jnp.repeat(v, plan.inner, -1) if plan.inner > 1 else v, axes)
        for v in (*centre, multiplier)
    )
    values = x if mask is None else jnp.where(mask | jnp.isfinite(x), x, 0)  # no masked-out NaN
    y = ((values.astype(dtype) - shift) - offset) * multiplier
    if bias is not None:
        y = y + jnp.expand_dims(jnp.asarray(bias, dtype), axes)
    if outer_scale is not None:
        y = y * outer_scale
    if outer_bias is not None:
        y = y + outer_bias
    return y.astype(plan.out_dtype), batch, tuple(centre)


@_train.defjvp
def _train_jvp(plan: stats.Plan, primals, tangents):
    """The step's derivative ``dy = G dx + A + x̂ B`` (``docs/internals.md``, section 3), linear in
    the tangents, its transpose the hand-written backward; outer parameters multiply every term
    and add ``z dγ' + dβ'``."""
    x, scale, bias, outer_scale, outer_bias, inputs = primals
    dx, dscale, dbias, douter_scale, douter_bias, _ = tangents
    _, epsilon, mask, running_mean, running_var, correction_args = inputs
    axes, dtype = plan.axes, plan.dtype
    y, batch, centre_out = _train(x, scale, bias, outer_scale, outer_bias, plan, inputs)

    # the residuals: the batch statistics and the forward's centre (per feature, as the forward
    # computed them: no second select); all else is recomputed from them and x
    name = functools.partial(checkpoint_name, name=_RESIDUAL)
    batch, (centre, centre_offset) = jax.tree_util.tree_map(name, (batch, centre_out))
    inv_std = inverse_sqrt(batch.var + epsilon)
    beyond = inv_std == 0
    r = d = None
    gain = inv_std if scale is None else inv_std * scale.astype(dtype)
    if plan.correction is not None:
        r, d = plan.correction(batch, running_mean, running_var, epsilon, *correction_args)
        gain = gain * r
    n = jnp.maximum(batch.count, 1)
    zero = jnp.zeros_like(inv_std)
    std = lax.select(beyond, zero, 1 / lax.select(beyond, jnp.ones_like(inv_std), inv_std))
    broadcast: Callable[[jax.Array], jax.Array] = functools.partial(  # (one operation, as in stats)
        lax.broadcast_in_dim,
        shape=x.shape,
        broadcast_dimensions=tuple(i for i in range(x.ndim) if i not in axes),
        out_sharding=stats.explicit_sharding(x),
    )
    expand = lambda v: jnp.expand_dims(v, axes)
    if plan.inner > 1:  # a statistic's value for each of its inner elements of the last axis
        spread = broadcast
        broadcast = lambda v: spread(jnp.repeat(v, plan.inner, -1))
        expand = lambda v: jnp.expand_dims(jnp.repeat(v, plan.inner, -1), axes)
    dx = dx.astype(dtype)  # once: a half-precision cotangent is rounded once, at the end
    # x̂ itself, not (x - K) and 1/σ: the transpose's dx pass multiplies x̂ by a per-feature factor
    # of dy's scale (a factor 1/σ² would underflow for σ beyond ~1e13 in float32)
    x_hat = finite_outside_mask(x, mask).astype(dtype) - broadcast(centre)
    x_hat = (x_hat - broadcast(centre_offset)) * broadcast(inv_std)
    valid_dx = dx if mask is None else jnp.where(mask, dx, 0)
    local = [jnp.sum(valid_dx, axes), jnp.sum(x_hat * valid_dx, axes)]
    if plan.inner > 1:  # each statistic's partial sums added
        local = [jnp.sum(v.reshape(*v.shape[:-1], -1, plan.inner), -1) for v in local]
    sum_dx, sum_dx_xhat = stats.cross_device_sum(local, plan.axis_name, plan.axis_index_groups)
    a = -gain * sum_dx / n
    b = -gain * sum_dx_xhat / n
    if dscale is not None and scale is not None:
        dscale = dscale.astype(dtype)
        a = a if d is None else a + d * dscale
        b = b + (dscale if r is None else r * dscale)
    if dbias is not None and bias is not None:
        a = a + dbias.astype(dtype)
    # x̂ b = (x - K) (b / σ) - (μ - K) b / σ, around x̂'s centre: (0, 0) where the variance is
    # beyond the dtype, where x - K may overflow (a forward-mode tangent inf * 0) and b is 0,
    # selected (so is Σ dy x for an infinite x); the centre through XLA:CPU's barrier with x, so
    # that the library reduction of Σ dy (x - K) reads it as a vector (not a full-size select)
    b = lax.select(beyond, zero, inv_std * b)
    a = a - centre_offset * b
    # one cast to x's varying mesh axes (checked shard_map with replicated parameters), so that
    # the transpose sums both per-feature cotangents in one collective
    if stats.varying_axes(x_hat) - (stats.varying_axes(a) & stats.varying_axes(b)):
        a, b = stats.varying_like(jnp.stack([a, b]), x_hat)
    # the transpose's Σ dy (x - K) reads its own view of x, and each of its sums its own view of
    # dy (a barrier transposes to one on the cotangent): no float32 copy of a half-precision dy
    # (the views in the compute dtype instead: a measuring variant, see stats)
    wide = stats.barrier_views_in_compute_dtype
    x_view, centre = stats.cpu_barrier(x.astype(dtype) if wide else x, centre)
    centered_view = finite_outside_mask(x_view, mask).astype(dtype) - broadcast(centre)
    out = y.dtype
    barred = dtype if wide else out  # the dtype of the terms that pass a barrier
    # expanded, the outer scale folded in: small, broadcast where it is used
    per_feature = lambda v: broadcast(v) if outer_scale is None else expand(v) * outer_scale
    (dy_b,) = stats.cpu_barrier((centered_view * per_feature(b)).astype(barred))
    # (broadcast, then cast: the transpose sums a float32 cotangent)
    # (with dy_b's sharding: a replicated broadcast would transpose to an all-gather of dy)
    like_dy = functools.partial(
        jnp.broadcast_to, shape=dy_b.shape, out_sharding=stats.explicit_sharding(dy_b)
    )
    (dy_ab,) = stats.cpu_barrier(like_dy(per_feature(a)).astype(barred) + dy_b)
    if douter_bias is not None and outer_bias is not None:
        outer_bias_term = like_dy(douter_bias.astype(dtype)).astype(barred)
        (dy_ab,) = stats.cpu_barrier(outer_bias_term + dy_ab)
    if douter_scale is not None and outer_scale is not None:  # (no inner parameters then: z = x̂)
        # x̂ dγ' as ((x - K) - (μ - K)) (dγ' / σ) around x̂'s centre, the per-feature product
        # small; 0 where the variance is beyond the dtype, selected (a sum of dy x may be infinite
        # there, for an infinite x). Its own view of x and of the centre (as vectors: no
        # full-size copy of the centred values on XLA:CPU).
        x_view, centre, centre_offset = stats.cpu_barrier(x_view, centre, centre_offset)
        centered = finite_outside_mask(x_view, mask).astype(dtype) - broadcast(centre)
        centered = centered - broadcast(centre_offset)
        small = jnp.where(expand(beyond), 0, expand(inv_std) * douter_scale.astype(dtype))
        (dy_ab,) = stats.cpu_barrier((centered * small).astype(barred) + dy_ab)
    dy = (per_feature(gain) * dx).astype(out) + dy_ab.astype(out)
    mean_tangent = (sum_dx / n).astype(batch.mean.dtype)  # (mean_minus_shift's dtype too)
    var_tangent = (2 * std * sum_dx_xhat / n).astype(batch.var.dtype)
    zeros = jnp.zeros_like(batch.count), jnp.zeros_like(batch.shift)
    batch_tangent = stats.Moments(mean_tangent, var_tangent, *zeros, mean_tangent)
    # (K is constant; μ - K moves with the mean, but not where the centre is 0)
    centre_tangent = (zeros[1], lax.select(beyond, zero, mean_tangent.astype(zero.dtype)))
    return (y, batch, centre_out), (dy, batch_tangent, centre_tangent)


# Reverse mode keeps x and the named per-feature values, and recomputes x - K in the backward.
_policy = jax.checkpoint_policies.save_only_these_names(_RESIDUAL)
_step = jax.checkpoint(_train, static_argnums=(5,), prevent_cse=False, policy=_policy)


@functools.partial(jax.jit, static_argnums=(2,))
def batch_norm_train(x: jax.Array, params: Mapping, plan: stats.Plan, inputs: tuple) -> tuple:
    """Batch norm's training step: ``(y, batch Moments)`` (see ``_train``), differentiable in
    forward and reverse mode, to any order, in ``x`` and ``params`` (not in ``inputs``)."""
    inputs = jax.tree_util.tree_map(lax.stop_gradient, inputs)
    return _step(x, params.get("scale"), params.get("bias"), None, None, plan, inputs)[:2]


@functools.partial(jax.jit, static_argnums=(2,))
def normalize_then_affine_train(x, params: Mapping, plan: stats.Plan, epsilon, mask) -> jax.Array:
    """The training step without parameters of its own, then ``y * scale + bias`` with ``params``
    that broadcast to ``x`` (layer, group and instance norm: statistics per example, parameters per
    feature). A feature without a valid element has mean 0 and variance 0."""
    kept = [size for i, size in enumerate(x.shape) if i not in plan.axes]
    zeros = jnp.zeros([*kept[:-1], kept[-1] // plan.inner] if kept else kept, plan.dtype)
    inputs = jax.tree_util.tree_map(lax.stop_gradient, (zeros, epsilon, mask, zeros, zeros, ()))
    outer = [params.get("scale"), params.get("bias")]
    if sharding := stats.explicit_sharding(x):  # the parameters split as the features they meet:
        # a replicated one made y * scale replicated too, and its transpose all-gathered dy
        spec = stats.axis_parts(sharding, x.ndim)
        for k, value in enumerate(outer):
            if value is not None:
                parts = [
                    spec[x.ndim - value.ndim + j] if n == x.shape[x.ndim - value.ndim + j] else None
                    for j, n in enumerate(value.shape)
                ]
                outer[k] = stats.sharded_as(value, NamedSharding(sharding.mesh, P(*parts)))
    return _step(x, None, None, *outer, plan, inputs)[0]
