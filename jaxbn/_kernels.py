"""The passes over the activation tensor: normalization and the batch-norm step's VJP.

Batch norm is memory-bound, so what matters is how often the full tensor is
read and written. With S its size in bytes, the floor is 3S for the training
forward (statistics, then normalize), 5S for the backward (two reductions over
x and dy, then dx) and 2S for inference. Autodiff of the forward does not get
there: it saves or recomputes full-size intermediates (x - mean, x̂, float32
copies of bfloat16 tensors). :func:`batch_norm_train` is a ``jax.custom_vjp``
that saves only ``x`` (in its own dtype) and per-feature vectors, and whose
backward is one pair of reductions (one read of ``x`` and ``dy`` on XLA:CPU, by
jaxbn's C++ sums where they apply; see :mod:`jaxbn._cpu`), one cross-device
sum, and one elementwise pass. Batch renormalization runs on the
same step: its per-feature correction (:func:`renorm_correction`) is folded
into the scale and bias, so it moves exactly what batch norm moves.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import stats


def affine_normalize(
    x: jax.Array,
    shift: jax.Array,
    mean_minus_shift: jax.Array | None,
    var: jax.Array,
    params: Mapping[str, jax.Array],
    reduction_axes: tuple[int, ...],
    epsilon: float,
    compute_dtype: Any,
    out_dtype: Any,
) -> jax.Array:
    """``((x - shift) - mean_minus_shift) * rsqrt(var + eps) * scale + bias``, one pass."""

    def expand(v):
        return jnp.expand_dims(jnp.asarray(v, compute_dtype), reduction_axes)

    multiplier = lax.rsqrt(jnp.asarray(var, compute_dtype) + epsilon)
    if "scale" in params:
        multiplier = multiplier * jnp.asarray(params["scale"], compute_dtype)
    y = x.astype(compute_dtype) - expand(shift)
    if mean_minus_shift is not None:
        y = y - expand(mean_minus_shift)
    y = y * expand(multiplier)
    if "bias" in params:
        y = y + expand(params["bias"])
    return y.astype(out_dtype)


def _parameter_cotangent(local, global_, primal, axis_names):
    """The gradient of a parameter, typed as JAX expects it.

    Autodiff gives each device the gradient of its own loss (``local``). Inside
    ``shard_map`` with replicated (invariant) parameters, JAX requires the
    cotangent to be invariant too, that is, summed over the axes the parameter
    does not vary over: over the statistics axes that sum is ``global_``, which
    the backward's one collective has already computed.
    """
    missing = stats._varying_axes(local) - stats._varying_axes(primal)
    if not missing:
        return local
    if missing == frozenset(axis_names):
        return global_
    return lax.psum(local, tuple(sorted(missing, key=str)))


def renorm_correction(
    batch: stats.Moments,
    running_mean: jax.Array,
    running_var: jax.Array,
    r_max: jax.Array,
    d_max: jax.Array,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
    """Batch renormalization's ``(r, d)`` (Ioffe, 2017), constants for autodiff.

    ``r = clip(σ_B / σ, 1/r_max, r_max)`` and ``d = clip((μ_B - μ) / σ, -d_max,
    d_max)`` with ``σ_B = sqrt(var_B + eps)`` and ``σ = sqrt(var + eps)`` from
    the running statistics. ``μ_B - μ`` is taken as ``(K - μ) + (μ_B - K)``,
    exact at any offset since ``K`` (the shift) is the running mean unless
    :func:`jaxbn.stats.moments` re-shifted.
    """
    dtype = batch.var.dtype
    running_mean, running_var, r_max, d_max = (
        jnp.asarray(v, dtype) for v in (running_mean, running_var, r_max, d_max)
    )
    running_std = jnp.sqrt(running_var + epsilon)
    r = jnp.sqrt((batch.var + epsilon) / (running_var + epsilon))
    d = ((batch.shift - running_mean) + batch.mean_minus_shift) / running_std
    r = jnp.minimum(jnp.maximum(r, 1 / r_max), r_max)
    d = jnp.minimum(jnp.maximum(d, -d_max), d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _train(x, scale, bias, shift, config, mask, renorm):
    return _train_fwd(x, scale, bias, shift, config, mask, renorm)[0]


def _train_fwd(x, scale, bias, shift, config, mask, renorm):
    axes, epsilon, axis_name, groups, compute_dtype, out_dtype, reshift = config
    batch = stats.moments(
        x, axes, mask=mask, axis_name=axis_name, axis_index_groups=groups, dtype=compute_dtype, shift=shift,
        reshift=reshift,
    )
    params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
    renorm_rd = None
    if renorm is not None:
        # batch renorm's y = γ (x̂ r + d) + β: batch norm with scale γ r and bias γ d + β.
        renorm_rd = renorm_correction(batch, *renorm, epsilon)
        r, d = renorm_rd
        if scale is not None:
            r, d = scale.astype(compute_dtype) * r, scale.astype(compute_dtype) * d
        params = {"scale": r, "bias": d if bias is None else d + bias.astype(compute_dtype)}
    y = affine_normalize(
        x, batch.shift, batch.mean_minus_shift, batch.var, params, axes, epsilon, compute_dtype, out_dtype
    )
    inv_std = lax.rsqrt(batch.var + epsilon)
    residuals = (x, mask, scale, bias, batch.shift, batch.mean_minus_shift, inv_std, batch.count, renorm_rd)
    return (y, batch), residuals


def _train_bwd(config, residuals, cotangents):
    axes, _, axis_name, groups, compute_dtype, _, reshift = config
    x, mask, scale, bias, shift, mean_minus_shift, inv_std, count, renorm_rd = residuals
    dy = cotangents[0]  # the statistics feed only the running average: no gradient

    def expand(v):
        return jnp.expand_dims(v, axes)

    def x_hat(x):
        return ((x.astype(compute_dtype) - expand(shift)) - expand(mean_minus_shift)) * expand(inv_std)

    # Σ dy x̂ = r (Σ dy (x - K) - d Σ dy): a library reduction on XLA:CPU fuses
    # one broadcast operand (K) but materializes three. |d| <= ~2.6 std after
    # moments' re-shift, so the subtraction loses at most a few bits.
    def centered(x, shift):
        return x.astype(compute_dtype) if shift is None else x.astype(compute_dtype) - expand(shift)

    def with_xla(x, dy, shift):
        def sums(k):
            return stats.channel_sums(
                [lambda dy, x, k: dy.astype(compute_dtype), lambda dy, x, k: dy.astype(compute_dtype) * centered(x, k)],
                [dy, x, k],
                axes,
            )

        # As in moments: a shift of exactly 0 skips the subtraction (not after a
        # forced re-shift, whose shift is the batch mean and whose zero test would
        # span every feature, so every device under jit).
        return sums(shift) if reshift else stats.sums_around_shift(sums, shift, x.size)

    local_dy, local_dy_centered = stats._paired_sums(x, dy, shift, axes, compute_dtype, with_xla)
    local_dy_xhat = inv_std * (local_dy_centered - mean_minus_shift * local_dy)
    sum_dy, sum_dy_xhat = stats.cross_device_sum([local_dy, local_dy_xhat], axis_name, groups)
    # y = x̂ γ + β with x̂ using the statistics of the valid elements, so
    # dx = γ r (dy - m Σdy / n - m x̂ Σ(dy x̂) / n), the sums over all elements.
    gain = inv_std if scale is None else inv_std * scale.astype(compute_dtype)
    local_dscale, global_dscale = local_dy_xhat, sum_dy_xhat
    if renorm_rd is not None:
        # batch renorm's y = γ (x̂ r + d) + β with constant r, d (renorm_correction):
        # dx is batch norm's with gain γ r, and dγ = r Σdy x̂ + d Σdy.
        renorm_r, renorm_d = renorm_rd
        gain = gain * renorm_r
        local_dscale = renorm_r * local_dy_xhat + renorm_d * local_dy
        global_dscale = renorm_r * sum_dy_xhat + renorm_d * sum_dy
    n = jnp.maximum(count, 1)
    correction = expand(sum_dy / n) + x_hat(x) * expand(sum_dy_xhat / n)
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = (expand(gain) * (dy.astype(compute_dtype) - correction)).astype(x.dtype)
    names = () if axis_name is None else (axis_name if isinstance(axis_name, tuple) else (axis_name,))

    def parameter_grad(primal, local, global_):
        if primal is None:
            return None
        return _parameter_cotangent(local, global_, primal, names).astype(primal.dtype)

    return (
        dx,
        parameter_grad(scale, local_dscale, global_dscale),
        parameter_grad(bias, local_dy, sum_dy),
        None,
        None,
        None,
    )


_train.defvjp(_train_fwd, _train_bwd)


def batch_norm_train(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    shift: jax.Array,
    mask: jax.Array | None,
    *,
    reduction_axes: tuple[int, ...],
    epsilon: float,
    axis_name: Any,
    axis_index_groups: Any,
    compute_dtype: Any,
    out_dtype: Any,
    renorm: tuple[jax.Array, jax.Array, Any, Any] | None = None,
    reshift: bool | None = None,
) -> tuple[jax.Array, stats.Moments]:
    """Training-mode batch norm with batch statistics: ``(y, batch Moments)``.

    Differentiable in reverse mode (to any order) with respect to ``x`` and the
    parameters; the statistics it returns carry no gradient. Arguments are as
    validated by :func:`jaxbn.batch_norm`. With ``renorm = (running_mean,
    running_var, r_max, d_max)`` it is batch renormalization
    (:func:`jaxbn.batch_renorm`): the same statistics, collectives and passes,
    with the per-feature correction of :func:`renorm_correction` folded into
    the scale and bias. ``reshift`` is :func:`jaxbn.stats.moments`'s.
    """
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    config = (reduction_axes, epsilon, axis_name, groups, jnp.dtype(compute_dtype), jnp.dtype(out_dtype), reshift)
    if renorm is not None:
        renorm = tuple(lax.stop_gradient(jnp.asarray(v)) for v in renorm)
    y, batch = _train(
        x, params.get("scale"), params.get("bias"), lax.stop_gradient(shift), config, mask, renorm
    )
    return y, jax.tree_util.tree_map(lax.stop_gradient, batch)
