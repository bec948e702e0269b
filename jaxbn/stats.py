"""Statistics: the one place in jaxbn that reduces.

Every normalizer gets its mean and variance from :func:`moments`; every sum
over the batch on a device is taken by :func:`channel_sums` (formulated per
backend), and every value that crosses devices goes through
:func:`cross_device_sum`. So "one collective per layer per direction",
"count-weighted across devices" and "no float32 copy of a bfloat16 tensor" are
properties of this file alone; the custom VJP in ``_kernels.py`` uses the same
two helpers for its backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _validation

__all__ = ["Moments", "moments", "channel_sums", "cross_device_sum", "axis_size", "CANCELLATION_LIMIT"]

#: A reduction around a shift ``K`` computes ``var = E[(x-K)^2] - (E[x]-K)^2``;
#: its relative rounding error is that of the sums times
#: ``E[(x-K)^2] / var``. When that amplification would exceed this limit the
#: sums are taken again around the rough mean. 8 keeps float32 variances within
#: about 1e-6 of a float64 reference (XLA's float32 sums are accurate to ~1e-7),
#: and it tolerates a shift that is off by up to sqrt(7) ~ 2.6 standard
#: deviations, which a running mean satisfies once training has warmed up.
CANCELLATION_LIMIT = 8.0


class Moments(NamedTuple):
    """Per-feature statistics of a batch, as returned by :func:`moments`.

    Attributes:
      mean: the mean of the valid elements.
      var: their biased (population) variance, ``E[(x - mean)^2]``, >= 0.
      count: the number of valid elements, summed over devices.
      shift: the reference point ``K`` the sums were taken around; identical on
        every device.
      mean_minus_shift: ``mean - shift``, kept separately because at a large
        offset ``mean`` rounds: normalizing as ``((x - shift) - mean_minus_shift)``
        never lets the offset meet the rounding.

    Channels without any valid element have ``count == 0``, ``mean == shift``
    and ``var == 0``: no NaN.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array
    shift: jax.Array
    mean_minus_shift: jax.Array


AxisName = Any  # a hashable name or a tuple of names


