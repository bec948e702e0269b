"""Statistics: the one place in jaxbn that reduces.

Every normalizer gets its mean and variance from :func:`moments`; every sum
over the batch on a device is taken by :func:`channel_sums`, and every value
that crosses devices goes through :func:`cross_device_sum`. So "one collective
per layer per direction", "count-weighted across devices" and "no float32 copy
of a bfloat16 tensor" are properties of this file alone; the training step's
backward (``_train_step.py``) uses the same two helpers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _validation

__all__ = ["Moments", "moments", "merge_moments", "cross_device_sum", "axis_size"]

#: A reduction around a shift ``K`` computes ``var = E[(x-K)^2] - (E[x]-K)^2``;
#: its relative rounding error is that of the sums times
#: ``E[(x-K)^2] / var``. When that amplification would exceed this limit the
#: sums are taken again around the better mean. 8 keeps float32 variances within
#: about 1e-6 of a float64 reference (XLA's float32 sums are accurate to ~1e-7),
#: and it tolerates a shift that is off by up to sqrt(7) ~ 2.6 standard
#: deviations, which a running mean satisfies once training has warmed up.
CANCELLATION_LIMIT = 8.0

#: Each re-shift moves the shift to within about 1e-6 |K - mean| of the mean
#: (float32 rounding of the sums), so a few reach any finite float32 offset;
#: the bound only stops a loop that cannot converge.
MAX_RESHIFTS = 16


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

    Features without any valid element have ``count == 0``, ``mean == shift``
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

    Static: it is known at trace time.

    Args:
      axis_name: ``None`` (no cross-device reduction: 1), a name, or a tuple of
        names bound by an enclosing ``pmap``, ``shard_map`` or ``vmap``.
      axis_index_groups: optional groups of device indices along the axis; the
        reduction then combines the devices of one group.

    Returns:
      The number of participants in one reduction.

    Raises:
      ValueError: ``axis_name`` is not bound here, or ``axis_index_groups`` do
        not split the axis into groups of one size that cover every index once.

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
        size = int(lax.axis_size(axis_name))
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here ({err}). Call this function "
            f"inside jax.shard_map(..., mesh=...) or jax.pmap(..., axis_name="
            f"{axis_name!r}) (or jax.vmap with that axis_name) whose axes include "
            f"{axis_name!r}. Under plain jax.jit with a sharded batch, pass "
            "axis_name=None: XLA inserts the cross-device reduction itself."
        ) from None
    if axis_index_groups is None:
        return size
    _check_axis_index_groups(axis_index_groups, axis_name, size)
    return len(axis_index_groups[0])


def _check_axis_index_groups(groups: Any, axis_name: AxisName, size: int) -> None:
    """Raises unless ``groups`` split ``range(size)`` into groups of one size."""
    expected = (
        f"a list of equally sized lists of device indices that together name each index "
        f"0..{size - 1} of axis {axis_name!r} exactly once"
    )
    try:
        flat = [index for group in groups for index in group]
        sizes = {len(group) for group in groups}
    except TypeError:
        raise TypeError(f"axis_index_groups must be {expected}, got {groups!r}.") from None
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in flat):
        raise TypeError(f"axis_index_groups must be {expected}, got {groups!r}.")
    if len(sizes) != 1:
        raise ValueError(f"axis_index_groups must all have the same size, got sizes {sorted(sizes)}.")
    if sorted(flat) != list(range(size)):
        raise ValueError(f"axis_index_groups must be {expected}, got {groups!r}.")
def cross_device_sum(
    values: Sequence[jax.Array],
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> list[jax.Array]:
    """Sums same-shaped arrays over devices with ONE collective.

    The arrays are stacked and reduced by a single ``lax.psum``, then split
    again. Without an ``axis_name`` they are returned unchanged (under plain
    ``jit`` XLA has already reduced over the sharded batch). Inside
    ``shard_map`` a tuple may name ``vmap`` axes beside mesh axes (with the
    default checks on): the ``vmap`` part is summed on the device, so it is
    still one collective.

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
    stacked = jnp.stack(values)
    manual = _manual_mesh_axes()
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    in_device = tuple(name for name in names if name not in manual)
    if manual and in_device and axis_index_groups is None:
        # Inside shard_map, a psum over a vmap axis trips JAX's varying-axes
        # check (which knows mesh axes only); it is a reduction on the device,
        # so take it with the check off, then one collective over the mesh axes.
        with _unchecked_varying_axes():
            stacked = lax.psum(stacked, in_device)
        names = tuple(name for name in names if name in manual)
        if not names:
            return list(stacked)
        return list(lax.psum(stacked, names))
    try:
        return list(lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups))
    except NotImplementedError as err:
        if axis_index_groups is None:
            raise
        raise NotImplementedError(
            f"axis_index_groups={axis_index_groups!r} with axis_name={axis_name!r}: JAX implements "
            "axis_index_groups under pmap only, not inside shard_map. For statistics over "
            "sub-groups of devices, factor the mesh axis instead, e.g. jax.make_mesh((replicas, "
            "group_size), ('replica', 'group')) with the batch sharded over ('replica', 'group'), "
            "and pass axis_name='group' (see the README's 'Sub-group statistics')."
        ) from err


