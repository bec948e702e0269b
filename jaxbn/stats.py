"""Statistics: the one place in jaxbn that reduces.

Every normalizer gets its mean and variance from :func:`moments`; every sum
over the batch on a device is taken by :func:`channel_sums` (formulated per
backend) or, for batch norm's pair of sums on XLA:CPU, by the C++ kernels of
:mod:`jaxbn._cpu` that take both in one read (``_paired_sums`` chooses); and
every value that crosses devices goes through :func:`cross_device_sum`. So
"one collective per layer per direction", "count-weighted across devices" and
"no float32 copy of a bfloat16 tensor" are properties of this file alone; the
custom VJP in ``_kernels.py`` uses the same helpers for its backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _cpu, _validation

__all__ = [
    "Moments", "moments", "channel_sums", "cross_device_sum", "axis_size", "sums_around_shift",
    "CANCELLATION_LIMIT", "SKIP_ZERO_SHIFT_MIN_SIZE",
]

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


def _varying_axes(value: Any) -> frozenset:
    """The manual mesh axes ``value`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(value)
    vma = getattr(aval, "vma", None)  # newer JAX
    if vma is None:
        manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10
        vma = getattr(manual, "varying", frozenset())
    return frozenset(vma)


def _varying_like(value: jax.Array, *likes: jax.Array) -> jax.Array:
    """``value``, typed to vary over every mesh axis one of ``likes`` varies over (a no-op cast)."""
    missing = frozenset().union(*map(_varying_axes, likes)) - _varying_axes(value)
    if not missing:
        return value
    return lax.pcast(value, tuple(sorted(missing, key=str)), to="varying")


#: Below this many elements per device a tensor's sums always subtract the
#: shift: skipping the subtraction when the shift is 0 takes a conditional,
#: which costs XLA:CPU more (~10 us) than the subtraction saves on a small tensor.
SKIP_ZERO_SHIFT_MIN_SIZE = 1 << 17


def sums_around_shift(sums: Callable[[jax.Array | None], Any], shift: jax.Array, size: int) -> Any:
    """``sums(shift)``, or on XLA:CPU ``sums(None)`` when ``shift`` is exactly 0 in every feature.

    ``sums(None)`` must mean sums of ``x`` itself: on XLA:CPU a library
    reduction without the subtraction of a broadcast shift runs about 1.5x
    faster. Batch norm picks the shift 0 whenever its running statistics show
    it is a good one, so the steady state of typical activations takes this
    path. Elsewhere (XLA:GPU/TPU fuse the subtraction into the reduction for
    free) and for tensors of fewer than :data:`SKIP_ZERO_SHIFT_MIN_SIZE`
    elements (``size``), it is ``sums(shift)``, without a conditional.

    Args:
      sums: ``reference -> sums``, with ``reference`` the shift or None.
      shift: the per-feature shift.
      size: the number of elements of the summed tensor on this device.

    Returns:
      What ``sums`` returns; the same values either way, up to rounding.

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1 << 17, 2))
    >>> sums = lambda k: channel_sums([lambda x: x if k is None else x - k], [x], (0,))
    >>> sums_around_shift(sums, jnp.zeros(2), x.size)  # on CPU: sums of x, no subtraction
    (Array([131072., 131072.], dtype=float32),)
    """
    if size < SKIP_ZERO_SHIFT_MIN_SIZE:
        return sums(shift)

    def on_cpu(shift):
        return lax.cond(jnp.all(shift == 0), lambda: sums(None), lambda: sums(shift))

    return lax.platform_dependent(shift, cpu=on_cpu, default=sums)


def _paired_sums(
    x: jax.Array,
    weights: jax.Array | None,
    shift: jax.Array,
    axes: tuple[int, ...],
    dtype: Any,
    with_xla: Callable[[jax.Array, jax.Array | None, jax.Array], Any],
) -> list[jax.Array]:
    """Batch norm's pair of local sums, in one read of the tensors on XLA:CPU.

    ``(Σ(x-K), Σ(x-K)²)``, or with ``weights`` w ``(Σw, Σw(x-K))``, over
    ``axes``. Lowered for the CPU where the compiled kernels apply
    (:mod:`jaxbn._cpu`: float32/bfloat16 tensors, float32 sums, a feature's
    values spread over the tensor, one device's data), they take both sums in
    one pass; otherwise, and on every other backend, the sums are
    ``with_xla(x, weights, shift)``, XLA's reductions (:func:`channel_sums`).
    Values agree to rounding. Differentiated, they are always ``with_xla``'s:
    its derivative fuses with the rest of the program, a custom call's could not.
    """
    shape = _cpu.layout(x, weights, axes) if jnp.dtype(dtype) == jnp.float32 else None
    if shape is None:
        return list(with_xla(x, weights, shift))

    def on_cpu(x, weights, shift):
        # A custom call's result is typed like its shift: make that vary as the sums do.
        like = (x,) if weights is None else (x, weights)
        return list(_cpu.sums(x, weights, _varying_like(shift, *like), shape))

    @jax.custom_jvp
    def sums(x, weights, shift):
        return lax.platform_dependent(x, weights, shift, cpu=on_cpu, default=lambda *ops: list(with_xla(*ops)))

    sums.defjvp(lambda primals, tangents: jax.jvp(lambda *ops: list(with_xla(*ops)), primals, tangents))
    return sums(x, weights, shift)


def _abs_square(v: jax.Array) -> jax.Array:
    """``|v|^2``, real for complex ``v`` (flax's ``_abs_sq``); ``v^2`` for real ``v``."""
    return jnp.square(v.real) + jnp.square(v.imag) if jnp.iscomplexobj(v) else jnp.square(v)


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

    **Complex input** (complex64/complex128): the mean (and ``shift``) is
    complex, the variance is the real ``E[|x - mu|^2]`` (all squares above are
    ``|.|^2``), and ``count`` and ``var`` have the matching real dtype
    (float32 for complex64), as :class:`flax.linen.BatchNorm` computes them.
    The complex first sum crosses devices as its real and imaginary parts in
    the same single collective.

    Args:
      x: floating or complex input. bfloat16/float16 are reduced in float32;
        float64 and complex stay as they are.
      axes: the axes to reduce (an int or a sequence).
      mask: optional boolean array broadcastable to ``x``; only ``True``
        elements count.
      axis_name: device axis name (or tuple of names) bound by ``pmap``,
        ``shard_map`` or ``vmap`` to reduce over as well; None under plain
        ``jit`` with a sharded batch, where XLA reduces globally.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      dtype: optional minimum dtype for the statistics (always at least
        float32); for complex ``x`` a real dtype gives its precision (float64:
        complex128 statistics).
      shift: optional reference point, broadcastable to the reduced shape;
        treated as a constant (no gradient flows into it).
      reshift: None (default): re-shift when the amplification test above
        fails on any feature (one global, data-dependent decision). True:
        always take the first sum around ``shift``, then both sums around the
        rough mean (two passes, exact at any offset, and no decision shared
        between features, so independent feature groups, such as ghost batches
        on different devices, need no collective). False: trust ``shift``
        (one pass; exact only when it is near the mean).

    Returns:
      :class:`Moments` with arrays of shape ``x.shape`` without ``axes``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1e4 + 1.0, 2.0], [1e4 - 1.0, 4.0]])
    >>> m = moments(x, axes=0)
    >>> m.mean, m.var, m.count
    (Array([10000.,     3.], dtype=float32), Array([1., 1.], dtype=float32), Array([2., 2.], dtype=float32))
    >>> moments(x, 0, mask=jnp.array([[True], [False]])).count
    Array([1., 1.], dtype=float32)
    >>> z = jnp.array([1 + 1j, -1 - 1j, 3 + 1j, 1 - 1j])
    >>> moments(z, axes=0)[:2]  # mean 1 + 0j, var E|z - 1|^2 = 2
    (Array(1.+0.j, dtype=complex64), Array(2., dtype=float32))
    """
    x = _validation.check_inexact(x)
    _validation.check_static_bool(reshift, "reshift", none_ok=True)
    is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
    _validation.check_dtype(dtype, complex_ok=is_complex)
    axes = _validation.canonicalize_axes(x.ndim, axes, name="axes")
    requested = x.dtype if dtype is None else dtype
    if is_complex:  # a real dtype sets the precision; the statistics stay complex
        requested = jnp.promote_types(requested, jnp.complex64)
    stats_dtype = jnp.promote_types(requested, jnp.float32)
    real_dtype = jnp.finfo(stats_dtype).dtype  # of var and count: float32 for complex64
    feature_shape = tuple(x.shape[i] for i in range(x.ndim) if i not in axes)
    group_size = axis_size(axis_name, axis_index_groups)
    if mask is not None:
        mask = _validation.check_mask(mask, x.shape)

    if shift is None:
        shift = jnp.zeros(feature_shape, stats_dtype)
        known_zero = shift  # the first sums are of x itself: no subtraction is traced
    else:
        known_zero = None
        try:
            shift = jnp.broadcast_to(jnp.asarray(shift, stats_dtype), feature_shape)
        except ValueError:
            raise ValueError(
                f"shift of shape {jnp.shape(shift)} does not broadcast to the reduced "
                f"shape {feature_shape} (the input shape {x.shape} without axes {axes})."
            ) from None
        shift = lax.stop_gradient(shift)

    def centered(x, reference, mask):
        deviation = x.astype(stats_dtype)
        if reference is not None:
            deviation = deviation - jnp.expand_dims(reference, axes)
        # where, not a product: masked-out NaN or Inf padding stays out.
        return deviation if mask is None else jnp.where(mask, deviation, 0)

    def local_sums(reference, with_second=True, skip_zero_shift=False):
        summands = [centered] + ([lambda *ops: _abs_square(centered(*ops))] if with_second else [])

        zero = reference is known_zero  # no subtraction is traced

        def with_xla(x, _, reference):
            def sums(k):
                return list(channel_sums(summands, [x, k, mask], axes))

            if zero:
                return sums(None)
            # Not with reshift=True: the test spans every feature (all devices under jit).
            return sums_around_shift(sums, reference, x.size) if skip_zero_shift else sums(reference)

        if with_second and mask is None and not is_complex:
            return _paired_sums(x, None, reference, axes, stats_dtype, with_xla)
        return with_xla(x, None, reference)

    def global_sums(local):
        # One collective: a complex sum travels as its real and imaginary parts.
        parts, widths = [], []
        for value in local:
            complex_value = jnp.iscomplexobj(value)
            parts += [value.real, value.imag] if complex_value else [value]
            widths.append(2 if complex_value else 1)
        summed = cross_device_sum(parts, axis_name, axis_index_groups)
        result, i = [], 0
        for width in widths:
            result.append(summed[i] if width == 1 else lax.complex(summed[i], summed[i + 1]))
            i += width
        return result

    sums = local_sums(shift, with_second=not reshift, skip_zero_shift=not reshift)
    if mask is None:
        count = jnp.full(feature_shape, math.prod(x.shape[i] for i in axes) * group_size, real_dtype)
        sums = global_sums(sums)
    else:
        local_count = jnp.sum(jnp.broadcast_to(mask, x.shape), axes, dtype=real_dtype)
        count, *sums = global_sums([local_count, *sums])
    # Empty channels divide by 1: their sums are 0, so mean = shift, var = 0.
    safe_count = jnp.maximum(count, 1)

    if reshift:  # always re-center: no decision shared between features
        shift = lax.stop_gradient(shift + sums[0] / safe_count)
        first, second = global_sums(local_sums(shift))
        offset, raw_second = first / safe_count, second / safe_count
    else:
        first, second = sums
        offset = first / safe_count
        raw_second = second / safe_count

    if reshift is None:
        # var = raw_second - |offset|^2 amplifies rounding by raw_second / var; the
        # comparison is False for NaN, so a non-finite batch takes the cheap branch.
        poor_shift = jnp.any(_abs_square(offset) * CANCELLATION_LIMIT > (CANCELLATION_LIMIT - 1) * raw_second)

        def reshifted():
            better = lax.stop_gradient(shift + offset)
            first, second = global_sums(local_sums(better))
            return better, first / safe_count, second / safe_count

        # Inside shard_map the sums may vary over mesh axes the shift does not (a
        # replicated running mean, statistics over a sub-group axis): both branches
        # must return the same types.
        shift, offset, raw_second = lax.cond(
            poor_shift, reshifted, lambda: (_varying_like(shift, offset), offset, raw_second)
        )
    var = jnp.maximum(raw_second - _abs_square(offset), 0)
    return Moments(mean=shift + offset, var=var, count=count, shift=shift, mean_minus_shift=offset)