def axis_size(axis_name: AxisName | None, axis_index_groups: Sequence[Sequence[int]] | None = None) -> int:
    """Returns the number of devices a reduction over ``axis_name`` combines.

    Static: it is known at trace time, and it raises a ``ValueError`` that says
    how to bind the axis when ``axis_name`` is not bound by an enclosing
    ``pmap``, ``shard_map`` or ``vmap``.

    Args:
      axis_name: ``None`` (no cross-device reduction: 1), a name, or a tuple of
        names.
      axis_index_groups: optional groups of device indices along the axis; the
        reduction then combines the devices of one group.

    Returns:
      The number of participants in one reduction.

    >>> import jax, jax.numpy as jnp
    >>> jax.vmap(lambda x: x * axis_size('batch'), axis_name='batch')(jnp.ones(3))
    Array([3., 3., 3.], dtype=float32)
    """
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                "axis_index_groups was given without axis_name; groups subdivide a "
                "named device axis, so pass the axis_name they index."
            )
        return 1
    try:
        size = lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: {err} Call this function "
            f"inside jax.shard_map(..., mesh=...) or jax.pmap(..., axis_name="
            f"{axis_name!r}) (or jax.vmap with that axis_name) whose axes include "
            f"{axis_name!r}. Under plain jax.jit with a sharded batch, pass "
            "axis_name=None: XLA inserts the cross-device reduction itself."
        ) from None
    if axis_index_groups is None:
        return int(size)
    sizes = {len(group) for group in axis_index_groups}
    if len(sizes) != 1:
        raise ValueError(
            f"axis_index_groups must all have the same size, got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def cross_device_sum(
    values: Sequence[jax.Array],
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> list[jax.Array]:
    """Sums same-shaped arrays over devices with ONE collective.

    The arrays are stacked and reduced by a single ``lax.psum``, then split
    again. Without an ``axis_name`` they are returned unchanged (under plain
    ``jit`` XLA has already reduced over the sharded batch).

    Args:
      values: arrays of one shape and dtype.
      axis_name: the device axis (or tuple of axes) to sum over, or None.
      axis_index_groups: optional subgroups of that axis.

    Returns:
      The summed arrays, in order.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda a: cross_device_sum([a, 2 * a], 'i')
    >>> jax.vmap(f, axis_name='i')(jnp.arange(3.0))
    [Array([3., 3., 3.], dtype=float32), Array([6., 6., 6.], dtype=float32)]
    """
    values = list(values)
    if axis_name is None:
        return values
    axis_size(axis_name, axis_index_groups)  # a clear error for an unbound name
    stacked = lax.psum(jnp.stack(values), axis_name, axis_index_groups=axis_index_groups)
    return list(stacked)


def channel_sums(
    summands: Sequence[Any],
    operands: Sequence[jax.Array],
    axes: tuple[int, ...],
    *,
    fuse: bool | None = None,
) -> tuple[jax.Array, ...]:
    """Local sums over ``axes`` of ``summand(*operands)`` for each summand.

    The one place jaxbn reduces over the batch on a device, formulated per
    backend: XLA:GPU/TPU fuse sibling reductions of the same input into one
    pass, while XLA:CPU's fast reductions are library kernels that only absorb
    elementwise work that nothing else shares, so there each sum gets its own
    view of the operands (an ``optimization_barrier`` keeps XLA from sharing,
    and so materializing, a common subexpression such as ``x - K`` or a
    bfloat16-to-float32 copy of ``x``, with another sum or the normalization).

    Args:
      summands: functions of ``*operands`` giving same-shaped arrays to sum;
        each should compute in the dtype its sum should accumulate in.
      operands: the arrays they read.
      axes: the axes to sum over.
      fuse: None picks the form per backend at lowering time; True forces
        the shared (GPU/TPU) form, False the separate (CPU) form.

    Returns:
      One array per summand.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> channel_sums([lambda x: x, lambda x: x * x], [x], (0,))
    (Array([6., 9.], dtype=float32), Array([20., 35.], dtype=float32))
    """

    def fused(*ops):
        return tuple(jnp.sum(summand(*ops), axes) for summand in summands)

    def separate(*ops):
        sums = []
        for summand in summands:
            # chained, not repeated: XLA would merge identical barriers
            ops = lax.optimization_barrier(ops)
            sums.append(jnp.sum(summand(*ops), axes))
        return tuple(sums)

    if fuse is not None:
        return (fused if fuse else separate)(*operands)
    return lax.platform_dependent(*operands, cpu=separate, default=fused)


def moments(
    x: jax.Array,
    axes: int | Sequence[int],
    *,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
    shift: jax.Array | None = None,
) -> Moments:
    r"""Mean and variance over ``axes``, exact across devices and at large offsets.

    With ``K`` the shift (identical on every device without communication),
    each device computes over its valid elements

    .. math::
        n_i = \sum 1, \quad S_{1,i} = \sum (x - K), \quad S_{2,i} = \sum (x - K)^2

    and one ``psum`` of the stacked ``[n, S_1, S_2]`` gives the global sums, so

    .. math::
        \mu = K + S_1/n, \qquad \sigma^2 = S_2/n - (S_1/n)^2 .

    Weighting by counts makes masked or padded batches with different numbers
    of valid elements per device give exactly the statistics of all valid
    elements together (averaging per-device means, as flax does, does not).

    **Why a shift.** ``E[x^2] - E[x]^2`` loses everything at a large offset
    (float32, mean 1e4, std 1: flax's default is off by hundreds to thousands
    of percent, depending on the batch; ``tests/test_stats.py`` prints it); two passes
    (mean, then ``E[(x-mean)^2]``) are exact but need two sequential
    collectives. Summing around ``K`` needs one, and is exact whenever ``K`` is
    near the mean: the rounding of the sums is amplified by
    ``(S_2/n) / \sigma^2``. Every device sees the same global sums and so the
    same amplification; where it exceeds :data:`CANCELLATION_LIMIT` on any
    channel, all devices re-shift to the rough mean and reduce once more (a
    ``lax.cond``, so the steady state executes one small all-reduce and only a
    poor shift pays for a second). Batch norm passes its running mean as
    ``K``; without one ``K = 0`` and the first call re-shifts.

    Args:
      x: floating input. bfloat16/float16 are reduced in float32; float64 stays
        float64.
      axes: the axes to reduce (an int or a sequence).
      mask: optional boolean array broadcastable to ``x``; only ``True``
        elements count.
      axis_name: device axis name (or tuple of names) bound by ``pmap``,
        ``shard_map`` or ``vmap`` to reduce over as well; None under plain
        ``jit`` with a sharded batch, where XLA reduces globally.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: optional minimum dtype for the statistics (always at least
        float32).
      shift: optional reference point, broadcastable to the reduced shape;
        treated as a constant (no gradient flows into it).

    Returns:
      :class:`Moments` with arrays of shape ``x.shape`` without ``axes``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1e4 + 1.0, 2.0], [1e4 - 1.0, 4.0]])
    >>> m = moments(x, axes=0)
    >>> m.mean, m.var, m.count
    (Array([10000.,     3.], dtype=float32), Array([1., 1.], dtype=float32), Array([2., 2.], dtype=float32))
    >>> moments(x, 0, mask=jnp.array([[True], [False]])).count
    Array([1., 1.], dtype=float32)
    """
    x = _validation.check_floating(x)
    _validation.check_dtype(dtype)
    axes = _validation.canonicalize_axes(x.ndim, axes, name="axes")
    stats_dtype = jnp.promote_types(x.dtype if dtype is None else dtype, jnp.float32)
    feature_shape = tuple(x.shape[i] for i in range(x.ndim) if i not in axes)
    group_size = axis_size(axis_name, axis_index_groups)
    if mask is not None:
        mask = _validation.check_mask(mask, x.shape)

    if shift is None:
        shift = jnp.zeros(feature_shape, stats_dtype)
    else:
        try:
            shift = jnp.broadcast_to(jnp.asarray(shift, stats_dtype), feature_shape)
        except ValueError:
            raise ValueError(
                f"shift of shape {jnp.shape(shift)} does not broadcast to the reduced "
                f"shape {feature_shape} (the input shape {x.shape} without axes {axes})."
            ) from None
        shift = lax.stop_gradient(shift)

    def centered(x, reference, mask):
        deviation = x.astype(stats_dtype) - jnp.expand_dims(reference, axes)
        # where, not a product: masked-out NaN or Inf padding stays out.
        return deviation if mask is None else jnp.where(mask, deviation, 0)

    def local_sums(reference):
        return channel_sums(
            [centered, lambda *ops: jnp.square(centered(*ops))], [x, reference, mask], axes
        )

    first, second = local_sums(shift)
    if mask is None:
        count = jnp.full(feature_shape, math.prod(x.shape[i] for i in axes) * group_size, stats_dtype)
        first, second = cross_device_sum([first, second], axis_name, axis_index_groups)
    else:
        local_count = jnp.sum(jnp.broadcast_to(mask, x.shape), axes, dtype=stats_dtype)
        count, first, second = cross_device_sum(
            [local_count, first, second], axis_name, axis_index_groups
        )
    # Empty channels divide by 1: their sums are 0, so mean = shift, var = 0.
    safe_count = jnp.maximum(count, 1)
    offset = first / safe_count
    raw_second = second / safe_count

    # var = raw_second - offset^2 amplifies rounding by raw_second / var; the
    # comparison is False for NaN, so a non-finite batch takes the cheap branch.
    poor_shift = jnp.any(jnp.square(offset) * CANCELLATION_LIMIT > (CANCELLATION_LIMIT - 1) * raw_second)

    def reshift():
        better = lax.stop_gradient(shift + offset)
        first, second = cross_device_sum(list(local_sums(better)), axis_name, axis_index_groups)
        return better, first / safe_count, second / safe_count

    shift, offset, raw_second = lax.cond(poor_shift, reshift, lambda: (shift, offset, raw_second))
    var = jnp.maximum(raw_second - jnp.square(offset), 0)
    return Moments(mean=shift + offset, var=var, count=count, shift=shift, mean_minus_shift=offset)