def varying_axes(value: Any) -> frozenset:
    """The manual mesh axes ``value`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(value)
    vma = getattr(aval, "vma", None)  # newer JAX
    if vma is None:
        manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10
        vma = getattr(manual, "varying", frozenset())
    return frozenset(vma)


def varying_like(value: jax.Array, *likes: jax.Array) -> jax.Array:
    """``value``, typed to vary over every mesh axis one of ``likes`` varies over (a no-op cast)."""
    missing = frozenset().union(*map(varying_axes, likes)) - varying_axes(value)
    if not missing:
        return value
    return lax.pcast(value, tuple(sorted(missing, key=str)), to="varying")


def abs_square(v: jax.Array) -> jax.Array:
    """``|v|^2``, real for complex ``v`` (flax's ``_abs_sq``); ``v^2`` for real ``v``."""
    # v * v, not jnp.square: the same value, and a derivative v dt + dt v that a 0 cotangent keeps 0
    # where 2 v overflows (square's 2 v dt is inf * 0 = NaN there)
    return v.real * v.real + v.imag * v.imag if jnp.iscomplexobj(v) else v * v


def _manual_mesh_axes() -> frozenset:
    """The mesh axes an enclosing ``shard_map`` has made manual (empty elsewhere)."""
    mesh = jax.sharding.get_abstract_mesh()
    return frozenset(getattr(mesh, "manual_axes", ()) or ())


def _unchecked_varying_axes():
    """A context with shard_map's varying-axes check off, where JAX has that switch."""
    from jax._src import config  # private: there is no public switch for this check

    switch = getattr(config, "_check_vma", None)
    return switch(False) if switch is not None else contextlib.nullcontext()


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


class _Reduction(NamedTuple):
    """What every pass of one :func:`moments` call reduces, and how."""

    x: jax.Array
    mask: jax.Array | None
    axes: tuple[int, ...]
    dtype: Any  # of the sums: at least float32
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None


class _Plan(NamedTuple):
    """The static part of a :func:`moments` call (hashable)."""

    axes: tuple[int, ...]
    dtype: Any
    real_dtype: Any
    axis_name: AxisName | None
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    shifted: bool  # False: the first sums are of x itself
    reshift: bool | None


def _local_sums(
    reduction: _Reduction, reference: jax.Array | None, scale: jax.Array | None = None, second: bool = True
) -> list[jax.Array]:
    """This device's ``Σ s(x-K)`` (and ``Σ |s(x-K)|^2``) over the valid elements.

    ``reference`` None sums ``x`` itself (no subtraction is traced), ``scale``
    None multiplies by nothing. Both sides are scaled before the subtraction
    (exact: a power of two), so values more than the dtype's maximum apart
    still give a finite scaled deviation.
    """
    axes, dtype = reduction.axes, reduction.dtype

    def centered(x, reference, mask, scale):
        deviation = x.astype(dtype)
        if scale is not None:
            deviation = deviation * jnp.expand_dims(scale, axes)
            reference = None if reference is None else reference * scale
        if reference is not None:
            deviation = deviation - jnp.expand_dims(reference, axes)
        # where, not a product: masked-out NaN or Inf padding stays out.
        return deviation if mask is None else jnp.where(mask, deviation, 0)

    summands = [centered] + ([lambda *ops: abs_square(centered(*ops))] if second else [])
    return list(channel_sums(summands, [reduction.x, reference, reduction.mask, scale], axes))


def _global_sums(reduction: _Reduction, local: Sequence[jax.Array]) -> list[jax.Array]:
    """``local`` summed over devices in one collective (a complex sum as its two parts)."""
    parts, widths = [], []
    for value in local:
        is_complex = jnp.iscomplexobj(value)
        parts += [value.real, value.imag] if is_complex else [value]
        widths.append(2 if is_complex else 1)
    summed = cross_device_sum(parts, reduction.axis_name, reduction.axis_index_groups)
    result, i = [], 0
    for width in widths:
        result.append(summed[i] if width == 1 else lax.complex(summed[i], summed[i + 1]))
        i += width
    return result


def _finite_or(value: jax.Array, fallback: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(value), value, fallback)


def _poor_shift(
    shift: jax.Array, offset: jax.Array, raw_second: jax.Array, scale: jax.Array, near: jax.Array
) -> jax.Array:
    """Per feature: would another pass make the variance more exact?

    True where ``raw_second - |offset|^2`` amplifies rounding by more than
    :data:`CANCELLATION_LIMIT` or a sum overflowed (unless it already was a
    scaled sum taken ``near`` the mean, judged in scaled units: the variance
    itself is then beyond the dtype), and the better shift is finite (a NaN
    batch re-shifts nowhere); or where an unscaled sum overflowed to infinity.
    """
    overflow = ~jnp.isfinite(raw_second) | jnp.isinf(offset)
    amplified = ~(abs_square(offset) <= (1 - 1 / CANCELLATION_LIMIT) * raw_second) | overflow
    # A scaled sum that overflowed near the mean: the variance itself is beyond the dtype
    # (|offset|^2 may overflow too, while small against the spread).
    beyond_range = overflow & (scale != 1) & near
    move = amplified & ~beyond_range & jnp.isfinite(shift + offset)
    # A first sum that overflowed gives no better shift: the sums are re-taken scaled, in place.
    # (Its mean may be NaN, inf - inf of partial sums; a NaN second moment is NaN data.)
    rescale = overflow & (scale == 1) & ~jnp.isnan(raw_second)
    return move | rescale


def _reshift_until_exact(
    reduction: _Reduction, shift: jax.Array, offset: jax.Array, raw_second: jax.Array, count: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Re-takes the sums around the better mean while :func:`_poor_shift` holds anywhere.

    The steady state (a good shift) evaluates the test once and runs no pass.
    A second sum that overflows again after a re-shift is re-taken with the
    deviations scaled by a power of two, so any variance the dtype can
    represent is found. Every device sees the same global sums and so takes
    the same decision.
    """
    n = max(1, math.prod(reduction.x.shape[i] for i in reduction.axes) * axis_size(
        reduction.axis_name, reduction.axis_index_groups))
    # Deviations up to twice the dtype's maximum, squared and summed n times, stay finite.
    max_exponent = math.ceil(math.log2(jnp.finfo(offset.real.dtype).max)) // 2 + 1
    overflow_scale = 2.0 ** -(max_exponent + math.ceil(math.log2(n) / 2))
    one = varying_like(jnp.ones_like(raw_second), offset, raw_second)

    # The carry's scale is signed: its sign says whether the pass was taken near the mean, judged
    # in scaled units (a fifth, boolean, carry would cost the steady state one more kernel).
    def step(carry):
        shift, offset, raw_second, _, iteration = carry
        better = lax.stop_gradient(_finite_or(shift + offset, shift))
        # Scale where a re-shifted sum overflowed, or a first sum (no better shift). Around the
        # first better shift an overflow may still be the distance of a far shift: its scaled pass
        # then finds the mean (and the next, unscaled, the variance), one pass more than needed.
        overflow = ~jnp.isfinite(raw_second) & ((iteration > 0) | ~jnp.isfinite(offset))
        scale = jnp.where(overflow, overflow_scale, one).astype(one.dtype)
        unscale = 1 / scale  # exact: a power of two
        first, second = _global_sums(reduction, _local_sums(reduction, better, scale))
        first, second = first / count, second / count  # finite where scaled
        # judged in scaled units, where a variance beyond the dtype is still finite
        near = abs_square(first) <= (1 - 1 / CANCELLATION_LIMIT) * second
        # Multiplications, one factor at a time: scale^2 and count * scale^2 are subnormal.
        return better, first * unscale, second * unscale * unscale, jnp.where(near, scale, -scale), iteration + 1

    def again(carry):
        shift, offset, raw_second, signed_scale, iteration = carry
        near, scale = signed_scale > 0, jnp.abs(signed_scale)
        return jnp.any(_poor_shift(shift, offset, raw_second, scale, near)) & (iteration < MAX_RESHIFTS)

    if os.environ.get("JAXBN_MEASURE_WITHOUT_RESHIFT") == "1":
        # For benchmarks/gpu_suite.py only: what the loop's predicate costs a step (inexact at a poor shift).
        return shift, offset, raw_second
    # Inside shard_map the sums may vary over mesh axes the shift does not (a
    # replicated running mean, statistics over a sub-group axis): the loop's
    # carry must keep one type.
    shift = varying_like(shift, offset, raw_second)
    carry = lax.while_loop(again, step, (shift, offset, raw_second, one, jnp.zeros((), jnp.int32)))
    return carry[0], carry[1], carry[2]


def moments(
    x: jax.Array,
    axes: int | Sequence[int],
    *,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
    shift: jax.Array | None = None,
    reshift: bool | None = None,
) -> Moments:
    r"""Mean and variance over ``axes``, exact across devices and at large offsets.

    With ``K`` the shift (identical on every device), each device sums over its
    valid elements ``n_i = Σ 1``, ``S_{1,i} = Σ (x - K)``, ``S_{2,i} = Σ (x - K)^2``;
    one ``psum`` of the stacked sums gives the global ones, and

    .. math::
        \mu = K + S_1/n, \qquad \sigma^2 = S_2/n - (S_1/n)^2 .

    Weighting by counts makes masked or padded batches with different numbers
    of valid elements per device give exactly the statistics of all valid
    elements together. The rounding of the sums is amplified by
    ``(S_2/n) / σ^2``; where that exceeds :data:`CANCELLATION_LIMIT` in any
    feature (a shift far from the mean), the sums are taken again around the
    better mean until it does not, so the variance is exact for any finite
    shift (a non-finite one is replaced by 0). Complex input has a complex mean
    and the real variance ``E|x - μ|^2``.

    Args:
      x: floating or complex input; bfloat16/float16 are reduced in float32.
      axes: the axes to reduce (an int or a sequence).
      mask: optional boolean array broadcastable to ``x``; only ``True``
        elements count, whatever the others hold.
      axis_name: device axis name (or tuple of names) bound by ``pmap``,
        ``shard_map`` or ``vmap`` to reduce over as well; None under plain
        ``jit`` with a sharded batch, where XLA reduces globally.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: optional minimum dtype for the statistics (always at least float32).
      shift: optional reference point ``K``, broadcastable to the reduced shape;
        no gradient flows into it.
      reshift: None: re-shift while the test above fails on any feature (one
        global decision). True: always two passes (the mean around ``shift``,
        then both sums around it), with no decision shared between features.
        False: trust ``shift`` (one pass).

    Returns:
      :class:`Moments` with arrays of shape ``x.shape`` without ``axes``.

    Raises:
      TypeError: ``x`` is not floating or complex, or ``mask`` is not boolean.
      ValueError: ``axes`` or ``shift`` do not fit ``x``, or ``axis_name`` is
        not bound.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1e4 + 1.0, 2.0], [1e4 - 1.0, 4.0]])
    >>> m = moments(x, axes=0)
    >>> m.mean, m.var, m.count
    (Array([10000.,     3.], dtype=float32), Array([1., 1.], dtype=float32), Array([2., 2.], dtype=float32))
    >>> moments(x, 0, mask=jnp.array([[True], [False]])).count
    Array([1., 1.], dtype=float32)
    """
    x = _validation.check_inexact(x)
    _validation.check_static_bool(reshift, "reshift", none_ok=True)
    is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
    _validation.check_dtype(dtype, complex_ok=is_complex)
    axes = _validation.canonicalize_axes(x.ndim, axes, name="axes", allow_empty=True)
    requested = x.dtype if dtype is None else dtype
    if is_complex:  # a real dtype sets the precision; the statistics stay complex
        requested = jnp.promote_types(requested, jnp.complex64)
    stats_dtype = jnp.promote_types(requested, jnp.float32)
    real_dtype = jnp.finfo(stats_dtype).dtype  # of var and count: float32 for complex64
    feature_shape = tuple(x.shape[i] for i in range(x.ndim) if i not in axes)
    axis_size(axis_name, axis_index_groups)  # a clear error for an unbound name or bad groups
    if mask is not None:
        mask = _validation.check_mask(mask, x.shape)
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    plan = _Plan(axes, jnp.dtype(stats_dtype), jnp.dtype(real_dtype), axis_name, groups, shift is not None, reshift)
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
    with jax.named_scope("jaxbn.moments"):
        count, shift, offset, raw_second = _shifted_moments(plan, x, mask, lax.stop_gradient(_finite_or(shift, 0)))
        # A second moment beyond the dtype is a variance beyond it (not inf - inf = NaN).
        var = jnp.where(jnp.isposinf(raw_second), raw_second, jnp.maximum(raw_second - abs_square(offset), 0))
    return Moments(mean=shift + offset, var=var, count=count, shift=shift, mean_minus_shift=offset)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _shifted_moments(
    plan: _Plan, x: jax.Array, mask: jax.Array | None, shift: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(count, final shift K, E[x - K], E|x - K|^2)`` over the valid elements.

    Differentiated by :func:`_shifted_moments_jvp`: the derivatives at the
    final shift, so no derivative goes through the re-shift loop.
    """
    reduction = _Reduction(x, mask, plan.axes, plan.dtype, plan.axis_name, plan.axis_index_groups)
    local = _local_sums(reduction, shift if plan.shifted else None, second=not plan.reshift)
    if mask is None:
        size = math.prod(x.shape[i] for i in plan.axes) * axis_size(plan.axis_name, plan.axis_index_groups)
        count = jnp.full(shift.shape, size, plan.real_dtype)
        sums = _global_sums(reduction, local)
    else:
        local_count = jnp.sum(jnp.broadcast_to(mask, x.shape), plan.axes, dtype=plan.real_dtype)
        count, *sums = _global_sums(reduction, [local_count, *local])
    # Empty features divide by 1: their sums are 0, so mean = shift, var = 0.
    safe_count = jnp.maximum(count, 1)
    if plan.reshift:  # always re-center: no decision shared between features
        shift = lax.stop_gradient(_finite_or(shift + sums[0] / safe_count, shift))
        sums = _global_sums(reduction, _local_sums(reduction, shift))
    offset, raw_second = sums[0] / safe_count, sums[1] / safe_count
    if plan.reshift is None:
        shift, offset, raw_second = _reshift_until_exact(reduction, shift, offset, raw_second, safe_count)
    return count, shift, offset, raw_second


