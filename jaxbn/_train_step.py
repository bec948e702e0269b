"""The passes over the activation tensor: normalization and the batch-norm step's derivatives.

Batch norm is memory-bound, so what matters is how often the full tensor is
read and written. With S its size in bytes, the floor is 3S for the training
forward (statistics, then normalize), 5S for the backward (two reductions over
x and dy, then dx) and 2S for inference; the statistics take two passes (no
data-dependent control flow), and XLA:CPU reads x once per sum (5S / 11S). Autodiff of the forward does not get there: it saves or recomputes
full-size intermediates (x - mean, x̂, float32 copies of bfloat16 tensors).
:func:`batch_norm_train` is a ``jax.custom_jvp`` whose tangent is linear and
written so that JAX's transpose of it is the backward one would write by hand:
one pair of reductions (of dy and of dy (x - K)), one cross-device sum and one
elementwise pass. Under a ``jax.checkpoint`` that saves only the batch
statistics, reverse mode keeps ``x`` (in its own dtype) and per-feature
vectors; forward mode (``jvp``, ``jacfwd``, ``linearize``) works as well. The
step is one jitted function (static configuration): a model's layers of one
shape trace it once, and an eager call dispatches it once.

Layer, group and instance norm use the same step with outer parameters
(per feature, where their statistics are per example):
:func:`normalize_then_affine_train`.

Variants of the batch-statistics step (batch renormalization today) plug in
through :attr:`StepConfig.correction`: a per-feature ``(r, d)`` with
``y = γ (x̂ r + d) + β``, folded into the scale and bias, so a variant moves
exactly what batch norm moves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jaxbn import stats


def finite_outside_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with masked-out non-finite values replaced by 0 (padding must not leak NaN)."""
    return x if mask is None else jnp.where(mask | jnp.isfinite(x), x, 0)


@jax.custom_jvp
def inverse_sqrt(v: jax.Array) -> jax.Array:
    """``rsqrt(v)``, whose derivative keeps its precision for large ``v`` and is 0 at ``v = inf``.

    autodiff's ``-rsqrt(v) / v / 2`` underflows to 0 in float32 for ``v`` above ~1e25 (a
    standard deviation above ~4e12 then loses the variance's part of the gradient), and is
    ``0 * inf = NaN`` for a variance beyond the dtype. The forward is ``lax.rsqrt`` itself.
    """
    return lax.rsqrt(v)


@inverse_sqrt.defjvp
def _inverse_sqrt_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    out = lax.rsqrt(v)
    # -rsqrt(v)^3 dv / 2, one factor at a time: each intermediate stays near dv's scale over std's
    return out, jnp.where(out == 0, 0, -0.5 * (out * (out * (out * dv)))).astype(out.dtype)


def beyond_range_centered(inverse_std: jax.Array, shift: Any, mean_minus_shift: Any) -> tuple[Any, Any]:
    """``(shift, mean_minus_shift)``, both 0 where ``inverse_std`` is 0 (a variance beyond the dtype).

    There the normalized value is 0 and the output the bias; centring on 0 keeps
    an ``x - mean`` beyond the dtype (values of both signs near its maximum)
    from becoming ``inf * 0 = NaN``. Per-feature selects: no full-size pass.
    """
    beyond = inverse_std == 0
    shift = jnp.where(beyond, 0, shift)
    return shift, None if mean_minus_shift is None else jnp.where(beyond, 0, mean_minus_shift)


def affine_normalize(
    x: jax.Array,
    shift: jax.Array,
    mean_minus_shift: jax.Array | None,
    var: jax.Array,
    params: Mapping[str, jax.Array],
    reduction_axes: tuple[int, ...],
    epsilon: Any,
    compute_dtype: Any,
    out_dtype: Any,
    mask: jax.Array | None = None,
    per_feature_once: bool = True,
) -> jax.Array:
    """``((x - shift) - mean_minus_shift) * rsqrt(var + eps) * scale + bias``, one pass.

    With a ``mask``, masked-out non-finite elements are normalized as 0, so
    they reach neither the output nor any gradient. ``per_feature_once``: the
    per-feature factors are computed once (:func:`jaxbn.stats.computed_once`), not
    per element of the pass; the training step, whose statistics are computed once
    already, turns it off (fewer instructions, the same pass).
    """

    def expand(v):
        return jnp.expand_dims(jnp.asarray(v, compute_dtype), reduction_axes)

    multiplier = inverse_sqrt(jnp.asarray(var, compute_dtype) + epsilon)
    shift, mean_minus_shift = beyond_range_centered(multiplier, shift, mean_minus_shift)
    if "scale" in params:
        multiplier = multiplier * jnp.asarray(params["scale"], compute_dtype)
    if per_feature_once:
        shift, mean_minus_shift, multiplier = stats.computed_once(shift, mean_minus_shift, multiplier)
    y = finite_outside_mask(x, mask).astype(compute_dtype) - expand(shift)
    if mean_minus_shift is not None:
        y = y - expand(mean_minus_shift)
    y = y * expand(multiplier)
    if "bias" in params:
        y = y + expand(params["bias"])
    return y.astype(out_dtype)


