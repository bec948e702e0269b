"""Ghost (virtual) batches, ``batch_norm(..., ghost_batch_size=g)`` (Hoffer et al., 2017).

The batch axis is viewed as ``(B / g, g)`` with the group axis a feature axis, so the one
training step computes per-group statistics; the running statistics average the groups'
(count-weighted), as TensorFlow's ``virtual_batch_size``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import stats

Params = Mapping[str, jax.Array]


def ghost_view(
    x: jax.Array, mask: Any, reduction_axes: tuple[int, ...], params: Params, shift: jax.Array, ghost: int
) -> tuple[jax.Array, Any, tuple[int, ...], dict[str, jax.Array], jax.Array]:
    """``x`` as ``(B/g, g, ...)`` with the group axis a feature axis; mask, params, shift to match."""
    groups = x.shape[0] // ghost
    x = x.reshape((groups, ghost) + x.shape[1:])
    if mask is not None:
        mask = jnp.reshape(mask, (1,) * (x.ndim - 1 - mask.ndim) + mask.shape)
        lead = (groups, ghost) if mask.shape[0] != 1 else (1, 1)
        mask = mask.reshape(lead + mask.shape[1:])
    axes = (1,) + tuple(i + 1 for i in reduction_axes if i != 0)
    params = {key: _broadcast_to_groups(value, groups) for key, value in params.items()}
    return x, mask, axes, params, jnp.broadcast_to(shift, (groups,) + shift.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _broadcast_to_groups(value: jax.Array, groups: int) -> jax.Array:
    """``value`` repeated along a new leading axis of size ``groups``; its transpose sums over it."""
    return jnp.broadcast_to(value, (groups,) + value.shape)


@_broadcast_to_groups.defjvp
def _broadcast_to_groups_jvp(groups, primals, tangents):
    # The barrier (transposed: on the cotangent, before the sum) keeps XLA from folding this
    # sum into the per-group reduction that made the cotangent, which would read dy once more (1S).
    (value,), (tangent,) = primals, tangents
    return _broadcast_to_groups(value, groups), lax.optimization_barrier(jnp.broadcast_to(tangent, (groups,) + tangent.shape))


def combine_ghost_moments(
    batch: stats.Moments, shift: jax.Array, axis_name: Any, axis_index_groups: Any
) -> stats.Moments:
    """The running-statistics view of per-ghost moments: their count-weighted average.

    ``mean = Σ n_k μ_k / Σ n_k`` and ``var = Σ n_k σ²_k / Σ n_k`` over the
    ghost groups ``k`` (of every device with ``axis_name``: one collective);
    without a mask all ``n_k`` are equal and these are the plain averages of
    the ghost means and variances (TensorFlow's ``virtual_batch_size``). The
    count is the total ``Σ n_k``.
    """
    count = jnp.sum(batch.count, 0)
    if axis_name is None:
        # weights n_k / N: one group (g = B) gives its own statistics (to rounding)
        weight = batch.count / jnp.maximum(count, 1)
        mean, var = jnp.sum(weight * batch.mean, 0), jnp.sum(weight * batch.var, 0)
    else:
        dtype = batch.mean.dtype  # one stacked collective: complex if the mean is
        weighted_mean = jnp.sum(batch.count * batch.mean, 0)
        weighted_var = jnp.sum(batch.count * batch.var, 0).astype(dtype)
        count, weighted_mean, weighted_var = stats.cross_device_sum(
            [count.astype(dtype), weighted_mean, weighted_var], axis_name, axis_index_groups
        )
        count, safe = count.real, jnp.maximum(count.real, 1)
        mean, var = weighted_mean / safe, weighted_var.real / safe
    return stats.Moments(mean=mean, var=var, count=count, shift=shift, mean_minus_shift=mean - shift)