@_shifted_moments.defjvp
def _shifted_moments_jvp(plan, primals, tangents):
    x, mask, shift = primals
    count, shift, offset, raw_second = out = _shifted_moments(plan, x, mask, shift)
    shift = lax.stop_gradient(shift)
    reduction = _Reduction(x, mask, plan.axes, plan.dtype, plan.axis_name, plan.axis_index_groups)
    dx = tangents[0]

    # Linear in dx (no optimization barrier: reverse mode transposes this).
    deviation = x.astype(plan.dtype) - jnp.expand_dims(shift, plan.axes)
    # A deviation beyond the dtype (values of both signs near its maximum) means a variance beyond
    # it, whose derivative the normalization does not use: 0, not inf * 0 = NaN in reverse mode.
    deviation = jnp.where(jnp.isfinite(deviation), deviation, 0)
    dx = dx.astype(plan.dtype)
    if mask is not None:
        deviation, dx = jnp.where(mask, deviation, 0), jnp.where(mask, dx, 0)
    # d|d|^2 = 2 Re(conj(d) dd): 2 d dd for real input
    d_square = 2 * (deviation.conj() * dx).real if jnp.iscomplexobj(deviation) else 2 * deviation * dx
    d_first, d_second = _global_sums(reduction, [jnp.sum(dx, plan.axes), jnp.sum(d_square, plan.axes)])
    safe_count = jnp.maximum(count, 1)
    zeros = jnp.zeros_like(count)
    return out, (zeros, jnp.zeros_like(shift), d_first / safe_count, d_second / safe_count)


