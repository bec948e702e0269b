"""Statistics, the one place in jaxbn that reduces: :func:`_two_pass_statistics` per device, one
:func:`all_gather` across devices, the backward's sums in one :func:`cross_device_sum`."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import _validation
from jaxbn._validation import Plan, axis_size

__all__ = ["Moments", "all_gather", "axis_size", "cross_device_sum", "merge_moments"]
__all__ += ["merge_stacked", "moments"]

AxisName = Any  # a hashable name or a tuple of names


class Moments(NamedTuple):
    """Per-feature statistics of a batch, as returned by :func:`moments` (a feature without a
    valid element has ``count == 0``, ``mean == shift`` and ``var == 0``).

    Attributes:
      mean: the mean of the valid elements.
      var: their biased (population) variance, ``E[(x - mean)^2]``, >= 0.
      count: the number of valid elements, summed over devices.
      shift: the reference point ``K`` the sums were taken around, identical on every device.
      mean_minus_shift: ``mean - shift``, exact where ``mean`` rounds at a large offset; its
        infinity where it is beyond the dtype (the variance is then too, the mean is not).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    shift: jax.Array
    mean_minus_shift: jax.Array


def moments(
    x: jax.Array,
    axes: int | Sequence[int],
    *,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
    shift: jax.Array | None = None,
    source: jax.Array | None = None,
) -> Moments:
    """The :class:`Moments` of ``x`` over ``axes``, exact across devices and at any offset: two
    passes around an element of the batch, with ``axis_name`` one ``all_gather`` of every device's.

    Args:
      x: floating or complex input (complex: real variance ``E|x - mean|^2``).
      axes: the axes to reduce (an int or a sequence).
      mask: optional boolean array broadcastable to ``x``: only ``True`` elements count.
      axis_name: device axis name(s) to reduce over as well; None under plain ``jit``.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: optional minimum dtype for the statistics (always at least float32).
      shift: a reference point (no gradient) for a feature whose element to sum around (its
        first valid one; with a mask as large as ``x``, its largest) does not exist or is not
        finite.
      source: optional, ``x``'s values in a narrower dtype (``x`` is its cast), read instead.

    Raises:
      TypeError: an argument of the wrong type or dtype (``docs/errors.md`` lists them).
      ValueError: an argument of the wrong value or shape, or an unbound ``axis_name``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1e4 + 1.0, 2.0], [1e4 - 1.0, 4.0]])
    >>> m = moments(x, axes=0)
    >>> m.mean, m.var
    (Array([10000.,     3.], dtype=float32), Array([1., 1.], dtype=float32))
    >>> moments(x, 0, mask=jnp.array([[True], [False]])).count
    Array([1., 1.], dtype=float32)
    """
    x, plan, mask, source = _validation.check_moments(
        x, axes, mask, axis_name, axis_index_groups, dtype, source
    )
    feature_shape = tuple(x.shape[i] for i in range(x.ndim) if i not in plan.axes)
    shift = jnp.asarray(0 if shift is None else shift, plan.dtype)
    try:
        shift = jnp.broadcast_to(shift, feature_shape)
    except ValueError:
        raise ValueError(
            f"shift of shape {jnp.shape(shift)} does not broadcast to the reduced shape "
            f"{feature_shape} (the input shape {x.shape} without axes {plan.axes})."
        ) from None
    with jax.named_scope("jaxbn.moments"):
        source = None if source is None else lax.stop_gradient(source)
        return batch_moments(plan, x, mask, shift, source)


def batch_moments(plan: Plan, x: jax.Array, mask: Any, shift: jax.Array, source=None) -> Moments:
    """:func:`moments` of checked arguments (``shift`` of the reduced shape, in ``plan.dtype``)."""
    fallback = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))
    count, shift, offset, var, mean = _shifted_moments(plan, x, mask, fallback, source)
    return Moments(mean=mean, var=var, count=count, shift=shift, mean_minus_shift=offset)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _shifted_moments(plan: Plan, x: jax.Array, mask: Any, fallback: jax.Array, source: Any = None):
    """:func:`batch_statistics` of ``source`` (if given) or ``x``; ``K`` constant to the derivative."""
    count, shift, offset, var, mean = batch_statistics(
        plan, x if source is None else source, mask, fallback
    )
    # computed once, the count only where it varies (XLA folds a constant where it meets it); K
    # stays out: XLA:CPU's library reductions read a row of a stack only through a broadcast
    varies = mask is not None or plan.axis_name is not None
    once, offset, var, mean = computed_once(count if varies else None, offset, var, mean)
    return count if once is None else once, shift, offset, var, mean


@_shifted_moments.defjvp
def _shifted_moments_jvp(plan, primals, tangents):
    x, mask, fallback, source = primals
    count, shift, offset, _, _ = out = _shifted_moments(plan, x, mask, fallback, source)
    shift, offset = lax.stop_gradient(shift), lax.stop_gradient(offset)
    dx = tangents[0]
    # Linear in dx (no optimization barrier: reverse mode transposes this).
    centered = x.astype(plan.dtype)
    if plan.centred:
        centered = centered - jnp.expand_dims(shift, plan.axes)
        centered = centered - jnp.expand_dims(offset, plan.axes)
    # A deviation beyond the dtype: a variance beyond it, whose derivative nothing uses (0, not NaN)
    centered = jnp.where(jnp.isfinite(centered), centered, 0)
    dx = dx.astype(plan.dtype)
    if mask is not None:
        centered, dx = jnp.where(mask, centered, 0), jnp.where(mask, dx, 0)
    # d|d|^2 = 2 Re(conj(d) dd): 2 d dd for real input
    d_square = 2 * (centered.conj() * dx).real if jnp.iscomplexobj(centered) else 2 * centered * dx
    sums = [jnp.sum(dx, plan.axes), jnp.sum(d_square, plan.axes)]
    if jnp.iscomplexobj(sums[0]):  # one collective of real parts
        sums = [sums[0].real, sums[0].imag, sums[1]]
    *d_mean, d_var = cross_device_sum(sums, plan.axis_name, plan.axis_index_groups)
    d_mean = lax.complex(*d_mean) if len(d_mean) == 2 else d_mean[0]
    safe_count = jnp.maximum(count, 1)
    zeros = jnp.zeros_like(count), jnp.zeros_like(shift)
    d_mean = d_mean / safe_count
    return out, (*zeros, d_mean, d_var / safe_count, d_mean)