def fill_empty_features(batch: stats.Moments, running_mean: jax.Array, running_var: jax.Array) -> stats.Moments:
    """``batch`` with features that had no valid element taking the running statistics.

    Such features are normalized as inference would normalize them (a
    non-finite running mean counts as 0, a non-finite or negative running
    variance as 1), and their statistics do not depend on ``x``.
    """
    empty = batch.count == 0
    mean = jnp.where(jnp.isfinite(running_mean), running_mean, 0).astype(batch.mean.dtype)
    var = jnp.where(jnp.isfinite(running_var) & (running_var >= 0), running_var, 1).astype(batch.var.dtype)
    return batch._replace(
        mean=jnp.where(empty, mean, batch.mean),
        var=jnp.where(empty, var, batch.var),
        mean_minus_shift=jnp.where(empty, mean - batch.shift, batch.mean_minus_shift),
    )


class StepConfig(NamedTuple):
    """Static configuration of one training step (hashable: the custom JVP's static argument).

    ``correction``, if set, is a batch-statistics variant:
    ``correction(batch, running_mean, running_var, epsilon, *correction_args)``
    returns per-feature ``(r, d)``, constants for differentiation, and the
    step computes ``γ (x̂ r + d) + β``.
    """

    axes: tuple[int, ...]
    axis_name: Any
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    compute_dtype: Any
    out_dtype: Any
    correction: Callable[..., tuple[jax.Array, jax.Array]] | None = None


class StepInputs(NamedTuple):
    """The arrays a training step reads but does not differentiate."""

    shift: jax.Array
    epsilon: jax.Array
    mask: jax.Array | None
    running_mean: jax.Array
    running_var: jax.Array
    correction_args: tuple = ()


def _batch_statistics(x: jax.Array, config: StepConfig, inputs: StepInputs) -> stats.Moments:
    batch = stats.moments(
        x, config.axes, mask=inputs.mask, axis_name=config.axis_name, axis_index_groups=config.axis_index_groups,
        dtype=config.compute_dtype, shift=inputs.shift,
    )
    if inputs.mask is not None or x.size == 0:  # only then can a feature be empty
        batch = fill_empty_features(batch, inputs.running_mean, inputs.running_var)
    return batch


#: The checkpoint name of the per-feature values the step's derivatives read
#: (besides ``x``): the only residuals reverse mode saves.
_RESIDUAL = "jaxbn_train_step"


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _train(x, scale, bias, outer_scale, outer_bias, config, inputs):
    return _train_fwd(x, scale, bias, outer_scale, outer_bias, config, inputs)[0]


def _train_fwd(x, scale, bias, outer_scale, outer_bias, config: StepConfig, inputs: StepInputs):
    dtype, epsilon = config.compute_dtype, inputs.epsilon
    batch = _batch_statistics(x, config, inputs)
    params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
    correction = None
    if config.correction is not None:
        # y = γ (x̂ r + d) + β: batch norm with scale γ r and bias γ d + β.
        correction = config.correction(batch, inputs.running_mean, inputs.running_var, epsilon, *inputs.correction_args)
        r, d = correction
        if scale is not None:
            r, d = scale.astype(dtype) * r, scale.astype(dtype) * d
        params = {"scale": r, "bias": d if bias is None else d + bias.astype(dtype)}
    outer = outer_scale is not None or outer_bias is not None
    y = affine_normalize(
        x, batch.shift, batch.mean_minus_shift, batch.var, params, config.axes, epsilon, dtype,
        dtype if outer else config.out_dtype, inputs.mask, per_feature_once=False,
    )
    if outer:  # y * outer_scale + outer_bias (each optional), in the compute dtype, then cast
        y = y if outer_scale is None else y * outer_scale
        y = (y if outer_bias is None else y + outer_bias).astype(config.out_dtype)
    return (y, batch), correction