def merge_moments(parts: Sequence[Moments]) -> Moments:
    r"""The moments of several batches together, from each batch's :class:`Moments`.

    Exact count-weighted combination (what :func:`moments` of the
    concatenated batches gives, up to rounding), taken around the first
    part's shift so that large offsets cancel before they meet the rounding:

    .. math::
        n = \sum_i n_i, \qquad \mu = \frac{\sum_i n_i \mu_i}{n}, \qquad
        \sigma^2 = \frac{\sum_i n_i (\sigma_i^2 + (\mu_i - \mu)^2)}{n}.

    Use it to accumulate micro-batches: normalize each with
    ``batch_norm(..., update_running_stats=False, return_moments=True)``,
    merge, and apply one :func:`jaxbn.update_running_stats` per optimizer step.

    Args:
      parts: one or more :class:`Moments` of the same shape (features with no
        valid element, ``count == 0``, weigh nothing).

    Returns:
      :class:`Moments` of all parts, with the shift of the first part that
      has data (per feature; the first part's where none has).

    Raises:
      ValueError: ``parts`` is empty or the shapes differ.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0], [2.0], [3.0], [10.0]])
    >>> merged = merge_moments([moments(x[:1], 0), moments(x[1:], 0)])
    >>> merged.mean, merged.var, merged.count
    (Array([4.], dtype=float32), Array([12.5], dtype=float32), Array([4.], dtype=float32))
    """
    if isinstance(parts, Moments):
        raise TypeError("parts must be a sequence of Moments, got a single Moments; pass a list, e.g. [moments].")
    parts = list(parts)
    if not parts:
        raise ValueError(f"parts must be a non-empty sequence of Moments, got {parts!r}.")
    for i, part in enumerate(parts):
        if not isinstance(part, Moments):
            raise TypeError(
                f"parts must be a non-empty sequence of Moments, but parts[{i}] is a {type(part).__name__}."
            )
    shapes = {jnp.shape(part.mean) for part in parts}
    if len(shapes) != 1:
        raise ValueError(f"parts must all have one shape, got {sorted(shapes)}.")
    counts = [part.count for part in parts]
    # Per feature, the shift of the first part with data: an empty part's shift (and so its
    # mean) may lie anywhere, and taken as the common shift it would cost the offsets' precision.
    shift, found = parts[0].shift, counts[0] > 0
    for part, n in zip(parts[1:], counts[1:]):
        shift, found = jnp.where(~found & (n > 0), part.shift, shift), found | (n > 0)
    total = sum(counts[1:], counts[0])
    safe = jnp.maximum(total, 1)
    # each mean relative to the common shift: (K_i - K) + (mean_i - K_i); an empty part weighs
    # nothing (where, not a product: its distance squared may overflow, and 0 * inf is NaN)
    offsets = [jnp.where(n > 0, (part.shift - shift) + part.mean_minus_shift, 0) for n, part in zip(counts, parts)]
    offset = sum((n * d for n, d in zip(counts, offsets)), jnp.zeros_like(offsets[0])) / safe
    spread = sum(jnp.where(n > 0, n * (part.var + abs_square(d - offset)), 0)
                 for n, part, d in zip(counts, parts, offsets)) / safe
    return Moments(mean=shift + offset, var=spread, count=total, shift=shift, mean_minus_shift=offset)
