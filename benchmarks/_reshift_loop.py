"""The statistics design jaxbn replaced, for measuring on a device only: sums around the running mean,
re-taken in a ``while`` loop while the shift is poor (jaxbn until 2026-12-06).

``install()`` makes :mod:`jaxbn.stats` take its per-layer statistics this way: one fused pass of
``Σ (x - K)`` and ``Σ |x - K|^2`` around ``K``, the running mean, one collective, then the loop's
predicate (a data-dependent ``while``: on XLA:GPU a host round trip per layer unless command buffers
capture it). In its steady state it reads ``x`` once where the two-pass design reads it twice, so
``benchmarks/gpu_suite.py`` times both; nothing else imports this file.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import stats

CANCELLATION_LIMIT = 8.0  # re-shift where the variance's cancellation would amplify rounding more
MAX_RESHIFTS = 16


def _sums(plan, x, mask, reference, scale=None):
    """This device's ``Σ s(x - K)`` and ``Σ |s(x - K)|^2``, summed over devices in one collective."""
    axes, dtype = plan.axes, plan.dtype

    def centered(x, reference, mask, scale):
        deviation = x.astype(dtype)
        if scale is not None:
            deviation, reference = deviation * jnp.expand_dims(scale, axes), reference * scale
        deviation = deviation - jnp.expand_dims(reference, axes)
        return deviation if mask is None else jnp.where(mask, deviation, 0)

    local = stats.channel_sums(
        [centered, lambda *ops: stats.abs_square(centered(*ops))], [x, reference, mask, scale], axes
    )
    parts = [
        p
        for value in local
        for p in ((value.real, value.imag) if jnp.iscomplexobj(value) else (value,))
    ]
    summed = stats.cross_device_sum(parts, plan.axis_name, plan.axis_index_groups)
    if len(summed) == 3:  # complex first sum
        return lax.complex(summed[0], summed[1]), summed[2]
    return summed[0], summed[1]


def loop_statistics(plan, x, mask, fallback):
    """``(count, shift, mean - shift, var, mean)`` as the loop design took them."""
    size = math.prod(x.shape[i] for i in plan.axes)
    devices = stats.axis_size(plan.axis_name, plan.axis_index_groups)
    if mask is None:
        count = jnp.full(fallback.shape, size * devices, plan.real_dtype)
    else:
        local = jnp.sum(jnp.broadcast_to(mask, x.shape), plan.axes, dtype=plan.real_dtype)
        count = stats.cross_device_sum([local], plan.axis_name, plan.axis_index_groups)[0]
    safe = jnp.maximum(count, 1)
    first, second = _sums(plan, x, mask, fallback)
    n = max(1, size * devices)
    max_exponent = math.ceil(math.log2(jnp.finfo(plan.real_dtype).max)) // 2 + 1
    overflow_scale = 2.0 ** -(max_exponent + math.ceil(math.log2(n) / 2))
    one = stats.varying_like(jnp.ones_like(second), first, second)

    def poor(shift, offset, raw, scale, near):
        overflow = ~jnp.isfinite(raw) | jnp.isinf(offset)
        amplified = ~(stats.abs_square(offset) <= (1 - 1 / CANCELLATION_LIMIT) * raw) | overflow
        move = amplified & ~(overflow & (scale != 1) & near) & jnp.isfinite(shift + offset)
        return move | (overflow & (scale == 1) & ~jnp.isnan(raw))

    def step(carry):
        shift, offset, raw, _, iteration = carry
        better = lax.stop_gradient(jnp.where(jnp.isfinite(shift + offset), shift + offset, shift))
        overflow = ~jnp.isfinite(raw) & ((iteration > 0) | ~jnp.isfinite(offset))
        scale = jnp.where(overflow, overflow_scale, one).astype(one.dtype)
        f, s = _sums(plan, x, mask, better, scale)
        f, s = f / safe, s / safe
        near = stats.abs_square(f) <= (1 - 1 / CANCELLATION_LIMIT) * s
        return better, f / scale, s / scale / scale, jnp.where(near, scale, -scale), iteration + 1

    def again(carry):
        shift, offset, raw, signed, iteration = carry
        return jnp.any(poor(shift, offset, raw, jnp.abs(signed), signed > 0)) & (
            iteration < MAX_RESHIFTS
        )

    shift = stats.varying_like(fallback, first, second)
    shift, offset, raw, _, _ = lax.while_loop(
        again, step, (shift, first / safe, second / safe, one, jnp.zeros((), jnp.int32))
    )
    var = jnp.where(jnp.isposinf(raw), raw, jnp.maximum(raw - stats.abs_square(offset), 0))
    return count, shift, offset, var, shift + offset


def install() -> None:
    """Makes :mod:`jaxbn.stats` take its statistics with the loop (for this process; benchmarks only)."""
    stats.batch_statistics = loop_statistics
    jax.clear_caches()