@_train.defjvp
def _train_jvp(config: StepConfig, primals, tangents):
    """The step's derivative, linear in the tangents and shaped so that its transpose is the
    hand-written backward: two sums (of dy and of dy (x - K)), one collective, one pass for dx.

    With x̂ = ((x - K) - (μ - K)) / σ, S1 = Σ m dx and S2 = Σ m x̂ dx (the sums over the valid
    elements m, of every device):

        dy = G dx + A + x̂ B,  G = γ r / σ,  A = -G S1 / n + d dγ + dβ,  B = -G S2 / n + r dγ,
        d mean = S1 / n,  d var = 2 σ S2 / n,

    written with (x - K) in place of x̂ (A and B absorb the constant), so that the transpose's
    sums are Σ dy and Σ dy (x - K): the backward reads x and dy twice and writes dx once.
    Only per-feature values and x are residuals (``_RESIDUAL``, see :func:`batch_norm_train`).

    Outer parameters (layer, group and instance norm: per feature, where the statistics are per
    example) multiply every term and add ``z dγ' + dβ'``, ``z`` the step's output before them,
    each term its own view of the cotangent in the transpose.
    """
    x, scale, bias, outer_scale, outer_bias, inputs = primals
    dx, dscale, dbias, douter_scale, douter_bias, _ = tangents
    axes, dtype, mask = config.axes, config.compute_dtype, inputs.mask
    y, batch = _train(x, scale, bias, outer_scale, outer_bias, config, inputs)

    # the residuals: the batch statistics (per feature); all else is recomputed from them and x
    batch = jax.tree_util.tree_map(functools.partial(checkpoint_name, name=_RESIDUAL), batch)
    inv_std = inverse_sqrt(batch.var + inputs.epsilon)
    beyond = inv_std == 0
    shift, mean_minus_shift = beyond_range_centered(inv_std, batch.shift, batch.mean_minus_shift)
    r = d = None
    gain = inv_std if scale is None else inv_std * scale.astype(dtype)
    if config.correction is not None:
        r, d = config.correction(
            batch, inputs.running_mean, inputs.running_var, inputs.epsilon, *inputs.correction_args
        )
        gain = gain * r
    n = jnp.maximum(batch.count, 1)
    std = jnp.where(beyond, 0, 1 / jnp.where(beyond, 1, inv_std))

    def expand(v):
        return jnp.expand_dims(v, axes)

    dx = dx.astype(dtype)  # once: a half-precision cotangent is rounded once, at the end
    # x̂ itself, not (x - K) and a per-feature 1/σ: the transpose's dx pass multiplies x̂ by a
    # per-feature factor of dy's scale (a factor 1/σ² would underflow for σ beyond ~1e13 in float32)
    x_hat = ((finite_outside_mask(x, mask).astype(dtype) - expand(shift)) - expand(mean_minus_shift)) * expand(inv_std)
    valid_dx = dx if mask is None else jnp.where(mask, dx, 0)
    local = [jnp.sum(valid_dx, axes), jnp.sum(x_hat * valid_dx, axes)]
    sum_dx, sum_dx_xhat = stats.cross_device_sum(local, config.axis_name, config.axis_index_groups)
    a = -gain * sum_dx / n
    b = -gain * sum_dx_xhat / n
    if dscale is not None and scale is not None:
        dscale = dscale.astype(dtype)
        a = a if d is None else a + d * dscale
        b = b + (dscale if r is None else r * dscale)
    if dbias is not None and bias is not None:
        a = a + dbias.astype(dtype)
    # x̂ b = (x - K) (b / σ) - (μ - K) b / σ, around the shift as the forward took it (not centred on 0 where the variance is beyond the
    # dtype: no per-feature select between the sum and its operands), x - K may overflow there;
    # b is 0 there, selected, so the transpose selects Σ dy (x - K) away (as the backward did).
    # The transpose's Σ dy (x - c) is taken around c = K, moments' shift (the rounded batch mean).
    centre, centre_offset = batch.shift, batch.mean_minus_shift
    b = jnp.where(beyond, 0, inv_std * b)
    a = a - jnp.where(beyond, 0, centre_offset * b)
    # one cast to x's varying mesh axes (checked shard_map with replicated parameters), so that
    # the transpose sums both per-feature cotangents in one collective
    if stats.varying_axes(x_hat) - (stats.varying_axes(a) & stats.varying_axes(b)):
        a, b = stats.varying_like(jnp.stack([a, b]), x_hat)
    # the transpose's Σ dy (x - K) reads its own view of x (XLA:CPU's library reductions absorb
    # only elementwise work nothing else shares; see stats.channel_sums)
    (x_view,) = stats.cpu_barrier(x)
    centered_view = finite_outside_mask(x_view, mask).astype(dtype) - expand(centre)
    # and each of the transpose's two sums its own view of dy (a barrier's transpose is a barrier
    # on the cotangent, chained as in channel_sums): a half-precision dy is converted inside each
    # kernel, never copied to float32. The price: in forward mode a half-precision tangent is the
    # sum of three rounded terms.
    out = y.dtype

    def per_feature(v):  # expanded, with the outer scale folded in: small, broadcast where it is used
        v = expand(v)
        return v if outer_scale is None else v * outer_scale

    (dy_b,) = stats.cpu_barrier((centered_view * per_feature(b)).astype(out))
    # (broadcast, then cast: the transpose sums a float32 cotangent)
    (dy_ab,) = stats.cpu_barrier(jnp.broadcast_to(per_feature(a), dy_b.shape).astype(out) + dy_b)
    if douter_bias is not None and outer_bias is not None:
        (dy_ab,) = stats.cpu_barrier(jnp.broadcast_to(douter_bias.astype(dtype), dy_b.shape).astype(out) + dy_ab)
    if douter_scale is not None and outer_scale is not None:  # (no inner parameters then: z = x̂)
        # x̂ dγ' as ((x - K) - (μ - K)) (dγ' / σ), the per-feature product small: the transpose's Σ dy x̂
        # sums dy (x - μ) over the axes that product broadcasts along first. Around K as the b term; 0
        # where the variance is beyond the dtype, selected (a sum of dy (x - K) may be infinite there).
        (x_view,) = stats.cpu_barrier(x_view)  # its own view of x
        centered = (finite_outside_mask(x_view, mask).astype(dtype) - expand(centre)) - expand(centre_offset)
        small = jnp.where(expand(beyond), 0, expand(inv_std) * douter_scale.astype(dtype))
        (dy_ab,) = stats.cpu_barrier((centered * small).astype(out) + dy_ab)
    dy = (per_feature(gain) * dx).astype(out) + dy_ab
    mean_tangent = sum_dx / n
    batch_tangent = stats.Moments(
        mean=mean_tangent.astype(batch.mean.dtype),
        var=(2 * std * sum_dx_xhat / n).astype(batch.var.dtype),
        count=jnp.zeros_like(batch.count),
        shift=jnp.zeros_like(batch.shift),
        mean_minus_shift=mean_tangent.astype(batch.mean_minus_shift.dtype),
    )
    return (y, batch), (dy, batch_tangent)


