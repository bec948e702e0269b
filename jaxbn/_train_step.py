"""The passes over the activation tensor: normalization and the batch-norm step's VJP.

Batch norm is memory-bound, so what matters is how often the full tensor is
read and written. With S its size in bytes, the floor is 3S for the training
forward (statistics, then normalize), 5S for the backward (two reductions over
x and dy, then dx) and 2S for inference; XLA:CPU reads x once per sum (4S /
10S). Autodiff of the forward does not get there: it saves or recomputes
full-size intermediates (x - mean, x̂, float32 copies of bfloat16 tensors).
:func:`batch_norm_train` is a ``jax.custom_vjp`` that saves only ``x`` (in its
own dtype) and per-feature vectors, and whose backward is one pair of
reductions, one cross-device sum and one elementwise pass.

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
) -> jax.Array:
    """``((x - shift) - mean_minus_shift) * rsqrt(var + eps) * scale + bias``, one pass.

    With a ``mask``, masked-out non-finite elements are normalized as 0, so
    they reach neither the output nor any gradient.
    """

    def expand(v):
        return jnp.expand_dims(jnp.asarray(v, compute_dtype), reduction_axes)

    multiplier = inverse_sqrt(jnp.asarray(var, compute_dtype) + epsilon)
    shift, mean_minus_shift = beyond_range_centered(multiplier, shift, mean_minus_shift)
    if "scale" in params:
        multiplier = multiplier * jnp.asarray(params["scale"], compute_dtype)
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
    """Static configuration of one training step (hashable: the custom VJP's static argument).

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
    reshift: bool | None = None
    correction: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    moments_gradient: bool = False  # differentiate the batch moments returned (else they only feed the state)


class StepInputs(NamedTuple):
    """The arrays a training step reads but does not differentiate."""

    shift: jax.Array
    epsilon: jax.Array
    mask: jax.Array | None
    running_mean: jax.Array
    running_var: jax.Array
    correction_args: tuple = ()


class _Residuals(NamedTuple):
    x: jax.Array
    scale: jax.Array | None
    bias: jax.Array | None
    mask: jax.Array | None
    batch: stats.Moments
    inv_std: jax.Array
    correction: tuple[jax.Array, jax.Array] | None


def _parameter_cotangent(local, global_, primal, axis_names):
    """The gradient of a parameter, typed as JAX expects it.

    Autodiff gives each device the gradient of its own loss (``local``). Inside
    ``shard_map`` with replicated (invariant) parameters, JAX requires the
    cotangent to be invariant too, that is, summed over the axes the parameter
    does not vary over: over the statistics axes that sum is ``global_``, which
    the backward's one collective has already computed.
    """
    missing = stats.varying_axes(local) - stats.varying_axes(primal)
    if not missing:
        return local
    if missing == frozenset(axis_names):
        return global_
    return lax.psum(local, tuple(sorted(missing, key=str)))


def _batch_statistics(x: jax.Array, config: StepConfig, inputs: StepInputs) -> stats.Moments:
    batch = stats.moments(
        x, config.axes, mask=inputs.mask, axis_name=config.axis_name, axis_index_groups=config.axis_index_groups,
        dtype=config.compute_dtype, shift=inputs.shift, reshift=config.reshift,
    )
    if inputs.mask is not None or x.size == 0:  # only then can a feature be empty
        batch = fill_empty_features(batch, inputs.running_mean, inputs.running_var)
    return batch


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _train(x, scale, bias, config, inputs):
    return _train_fwd(x, scale, bias, config, inputs)[0]


def _train_fwd(x, scale, bias, config: StepConfig, inputs: StepInputs):
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
    y = affine_normalize(
        x, batch.shift, batch.mean_minus_shift, batch.var, params, config.axes, epsilon, dtype, config.out_dtype,
        inputs.mask,
    )
    inv_std = lax.rsqrt(batch.var + epsilon)
    return (y, batch), _Residuals(x, scale, bias, inputs.mask, batch, inv_std, correction)


def _train_bwd(config: StepConfig, residuals: _Residuals, cotangents):
    axes, dtype = config.axes, config.compute_dtype
    batch, inv_std, mask = residuals.batch, residuals.inv_std, residuals.mask
    # Where the variance is beyond the dtype (inv_std = 0) x_hat is 0, as the forward takes it;
    # x - shift may overflow there (values of both signs near the maximum): Σ dy x_hat is
    # selected away, x_hat centred on 0 as in the forward.
    beyond = inv_std == 0
    shift, mean_minus_shift = batch.shift, batch.mean_minus_shift
    x, scale = finite_outside_mask(residuals.x, mask), residuals.scale
    dy, batch_cotangent = cotangents

    def expand(v):
        return jnp.expand_dims(v, axes)

    # Σ dy x̂ = inv_std (Σ dy (x - K) - (μ - K) Σ dy): |μ - K| is small after
    # moments' re-shift, so the subtraction loses at most a few bits.
    local_dy, local_dy_centered = stats.channel_sums(
        [lambda dy, x, k: dy.astype(dtype), lambda dy, x, k: dy.astype(dtype) * (x.astype(dtype) - expand(k))],
        [dy, x, shift],
        axes,
    )
    local_dy_xhat = jnp.where(beyond, 0, inv_std * (local_dy_centered - mean_minus_shift * local_dy))
    axis_name = config.axis_name
    names = () if axis_name is None else (axis_name if isinstance(axis_name, tuple) else (axis_name,))
    # The statistics' cotangents ride in the one collective where autodiff through the psum that
    # made the statistics would sum them (pmap, vmap, unchecked shard_map); inside a checked
    # shard_map they are invariant: already the whole batch's.
    moments_cotangent = {}
    if config.moments_gradient:  # mean_minus_shift is the mean less a constant: its cotangent is the mean's too
        moments_cotangent = {"mean": batch_cotangent.mean + batch_cotangent.mean_minus_shift,
                             "var": batch_cotangent.var}
    summed = _summed_axes(names, list(moments_cotangent.values()), residuals.x)
    together = summed == names
    sum_dy, sum_dy_xhat, *totals = stats.cross_device_sum(
        [local_dy, local_dy_xhat]
        + [stats.varying_like(c.astype(dtype), local_dy) for c in moments_cotangent.values() if together],
        axis_name, config.axis_index_groups,
    )
    if together:
        moments_cotangent = dict(zip(moments_cotangent, totals))
    elif summed:  # a tuple of names, only part of them checked: a second, per-feature collective
        moments_cotangent = {k: lax.psum(c, summed) for k, c in moments_cotangent.items()}
    # y = x̂ γ + β with x̂ using the statistics of the valid elements, so
    # dx = γ r (dy - m Σdy / n - m x̂ Σ(dy x̂) / n), the sums over all elements.
    gain = inv_std if scale is None else inv_std * scale.astype(dtype)
    local_dscale, global_dscale = local_dy_xhat, sum_dy_xhat
    if residuals.correction is not None:
        # y = γ (x̂ r + d) + β with constant r, d: dx is batch norm's with gain
        # γ r, and dγ = r Σdy x̂ + d Σdy.
        r, d = residuals.correction
        gain = gain * r
        local_dscale = r * local_dy_xhat + d * local_dy
        global_dscale = r * sum_dy_xhat + d * sum_dy
    n = jnp.maximum(batch.count, 1)
    shift, mean_minus_shift = beyond_range_centered(inv_std, shift, mean_minus_shift)
    x_hat = ((x.astype(dtype) - expand(shift)) - expand(mean_minus_shift)) * expand(inv_std)
    correction = expand(sum_dy / n) + x_hat * expand(sum_dy_xhat / n)
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = expand(gain) * (dy.astype(dtype) - correction)
    if moments_cotangent:
        # d mean / dx_i = m_i / n and d var / dx_i = 2 m_i (x_i - mean) / n, with
        # x_i - mean = x̂_i sqrt(var + eps) (0 where the variance is beyond the dtype)
        from_moments = 0
        if "mean" in moments_cotangent:
            from_moments = expand(moments_cotangent["mean"] / n)
        if "var" in moments_cotangent:
            std = jnp.where(beyond, 0, 1 / jnp.where(beyond, 1, inv_std))
            from_moments = from_moments + x_hat * expand(2 * moments_cotangent["var"] * std / n)
        dx = dx + (from_moments if mask is None else jnp.where(mask, from_moments, 0))
    dx = dx.astype(x.dtype)

    def parameter_grad(primal, local, global_):
        if primal is None:
            return None
        return _parameter_cotangent(local, global_, primal, names).astype(primal.dtype)

    return (
        dx,
        parameter_grad(scale, local_dscale, global_dscale),
        parameter_grad(residuals.bias, local_dy, sum_dy),
        None,
    )


def _summed_axes(names: tuple, cotangents: list, x: jax.Array) -> tuple:
    """The axes over which autodiff would sum a statistic's cotangent: all but the checked invariant ones."""
    invariant = frozenset().union(*(stats.varying_axes(x) - stats.varying_axes(c) for c in cotangents))
    return tuple(name for name in names if name not in invariant)


_train.defvjp(_train_fwd, _train_bwd)


def batch_norm_train(
    x: jax.Array, params: Mapping[str, jax.Array], config: StepConfig, inputs: StepInputs
) -> tuple[jax.Array, stats.Moments]:
    """Training-mode batch norm with batch statistics: ``(y, batch Moments)``.

    Differentiable in reverse mode (to any order) with respect to ``x`` and the
    parameters, through ``y`` and, with ``config.moments_gradient``, the batch
    mean and variance returned (as :func:`jaxbn.moments` is); ``inputs`` carry
    no gradient. Arguments are as validated by :func:`jaxbn.batch_norm`.
    """
    inputs = jax.tree_util.tree_map(lax.stop_gradient, inputs)
    y, batch = _train(x, params.get("scale"), params.get("bias"), config, inputs)
    return y, batch if config.moments_gradient else jax.tree_util.tree_map(lax.stop_gradient, batch)