def _two_pass_statistics(
    plan: Plan, x: jax.Array, mask: Any, fallback: jax.Array, first_element: Any = None
) -> tuple:
    """``(count, shift K, mean - K, variance, mean)`` of the valid elements of every device, ``K``
    this device's first valid, finite element along the axes (with a mask as large as ``x``, its
    largest valid element, if finite; else ``fallback``): two passes, then
    with ``plan.axis_name`` one collective (``docs/internals.md`` describes the scaling). Where
    ``plan.centred`` is False, around 0 (``K = fallback``, 0): the variance is the mean square, pass
    two alone. ``first_element``: without a mask, ``x``'s first element, where the caller has it."""
    last_kept = x.ndim > 0 and x.ndim - 1 not in plan.axes  # (the last axis: features)
    if jnp.iscomplexobj(x) and last_kept and explicit_sharding(x) is None:
        return _complex_as_pairs(plan, x, mask, fallback)
    axes, dtype, real = plan.axes, plan.dtype, plan.real_dtype
    info = jnp.finfo(real)
    top = info.maxexp - 1  # the greatest normal exponent
    int_type = {32: jnp.int32, 64: jnp.int64}[info.bits]
    size = math.prod(x.shape[i] for i in axes) * plan.inner  # elements per statistic
    sharding: Any = getattr(jax.typeof(x), "sharding", None)
    explicitly_sharded = any(getattr(sharding, "spec", None) or ())
    spec = axis_parts(sharding, x.ndim) if explicitly_sharded else (None,) * x.ndim
    features_sharding = None
    if (
        explicitly_sharded
        and plan.axis_name is None
        and (merged := _per_shard_then_merged(plan, x, mask, fallback))
    ):
        return merged
    if explicitly_sharded:  # per-feature values sharded as x's features are (a select takes one
        # sharding; a group of a plan's inner elements as its channels are)
        parts = [spec[i] for i in range(x.ndim) if i not in axes]
        features_sharding = jax.sharding.NamedSharding(sharding.mesh, P(*parts))
        fallback = sharded_as(fallback, features_sharding)
    centred = plan.centred
    if mask is not None:  # the valid elements (a plan's inner elements as an axis of their own)
        valid, valid_axes = jnp.broadcast_to(mask, x.shape), axes
        mask = lax.expand_dims(mask, range(x.ndim - mask.ndim))
        searched = mask  # (where the first valid element is searched: the mask in its own shape)
        if plan.inner > 1:
            valid, valid_axes = valid.reshape(*x.shape[:-1], -1, plan.inner), (*axes, x.ndim)
            channels = mask.shape[-1] != 1  # (a mask of positions: one group of one)
            searched = mask.reshape(*mask.shape[:-1], -1, plan.inner if channels else 1)
    # A mask at most an eighth of x's size (not varying along the features, say): x with its
    # masked-out elements 0, written once, and each pass's summand weighed by the mask as 0 / 1 in
    # its own shape (XLA:CPU's library reductions absorb no select: RESULTS.md, thirteenth); a
    # larger mask selects in each pass, where 0 / 1 weights would be another tensor of x's size
    weighed = mask is not None and all(isinstance(n, int) for n in (*x.shape, *mask.shape))
    weighed = weighed and 8 * math.prod(mask.shape) <= math.prod(x.shape)
    if not centred or any(isinstance(x.shape[i], int) and x.shape[i] == 0 for i in axes):
        shift = fallback  # (no element to take)
    elif mask is None and first_element is not None:
        shift = lax.select(jnp.isfinite(first_element), first_element, fallback)
    elif mask is None:  # x at index 0 of each axis (gathered along an explicitly sharded one)
        sharded = [axis for axis in axes if spec[axis] is not None]
        # the axes on the device first: only the feature values travel
        limits = [1 if i in axes and i not in sharded else n for i, n in enumerate(x.shape)]
        # (with a plan's inner elements, the first of each group of them)
        strides = (1,) * (x.ndim - 1) + (plan.inner,) if plan.inner > 1 else None
        value = lax.slice(x, [0] * x.ndim, limits, strides)
        gathered = spec  # (x's own spec stays: the sums' views below take theirs from it)
        for axis in sharded:
            gathered = tuple(None if i == axis else part for i, part in enumerate(gathered))
            out = NamedSharding(sharding.mesh, P(*gathered))
            value = value.at[(slice(None),) * axis + (np.array([0]),)].get(out_sharding=out)
        value = lax.squeeze(value, axes).astype(fallback.dtype)
        shift = lax.select(jnp.isfinite(value), value, fallback)
    elif weighed or jnp.iscomplexobj(x):  # the first valid element (searched in the mask's shape)
        value, found = _first_valid(x.reshape(valid.shape), searched, valid_axes)
        value = value.astype(fallback.dtype)
        shift = lax.select(found & jnp.isfinite(value), value, fallback)
    else:  # a mask as large as x: the largest valid element, one library reduction (a search for
        # the first wrote x's size in positions and reduced them in XLA's own loop, 2x as long)
        value = jnp.where(valid, x.reshape(valid.shape), -jnp.inf)
        value = jnp.max(value, valid_axes).astype(fallback.dtype)
        shift = lax.select(jnp.isfinite(value), value, fallback)  # (-inf: no valid element)
    # Pass one sums c x - c K, c = 2^-(2 + log2 n): a sum never beyond the dtype, whatever the
    # values (|c x - c K| <= max / 2n); what c flushes to 0 is below 3 tiny / c in the mean
    if isinstance(size, int):
        log_size = max(size - 1, 0).bit_length()  # ceil(log2 size)
        c, u = (np.asarray(2.0**e, real) for e in (-2 - log_size, 2 + log_size))
    else:  # a symbolic size (jax.export): the same powers of two, built from their exponent bits
        log_size = jnp.ceil(jnp.log2(jnp.maximum(jnp.asarray(size, real), 1))).astype(int_type)
        c, u = (
            lax.bitcast_convert_type(lax.shift_left(e + top, int_type(info.nmant)), real)
            for e in (-2 - log_size, 2 + log_size)
        )
    scaled_shift, overflow_scale = shift * c, np.asarray(2.0 ** -(top // 2 + 3), real)
    # The sums read x as rows of whole feature vectors (reshapes, free in x's layout) and add the
    # partial sums after (RESULTS.md, 2026-12-07, eleventh and twelfth): XLA:CPU's library
    # reductions with a per-feature operand take 2-5x as long where it varies along few elements
    # of the last axis. Where the last axis is reduced within features along the axis before it
    # (group norm's channels of a group) and other axes are reduced too, the two are read as one
    # axis of features x inner elements; where the last axis holds at most LANES / 4 features and
    # axes just before it are reduced, as rows of k whole feature vectors.
    # (with explicit sharding, only axes no device splits: a sharded axis keeps its part)
    inner, last, parts_s = plan.inner, x.ndim - 1, spec
    plain = mask is None and not any(parts_s[i] for i in (*axes, last))
    xs_sharding = sharding if explicitly_sharded else None  # (where explicit)
    xs, axes_s = x, axes  # (x and its reduced axes as the sums read them)
    # (a plan's inner elements are x's already: group norm passes x as it is)
    if inner == 1 and plain and last in axes and last - 1 not in axes and last - 1 > min(axes):
        if all(isinstance(n, int) for n in x.shape[-2:]) and not parts_s[last - 1]:
            parts_s = (*parts_s[:-2], None)
            if explicitly_sharded:
                xs_sharding = NamedSharding(sharding.mesh, P(*parts_s))
            inner = x.shape[-1]
            xs = x.reshape((*x.shape[:-2], x.shape[-2] * x.shape[-1]), out_sharding=xs_sharding)
            axes_s = tuple(i for i in axes if i != last)
    features, start, merged = xs.shape[-1] if xs.ndim else 0, xs.ndim - 1, 1
    widen = plain and start not in axes_s
    widen = widen and isinstance(features, int) and 0 < 4 * features <= LANES
    k = 1 << (-(-LANES // features) - 1).bit_length() if widen else 1  # 2^i >= LANES / features
    while widen and merged % k and start - 1 in axes_s and isinstance(xs.shape[start - 1], int):
        start, merged = start - 1, merged * xs.shape[start - 1]
    if widen and merged and merged % k == 0:
        parts_s = (*parts_s[:start], None, None)
        if explicitly_sharded:
            xs_sharding = NamedSharding(sharding.mesh, P(*parts_s))
        rows_shape = (*xs.shape[:start], merged // k, k * features)
        xs = xs.reshape(rows_shape, out_sharding=xs_sharding)
        sum_axes = (*(i for i in axes_s if i < start), start)
    else:
        k, sum_axes = 1, axes_s
    features //= inner  # (the features' partial sums: k rows of features x inner, folded after)
    fold = (k, features, inner) if k * inner > 1 else None
    # a per-feature vector broadcast to xs's shape (and explicit sharding) in one operation, not
    # expand_dims and a broadcasting one (four HLO instructions before optimization)
    broadcast = functools.partial(
        lax.broadcast_in_dim,
        shape=xs.shape,
        broadcast_dimensions=tuple(i for i in range(xs.ndim) if i not in sum_axes),
        out_sharding=xs_sharding,
    )
    # a per-feature vector tiled to xs's rows, (..., features) to (..., k * features * inner), and
    # a sum's partial sums folded back, inline (each function is one more on the traced path)
    tiled = (*shift.shape[:-1], k * features * inner) if fold else None
    # each sum reads its own view of its operands (chained barriers: XLA merges identical ones),
    # the scales too: as constants, the same in every layer of a shape, XLA:CPU merged their
    # broadcasts across layers and handed each sum the merged one as a full-size buffer
    seen = xs.astype(dtype) if barrier_views_in_compute_dtype else xs
    weights = mask
    if weighed:
        seen = jnp.where(mask, seen, jnp.zeros((), seen.dtype))
        weights = mask.astype(dtype)
    scaled_shift_rows, shift_rows = (
        jnp.broadcast_to(v[..., None, :, None], (*v.shape[:-1], *fold)).reshape(tiled)
        if fold
        else v
        for v in (scaled_shift, shift)
    )
    if centred:
        x_view, scaled_shift_view, mask_view, c_view = cpu_barrier(
            seen, scaled_shift_rows, weights, c
        )
        summand = x_view.astype(dtype) * c_view - broadcast(scaled_shift_view)
        if mask is not None:
            summand = summand * mask_view if weighed else jnp.where(mask_view, summand, 0)
        first = jnp.sum(summand, sum_axes)
        if fold:  # the rows' k * inner partial sums of each feature
            first = jnp.sum(first.reshape(*first.shape[:-1], *fold), (-3, -1))
    else:  # (0: mean - K, with K = fallback = 0)
        first = jnp.zeros_like(shift, dtype)
    if mask is None:
        count = lax.full_like(shift, size, real)
    else:
        count = jnp.sum(valid, valid_axes, dtype=real)
        if explicitly_sharded:  # (a mask without x's sharded feature axes: as the others)
            count = sharded_as(count, features_sharding)
    safe_count = jnp.maximum(count, 1)  # an empty feature: sums 0, so mean = K and var = 0
    offset0 = first / safe_count  # mean - K, in units of c
    # pass two: Σ|d|^2, d = x - K - (mean - K), and beside it the same with d scaled by
    # overflow_scale = 2^-(top//2 + 3), taken where the first overflows (the variance is then at
    # least max / n, and what the scale flushes to 0 is far below the bounds: docs/internals.md);
    # where x - K or mean - K is beyond the dtype, so is the variance
    deviation = lambda x, *centre: (
        x.astype(dtype) - broadcast(centre[0]) - broadcast(centre[1]) if centre else x.astype(dtype)
    )
    offset_rows = offset0 * u
    if fold:
        offset_rows = jnp.broadcast_to(offset_rows[..., None, :, None], (*shift.shape[:-1], *fold))
        offset_rows = offset_rows.reshape(tiled)
    centre = (shift_rows, offset_rows) if centred else ()  # (around 0: d is x itself)
    # Where x's dtype is so much narrower than the compute dtype that no sum of its squares can
    # overflow, the plain sum alone: |d| <= 2 max of x's dtype, so the sum is at most n 4 max^2
    # (float16 in float32: below 2^128 for any n below 2^90, with a margin of 4 for rounding)
    largest = float(jnp.finfo(x.dtype).max)  # (compared as 16 n largest^2 < max, not computed)
    squares_fit = isinstance(size, int)
    squares_fit = squares_fit and largest < math.sqrt(float(info.max) / (16 * max(size, 1)))
    guarded = not squares_fit  # (the scaled sum beside the plain one; else the plain sum alone)
    # Both sums in one reduction, d and d scaled side by side along a new axis: XLA:CPU's library
    # reductions read x once per reduction (RESULTS.md, sixteenth). Around 0, x's squares alone, it
    # took two plain sums faster than one stacked (9.1 ms against 12.1 ms over bfloat16
    # (16, 2048, 1024)): there each sum reads its own view of x
    stacked = guarded and centred and not pass_two_apart
    scales: Any = overflow_scale if guarded else None
    if stacked:  # (the new axis: the last place, before the last axis or earlier, with at least
        # LANES elements after it, never before the first axis; with fewer after it, or first,
        # XLA:CPU's library reduction read x twice over)
        stack_axis, following = max(xs.ndim - 1, 0), xs.shape[-1] if xs.ndim else 1
        while stack_axis > 1 and isinstance(following, int) and following < LANES:
            stack_axis -= 1
            following = following * xs.shape[stack_axis]
        scales = np.asarray([1, overflow_scale], real).reshape(2, *(1,) * (xs.ndim - stack_axis))
    x_view, mask_view, scale_view, *centre_view = cpu_barrier(seen, weights, scales, *centre)
    d = deviation(x_view, *centre_view)
    apart = guarded and not stacked  # (two reductions)
    scaled = None
    if apart and (mask is None or weighed):  # (its own view of x)
        x_again, weights_again, *centre_again = cpu_barrier(x_view, mask_view, *centre_view)
        scaled = deviation(x_again, *centre_again) * scale_view
        scaled = scaled if mask is None else scaled * weights_again
    if weighed:  # (a masked-out element: 0 - K - (mean - K), finite, weighed 0)
        d = d * mask_view
    elif mask is not None:  # (materialized: XLA:CPU's library reductions absorb no select)
        d = jnp.where(mask_view, d, 0)  # (masked-out NaN stays out)
        scaled = d * scale_view if apart else None
    if stacked:
        d = jnp.expand_dims(d, stack_axis) * scale_view
        sum_axes = tuple(i + (i >= stack_axis) for i in sum_axes)
    sums = []
    for v in (d,) if scaled is None else (d, scaled):
        v = v.real * v.real + v.imag * v.imag if jnp.iscomplexobj(v) else v * v  # (inline)
        sums.append(jnp.sum(v, sum_axes))
    if stacked:  # (the stacked axis in the sums: after the kept axes before it)
        kept = sum(i not in sum_axes for i in range(stack_axis))
        sums = [lax.index_in_dim(sums[0], i, kept, False) for i in (0, 1)]
    if fold:
        sums = [jnp.sum(v.reshape(*v.shape[:-1], *fold), (-3, -1)) for v in sums]
    u2: Any  # (the scaled sum's unscaling factor)
    if not guarded:
        second, u2 = sums[0], np.asarray(1, real)
    else:
        overflow = sums[0] == np.inf
        second = lax.select(overflow, sums[1], sums[0])
        # unscaled one factor at a time, the factor selected: as constants XLA would fold 2^66
        # 2^66 / n into one, infinite for small n
        ones = lax.full_like(overflow, 1, real)
        u2 = lax.select(overflow, lax.full_like(overflow, 1 / overflow_scale, real), ones)
    # an infinite (or NaN) value: the mean K, the variance infinite
    infinite = jnp.abs(first) == np.inf
    offset0 = lax.select(infinite, jnp.zeros_like(offset0), offset0)
    offset = offset0 * u  # beyond the dtype (its infinity) only where the variance is
    wide = jnp.abs(offset) == np.inf
    var = second / safe_count * u2 * u2
    var = lax.select(infinite | wide, lax.full_like(var, np.inf), var)
    mean = (scaled_shift + offset0) * u  # c K + c (mean - K), unscaled: finite where mean - K isn't
    if plan.axis_name is not None:
        merge = functools.partial(_merge_devices, plan)
        return _merged_parts(merge, count, shift, offset, var, mean)
    return count, shift, offset, var, mean


def _per_shard_then_merged(plan: Plan, x: jax.Array, mask: Any, fallback: jax.Array) -> Any:
    """:func:`_two_pass_statistics` of an ``x`` explicitly sharded along reduced axes (sharding in
    types, no axis name): each shard's statistics on its own device, then ONE collective (every
    shard's stacked parts resharded to every device) and Chan's merge in shard order, as with an
    axis name. None where no reduced axis is split over devices, or a split one's size is symbolic
    (the global sums then: the partitioner's all-reduces, one per pass)."""
    sharding = jax.typeof(x).sharding
    mesh, spec = sharding.mesh, axis_parts(sharding, x.ndim)
    shards = {i: devices_along(mesh, spec[i]) for i in plan.axes}
    shards = {i: n for i, n in sorted(shards.items()) if n > 1}  # (JAX refuses uneven shards)
    if not shards or not all(isinstance(x.shape[i], int) for i in shards):
        return None

    def split(value):  # (x's rank) each split axis as (shards, elements per shard), or (1, 1)
        shape: list[Any] = []
        parts: list[Any] = []
        for i, n in enumerate(value.shape):
            spans = n == x.shape[i]  # (else 1: a mask broadcasting along it)
            if i in shards:
                shape += [shards[i], n // shards[i]] if spans else [1, 1]
                parts += [spec[i] if spans else None, None]
            else:
                shape.append(n)
                parts.append(spec[i] if spans else None)
        return value.reshape(shape, out_sharding=NamedSharding(mesh, P(*parts))), shape, parts

    x_s, shape, parts = split(x)
    if mask is not None:
        mask = split(lax.expand_dims(mask, range(x.ndim - mask.ndim)))[0]
    # the shards' axes kept, each reduced axis after as many split axes as there are up to it
    kept = [i + sum(j < i for j in shards) for i in shards]
    axes = [i + sum(j <= i for j in shards) for i in plan.axes]
    features = [j for j in range(len(shape)) if j not in axes]
    shard_positions = [features.index(j) for j in kept]  # (among the features)
    old_features = [k for k, j in enumerate(features) if j not in kept]
    # (a plan's inner elements of the last axis share one value: group norm's channels)
    feature_shape = [shape[j] // (plan.inner if j == len(shape) - 1 else 1) for j in features]
    fallback = lax.broadcast_in_dim(fallback, feature_shape, tuple(old_features))
    count, shift, offset, var, mean = _two_pass_statistics(
        plan._replace(axes=tuple(axes)), x_s, mask, fallback
    )
    feature_parts = [parts[j] for j in features if j not in kept]

    def gather(stacked):  # (parts, *features) -> (shards, parts, *x's features), on every device
        stacked = jnp.moveaxis(stacked, [1 + k for k in shard_positions], range(1, 1 + len(kept)))
        stacked = stacked.reshape(stacked.shape[0], -1, *stacked.shape[1 + len(kept) :])
        stacked = jnp.swapaxes(stacked, 0, 1)
        return jax.sharding.reshard(stacked, NamedSharding(mesh, P(None, None, *feature_parts)))

    merge = functools.partial(_merge_gathered, gather)
    return _merged_parts(merge, count, shift, offset, var, mean)


def _merged_parts(merge, count, shift, offset, var, mean) -> tuple:
    """``(count, K, mean - K, var, mean)`` of parts (devices, or shards) merged by ``merge``
    (``(count, K, mean - K, var)`` in, merged out), each part around its own mean where its
    ``mean - K`` is beyond the dtype."""
    wide = jnp.abs(offset) == np.inf
    shift, offset = jnp.where(wide, mean, shift), jnp.where(wide, 0, offset)
    count, shift, offset, var = merge(count, shift, offset, var)
    return count, shift, offset, var, shift + offset


def _complex_as_pairs(plan: Plan, x: jax.Array, mask: Any, fallback: jax.Array) -> tuple:
    """:func:`_two_pass_statistics` of complex ``x`` read as pairs of reals: each part's
    statistics around its own shift, the variance their sum (``E|x - mean|^2``), so that every
    sum is a real one (XLA:CPU's library reductions take no complex values: each pass wrote the
    parts, RESULTS.md, fourteenth). The last axis (not reduced) holds the features, ``(..., 2 C)``,
    each feature's parts side by side. (Where the last axis is reduced, the parts as an axis of
    their own, ``(..., C, 2)``, took XLA:CPU's own loop: 11x flax's time.)"""
    # (stacked, then merged: JAX bitcasts no complex values, and XLA:CPU wrote concatenated parts
    # one at a time)
    pairs = lambda v: jnp.stack([v.real, v.imag], -1).reshape(*v.shape[:-1], 2 * v.shape[-1])
    if mask is not None:
        mask = lax.expand_dims(mask, range(x.ndim - mask.ndim))
        mask = mask if mask.shape[-1] == 1 else jnp.repeat(mask, 2, -1)
    real_plan = plan._replace(dtype=plan.real_dtype)
    # the shift's element sliced from x (from the pairs, XLA:CPU wrote a second copy of them)
    first_element = None
    empty = any(isinstance(x.shape[i], int) and x.shape[i] == 0 for i in plan.axes)
    if mask is None and plan.centred and not empty:
        index = tuple(0 if i in plan.axes else slice(None) for i in range(x.ndim))
        first_element = pairs(x[index])
    statistics = _two_pass_statistics(real_plan, pairs(x), mask, pairs(fallback), first_element)
    count, shift, offset, var, mean = (v.reshape(*fallback.shape, 2) for v in statistics)
    as_complex = lambda v: lax.complex(v[..., 0], v[..., 1])
    return (
        count[..., 0],
        as_complex(shift),
        as_complex(offset),
        var[..., 0] + var[..., 1],
        as_complex(mean),
    )


# Elements per row that the statistics' sums read where the feature axis is narrower (above)
LANES = 128

# What the statistics are; benchmarks/_reshift_loop.py swaps in the loop design to time it.
batch_statistics = _two_pass_statistics

# Pass two's two sums as two reductions, each of its own view of x (True: a measuring variant, set
# by benchmarks/_pass_two_apart.py for benchmarks/gpu_suite.py; XLA:CPU read x once per
# reduction, so the default takes one over the two stacked, RESULTS.md, sixteenth)
pass_two_apart = False

# What XLA:CPU's barriers hold for a half-precision x and dy: their own dtype (False: no
# full-size float32 copy of a bfloat16 parameter), or their view in the compute dtype (True: a
# measuring variant, set by benchmarks/e2e.py --compute-dtype-barrier-views; inside a model XLA
# reads that view off the float32 computation that made the tensor, RESULTS.md, 2026-12-06 (fifth))
barrier_views_in_compute_dtype = False


def _first_valid(x: jax.Array, mask: jax.Array, axes: tuple[int, ...]) -> tuple:
    """Per feature, the first valid element of ``x`` along ``axes`` and whether there is one
    (``mask`` of ``x``'s rank; its positions are searched in its own shape)."""
    sharding = explicit_sharding(x)
    spec = axis_parts(sharding, x.ndim) if sharding is not None else (None,) * x.ndim
    across = any(spec[i] is not None for i in axes)  # (a reduced axis split over devices)
    if across:  # x at index 0 along the axes the mask does not vary over and no device splits:
        # the first valid element lies there, and the sum below reads only that slice of x
        small = [i in axes and mask.shape[i] == 1 and spec[i] is None for i in range(x.ndim)]
        x = lax.slice(x, (0,) * x.ndim, [1 if one else n for one, n in zip(small, x.shape)])
    shape = x.shape if across else mask.shape  # (the sum below needs x's positions)
    position = jnp.zeros(shape, jnp.int32)
    for axis in axes:
        position = position * shape[axis] + lax.broadcasted_iota(jnp.int32, shape, axis)
    none = math.prod(shape[i] for i in axes)
    first = jnp.min(jnp.where(mask, position, none), axes)
    first = jnp.broadcast_to(first, tuple(n for i, n in enumerate(x.shape) if i not in axes))
    found = first < none
    first = jnp.where(found, first, 0)
    if across:  # a gather would cross devices; a sum of the one selected element per feature
        # (exact: the others add 0) reduces where the data lies, as the statistics do
        chosen = position == jnp.expand_dims(jnp.where(found, first, -1), axes)
        return jnp.sum(jnp.where(chosen, x, 0), axes), found
    starts = []  # (the position's index along each reduced axis, the last axis first)
    for axis in reversed(axes):
        starts.append(first % shape[axis])
        first = first // shape[axis]
    # a gather batched along the kept axes: under sharding each device reads its own part of x
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    numbers = lax.GatherDimensionNumbers(
        offset_dims=(),
        collapsed_slice_dims=tuple(axes),
        start_index_map=tuple(axes),
        operand_batching_dims=kept,
        start_indices_batching_dims=tuple(range(len(kept))),
    )
    at = jnp.stack(starts[::-1], -1)
    return lax.gather(x, at, numbers, (1,) * x.ndim, mode="promise_in_bounds"), found


def explicit_sharding(value: Any) -> Any:
    """``value``'s sharding where it is explicit (sharding in types, a partitioned spec), else
    None."""
    sharding = getattr(jax.typeof(value), "sharding", None)
    return sharding if any(getattr(sharding, "spec", None) or ()) else None


def axis_parts(sharding: Any, ndim: int) -> tuple:
    """``sharding``'s ``PartitionSpec`` entries, one per axis of an array of ``ndim`` axes (None
    for an axis it does not name)."""
    spec = tuple(sharding.spec)
    return (*spec, *(None,) * (ndim - len(spec)))


def devices_along(mesh: Any, part: Any) -> int:
    """How many devices an axis of a ``PartitionSpec`` entry ``part`` (None, a mesh axis name or a
    tuple of them) is split over."""
    names = () if part is None else part if isinstance(part, tuple) else (part,)
    return math.prod(mesh.shape[name] for name in names)


def sharded_as(value: jax.Array, sharding: Any) -> jax.Array:
    """``value`` resharded to ``sharding`` (a ``NamedSharding`` of an explicit mesh: sharding in
    types, where a select takes operands of one sharding); unchanged where it has that sharding
    already, or ``sharding`` has no mesh (outside ``jax.set_mesh``, JAX mixes them)."""
    if sharding is None or sharding.mesh.empty:
        return value
    current = getattr(getattr(jax.typeof(value), "sharding", None), "spec", None) or ()
    parts = lambda spec: tuple(spec) + (None,) * (jnp.ndim(value) - len(spec))  # (P() == P(None))
    return (
        value if parts(current) == parts(sharding.spec) else jax.sharding.reshard(value, sharding)
    )


def merge_moments(parts: Sequence[Moments]) -> Moments:
    r"""The :class:`Moments` of several batches together, from each batch's: the exact
    count-weighted combination (:func:`moments` of the concatenated batches, up to rounding),
    ``n = Σ n_i``, ``μ = Σ n_i μ_i / n``, ``σ² = Σ n_i (σ_i² + (μ_i - μ)²) / n``.

    Args:
      parts: one or more :class:`Moments` of the same shape.

    Raises:
      TypeError: ``parts`` is not a sequence of :class:`Moments`.
      ValueError: ``parts`` is empty, or its moments have different shapes.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0], [2.0], [3.0], [10.0]])
    >>> merged = merge_moments([moments(x[:1], 0), moments(x[1:], 0)])
    >>> merged.mean, merged.var, merged.count
    (Array([4.], dtype=float32), Array([12.5], dtype=float32), Array([4.], dtype=float32))
    """
    if isinstance(parts, Moments):
        raise TypeError(
            "parts must be a sequence of Moments, got a single Moments; pass a list, e.g. "
            "[moments]."
        )
    parts = list(parts)
    if not parts:
        raise ValueError(f"parts must be a non-empty sequence of Moments, got {parts!r}.")
    for i, part in enumerate(parts):
        if not isinstance(part, Moments):
            kind = type(part).__name__
            raise TypeError(
                f"parts must be a non-empty sequence of Moments, but parts[{i}] is a {kind}."
            )
    shapes = {jnp.shape(part.mean) for part in parts}
    if len(shapes) != 1:
        raise ValueError(f"parts must all have one shape, got {sorted(shapes)}.")
    names = ("count", "shift", "mean_minus_shift", "var")
    fields = [jnp.stack(jnp.broadcast_arrays(*(getattr(p, name) for p in parts))) for name in names]
    total, shift, offset, spread = merge_stacked(*fields)
    return Moments(shift + offset, spread, total, shift, offset)


def merge_stacked(count, shift, offset, var) -> tuple[jax.Array, ...]:
    """``(count, shift, mean - shift, var)`` of parts stacked on axis 0, merged (Chan et al.) around
    the shift of the first part with data (per feature); parts without data weigh nothing."""
    first = jnp.argmax(count > 0, axis=0)  # 0 where no part has data
    common = jnp.take_along_axis(shift, first[None], axis=0)[0]
    return _merge(count, shift, offset, var, lambda v: jnp.sum(v, 0), lambda weight: common)


def _merge(count, shift, offset, var, total, common) -> tuple[jax.Array, ...]:
    """Chan's merge of parts, summed by ``total``, around ``common(weights)`` (near every shift)."""
    has_data, n = count > 0, total(count)
    weight = count / jnp.maximum(n, 1)
    reference = common(weight)
    # where, not a product: an empty part's distance may be anything, and 0 * inf is NaN
    distance = jnp.where(has_data, (shift - reference) + offset, 0)
    merged_offset = total(weight * distance)
    spread = total(jnp.where(has_data, weight * (var + abs_square(distance - merged_offset)), 0))
    return n, reference, merged_offset, spread


def _merge_devices(plan: Plan, count, shift, offset, var) -> tuple[jax.Array, ...]:
    """Every device's moments, gathered in ONE collective and merged in device order (identical
    everywhere); ``vmap`` axes inside ``shard_map`` (lanes) after the mesh axes, by sums."""
    names = plan.axis_name if isinstance(plan.axis_name, tuple) else (plan.axis_name,)
    manual = _manual_mesh_axes()
    if lanes := tuple(name for name in names if manual and name not in manual):
        if mesh := tuple(name for name in names if name in manual):
            count, shift, offset, var = _merge_devices(
                plan._replace(axis_name=mesh), count, shift, offset, var
            )
        total = functools.partial(_lane_sum.bind, lanes=lanes)
        return _merge(count, shift, offset, var, total, lambda weight: total(weight * shift))
    gather = functools.partial(
        all_gather, axis_name=plan.axis_name, axis_index_groups=plan.axis_index_groups
    )
    return _merge_gathered(gather, count, shift, offset, var)


def _merge_gathered(gather, count, shift, offset, var) -> tuple[jax.Array, ...]:
    """``(count, shift, mean - shift, var)`` of every device (or shard), stacked and brought to
    every device by ``gather`` (ONE collective: ``(parts, ...)`` to ``(devices, parts, ...)``),
    merged in device order."""
    is_complex = jnp.iscomplexobj(shift)  # gathered as real and imaginary parts
    parts = [shift.real, shift.imag, offset.real, offset.imag] if is_complex else [shift, offset]
    gathered = gather(jnp.stack([count, *parts, var]))
    count, *parts, var = (gathered[:, i] for i in range(len(parts) + 2))
    shift, offset = (lax.complex(*parts[:2]), lax.complex(*parts[2:])) if is_complex else parts
    return merge_stacked(count, shift, offset, var)


def all_gather(value: jax.Array, axis_name: AxisName, axis_index_groups: Any = None) -> jax.Array:
    """``value`` of every device along ``axis_name`` (a name or tuple), stacked on a new axis 0,
    identical everywhere: ONE collective. Inside ``shard_map`` over mesh axes only."""
    axis_size(axis_name, axis_index_groups)  # a clear error for an unbound name
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    manual = _manual_mesh_axes()
    if in_device := tuple(name for name in names if manual and name not in manual):
        raise ValueError(
            f"all_gather over vmap axes {in_device} inside shard_map: merge them with psums "
            "(jaxbn.stats._merge_devices does)."
        )
    if not manual or axis_index_groups is not None:
        if axis_index_groups is not None:  # JAX refuses groups in a psum inside shard_map, not in
            # an all_gather: ask the psum (dead code, removed by XLA) for the same, clear, refusal
            _psum(jnp.zeros((), value.dtype), axis_name, axis_index_groups)
        return lax.all_gather(value, axis_name, axis_index_groups=axis_index_groups)
    original = value.shape
    if missing := frozenset(names) - varying_axes(value):  # replicated: each device's copy counts
        value = lax.pcast(value, tuple(sorted(missing, key=str)), to="varying")
    # invariant: every device holds the same values, and may return them as replicated
    return lax.all_gather(value, names, to="invarying").reshape((-1,) + original)


def _psum(value: jax.Array, axis_name: Any, groups: Any) -> jax.Array:
    """``lax.psum``, refusing ``groups`` inside ``shard_map`` (JAX's are pmap's only) clearly."""
    try:
        return lax.psum(value, axis_name, axis_index_groups=groups)
    except NotImplementedError as err:
        if groups is None:
            raise
        raise NotImplementedError(
            f"axis_index_groups={groups!r} with axis_name={axis_name!r}: JAX implements "
            "axis_index_groups under pmap only, not inside shard_map. For statistics over "
            "sub-groups of devices, factor the mesh axis instead, e.g. jax.make_mesh((replicas, "
            "group_size), ('replica', 'group')) with the batch sharded over ('replica', 'group'), "
            "and pass axis_name='group' (see docs/multi_device.md, 'Sub-group statistics and "
            "nested axis names')."
        ) from err


def cross_device_sum(values: Sequence[jax.Array], axis_name: Any, axis_index_groups=None) -> list:
    """Arrays of one shape and dtype, each summed over the devices of ``axis_name`` (and its
    ``axis_index_groups``) with ONE collective, one ``lax.psum`` of their stack; unchanged without
    an ``axis_name``. ``vmap`` axes inside ``shard_map`` are summed on the device."""
    values = list(values)
    if axis_name is None:
        return values
    axis_size(axis_name, axis_index_groups)  # a clear error for an unbound name
    stacked = jnp.stack(values)
    manual = _manual_mesh_axes()
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    lanes = tuple(name for name in names if name not in manual)
    if manual and lanes and axis_index_groups is None:  # a collective over the mesh, then lanes
        mesh = tuple(name for name in names if name in manual)
        return list(_lane_sum.bind(lax.psum(stacked, mesh) if mesh else stacked, lanes=lanes))
    return list(_psum(stacked, axis_name, axis_index_groups))


def _lane_sum_batched(axis_data, values, dims, *, lanes):
    (value,), (dim,) = values, dims
    if axis_data.name not in lanes:
        return _lane_sum.bind(value, lanes=lanes), dim
    value = value * axis_data.size if dim is None else jnp.sum(value, dim)
    rest = tuple(name for name in lanes if name != axis_data.name)
    return (_lane_sum.bind(value, lanes=rest) if rest else value), None


# _lane_sum.bind(value, lanes=lanes): lax.psum(value, lanes) over vmap axes inside shard_map,
# which JAX's psum refuses there with the varying-axes check on; its batching rule sums the lanes
_lane_sum = jax.extend.core.Primitive("jaxbn_lane_sum")
_lane_sum.def_abstract_eval(lambda aval, *, lanes: aval)
ad.deflinear(_lane_sum, lambda cotangent, *, lanes: [_lane_sum.bind(cotangent, lanes=lanes)])
batching.fancy_primitive_batchers[_lane_sum] = _lane_sum_batched


def _manual_mesh_axes() -> frozenset:
    """The mesh axes an enclosing ``shard_map`` has made manual (empty elsewhere)."""
    mesh = jax.sharding.get_abstract_mesh()
    return frozenset(getattr(mesh, "manual_axes", ()) or ())


def varying_axes(value: Any) -> frozenset:
    """The manual mesh axes ``value`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(value)
    vma: Any = getattr(aval, "vma", None)  # newer JAX
    if vma is None:
        manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10
        vma = getattr(manual, "varying", frozenset())
    return frozenset(vma)


def varying_like(value: jax.Array, *likes: jax.Array) -> jax.Array:
    """``value``, typed to vary over every mesh axis one of ``likes`` varies over (a no-op cast)."""
    missing = frozenset().union(*map(varying_axes, likes)) - varying_axes(value)
    return lax.pcast(value, tuple(sorted(missing, key=str)), to="varying") if missing else value


def abs_square(v: jax.Array) -> jax.Array:
    """``|v|^2``, real for complex ``v`` (flax's ``_abs_sq``); ``v^2`` for real ``v``."""
    # v * v, not jnp.square: its derivative v dt + dt v stays 0 for a 0 cotangent (2 v may overflow)
    return v.real * v.real + v.imag * v.imag if jnp.iscomplexobj(v) else v * v


def channel_sums(summands: Sequence, operands: Sequence, axes: tuple, *, fuse=None) -> tuple:
    """Local sums over ``axes`` of ``summand(*operands)`` for each summand, each (on XLA:CPU)
    reading its own view of the operands (see :func:`cpu_barrier`); ``fuse`` True forces the shared
    (GPU/TPU) form, False the separate (CPU) one."""
    sums = []
    for summand in summands:
        # chained, not repeated: XLA would merge identical barriers
        if fuse is None:
            operands = cpu_barrier(*operands)
        elif not fuse:
            operands = lax.optimization_barrier(tuple(operands))
        sums.append(jnp.sum(summand(*operands), axes))
    return tuple(sums)


def cpu_barrier(*values: Any) -> tuple[Any, ...]:
    """``values`` behind an ``optimization_barrier`` on XLA:CPU, unchanged elsewhere (``None`` too):
    there reductions are library kernels that absorb only elementwise work nothing else shares."""
    barred = iter(_cpu_barrier_p.bind(*(value for value in values if value is not None)))
    return tuple(None if value is None else next(barred) for value in values)


def _cpu_barrier_jvp(primals, tangents):
    return _cpu_barrier_p.bind(*primals), _cpu_barrier_p.bind(*map(ad.instantiate_zeros, tangents))


def _cpu_barrier_transpose(cotangents, *operands):
    cotangents = _cpu_barrier_p.bind(*map(ad.instantiate_zeros, cotangents))
    return [ct if ad.is_undefined_primal(op) else None for ct, op in zip(cotangents, operands)]


_cpu_barrier_p = jax.extend.core.Primitive("jaxbn_cpu_barrier")
_cpu_barrier_p.multiple_results = True
_cpu_barrier_p.def_impl(lambda *values: values)  # eager: one operation at a time, nothing to part
_cpu_barrier_p.def_abstract_eval(lambda *avals: avals)
ad.primitive_jvps[_cpu_barrier_p] = _cpu_barrier_jvp
ad.primitive_transposes[_cpu_barrier_p] = _cpu_barrier_transpose
batching.primitive_batchers[_cpu_barrier_p] = lambda vs, dims: (_cpu_barrier_p.bind(*vs), dims)
mlir.register_lowering(_cpu_barrier_p, mlir.lower_fun(lambda *v: v, multiple_results=True))
_barrier = mlir.lower_fun(lambda *v: lax.optimization_barrier(v), multiple_results=True)
mlir.register_lowering(_cpu_barrier_p, _barrier, platform="cpu")


@jax.custom_jvp
def computed_once(*values: Any) -> tuple[Any, ...]:
    """``values`` unchanged (a zero's sign aside), each computed by XLA once: those of one shape
    and dtype summed with ``-0.0`` in one variadic reduction, which XLA does not copy into each
    reader and whose results its readers take whole (a stacked sum costs a slice per reader).
    Linear: its tangents pass unchanged."""
    out = list(values)
    groups: dict[tuple, list[int]] = {}
    for i, value in enumerate(values):
        if value is not None:  # (XLA's verifier refuses a reduction of mixed precisions)
            groups.setdefault((jnp.dtype(value.dtype), jnp.shape(value)), []).append(i)
    for (dtype, shape), members in groups.items():
        zero, pads = np.asarray(-0.0, dtype), [(0, 1, 0)] + [(0, 0, 0)] * len(shape)
        pairs = [lax.pad(values[i][None], zero, pads) for i in members]
        for i, value in zip(members, lax.reduce(pairs, [zero] * len(pairs), _add_pairs, (0,))):
            out[i] = value
    return tuple(out)


_add_pairs = functools.partial(jax.tree.map, lax.add)  # (no jaxbn function on the traced path)


@computed_once.defjvp  # (JAX's rule for a variadic reduce refuses a symbolic zero tangent)
def _computed_once_jvp(primals, tangents):
    return computed_once(*primals), tangents