#: Reverse mode keeps x and the named per-feature values, and recomputes the elementwise
#: (x - K) in the backward instead of saving a full-size intermediate.
_step = jax.checkpoint(_train, static_argnums=(5,), prevent_cse=False, policy=jax.checkpoint_policies.save_only_these_names(_RESIDUAL))


@functools.partial(jax.jit, static_argnums=(2,))
def batch_norm_train(
    x: jax.Array, params: Mapping[str, jax.Array], config: StepConfig, inputs: StepInputs
) -> tuple[jax.Array, stats.Moments]:
    """Training-mode batch norm with batch statistics: ``(y, batch Moments)``.

    Differentiable in forward and reverse mode (to any order) with respect to ``x`` and the
    parameters, through ``y`` and the batch mean and variance returned (as
    :func:`jaxbn.moments` is); ``inputs`` carry no gradient. Arguments are as validated by :func:`jaxbn.batch_norm`.
    """
    inputs = jax.tree_util.tree_map(lax.stop_gradient, inputs)
    return _step(x, params.get("scale"), params.get("bias"), None, None, config, inputs)


@functools.partial(jax.jit, static_argnums=(2,))
def normalize_then_affine_train(
    x: jax.Array, params: Mapping[str, jax.Array], config: StepConfig, epsilon: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """The training step without parameters of its own, then ``y * scale + bias`` with ``params`` of any
    shape that broadcasts to ``x`` (layer, group and instance norm: statistics per example, parameters
    per feature), in ``config.compute_dtype``, cast to ``config.out_dtype``. A feature without a valid
    element has mean 0 and variance 0. Derivatives as :func:`batch_norm_train`'s.
    """
    zeros = jnp.zeros([size for i, size in enumerate(x.shape) if i not in config.axes], config.compute_dtype)
    inputs = jax.tree_util.tree_map(lax.stop_gradient, StepInputs(zeros, epsilon, mask, zeros, zeros))
    return _step(x, None, None, params.get("scale"), params.get("bias"), config, inputs)[0]
