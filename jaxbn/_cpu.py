"""One-pass per-feature sums on XLA:CPU: the C++ kernels of ``_cpu_kernels.cc`` behind ``jax.ffi``.

XLA:CPU takes each sum over the batch with a library kernel that reads its
input once per sum, so batch norm's pair of sums reads the activation tensor
twice. :func:`sums` takes both in one read, on XLA's intra-op thread pool.
:func:`jaxbn.stats.moments` and the batch-norm backward use it through
``jaxbn.stats`` where :func:`layout` says it applies, and only when lowering
for the CPU; every other backend keeps XLA's own (fused) reductions.

XLA cannot partition a custom call, so the kernels are used only where the
program runs on one device's data: in a process with one device, or inside a
``shard_map`` (or ``pmap``) that has made every mesh axis manual. Under plain
``jit`` with several devices XLA's reductions remain, so a sharded batch is
never gathered onto one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os

import jax
import jax.numpy as jnp

try:  # built by setup.py; optional, so jaxbn works (with XLA's reductions) without it
    from jaxbn import _cpu_kernels
except ImportError:  # pragma: no cover - depends on the install
    _cpu_kernels = None

_SQUARE, _PRODUCT = "jaxbn_sums_square", "jaxbn_sums_product"
# JAXBN_CPU_KERNELS=0 turns the kernels off (XLA's reductions everywhere), e.g. to bisect.
_ENABLED = contextvars.ContextVar("jaxbn_cpu_kernels", default=os.environ.get("JAXBN_CPU_KERNELS", "1") != "0")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def available() -> bool:
    """Whether the compiled kernels are installed (registered with XLA on first call)."""
    if _cpu_kernels is None:
        return False
    for name, capsule in _cpu_kernels.targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return True


@contextlib.contextmanager
def disabled():
    """Within this context, functions traced use XLA's reductions (benchmarks and tests compare both)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _single_device_data() -> bool:
    """True where XLA will not partition the program: one device, or all mesh axes manual."""
    mesh = jax.sharding.get_abstract_mesh()
    names = set(getattr(mesh, "axis_names", ()) or ())
    if names:
        return names == set(getattr(mesh, "manual_axes", ()) or ())
    return jax.device_count() == 1


def flat_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(A, C, B)``: ``shape`` with the kept axes merged into C, the summed ones before and after.

    None when the kept axes are not contiguous (no reshape puts them in one
    dimension). Every axis summed is one feature: ``(1, 1, size)``.
    """
    kept = [i for i in range(len(shape)) if i not in axes]
    if not kept:
        return (1, 1, math.prod(shape))
    if kept != list(range(kept[0], kept[-1] + 1)):
        return None
    return (
        math.prod(shape[: kept[0]]),
        math.prod(shape[i] for i in kept),
        math.prod(shape[kept[-1] + 1 :]),
    )


def layout(x: jax.Array, weights: jax.Array | None, axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """:func:`flat_shape` of ``x`` where the kernels apply, else None.

    None where they do not: not installed or turned off
    (``JAXBN_CPU_KERNELS=0``, :func:`disabled`), a dtype other than
    float32/bfloat16, kept (feature) axes that are not contiguous or that
    lead the tensor (per-example statistics: XLA is faster there), or a
    program XLA may partition over several devices.
    """
    operands = [x] if weights is None else [x, weights]
    if any(jnp.dtype(v.dtype) not in _DTYPES for v in operands) or not _ENABLED.get() or not available():
        return None
    flat = flat_shape(x.shape, axes)
    # A = 1: each feature's values are one contiguous run (layer and RMS norm over the
    # last axes); XLA's row sums read x once already there and measured 1.1-1.7x faster.
    spread = flat is not None and flat[0] > 1
    return flat if spread and _single_device_data() else None


def _call(target, *operands):
    shift = operands[-1]
    # The shift's type, reshaped: inside shard_map it carries the mesh axes the sums vary over.
    result = jax.typeof(shift).update(shape=(2, shift.shape[-1]), dtype=jnp.dtype(jnp.float32), weak_type=False)
    # vmap adds leading dimensions to every operand; the kernels sum each separately.
    call = jax.ffi.ffi_call(target, result, vmap_method="broadcast_all")
    return call(*operands, rows=operands[0].ndim == 2)


def sums(
    x: jax.Array, weights: jax.Array | None, shift: jax.Array, shape: tuple[int, int, int]
) -> tuple[jax.Array, jax.Array]:
    """``(Σ(x-K), Σ(x-K)²)``, or with ``weights`` w ``(Σw, Σw(x-K))``, in float32, in one read.

    ``shape`` is :func:`layout`'s ``(A, C, B)``; the sums run over A and B, and
    come back with ``shift``'s shape (the kept axes). A custom call has no
    derivative: :func:`jaxbn.stats.moments` and the batch-norm backward
    differentiate XLA's formulation of the same sums instead.
    """
    features = shift.shape
    # (A, C) rather than (A, C, 1): XLA:CPU would copy a bfloat16 operand for the trailing 1.
    flat = lambda v: v.reshape(shape if shape[2] != 1 else shape[:2])
    k = shift.astype(jnp.float32).reshape(shape[1])
    if weights is None:
        pair = _call(_SQUARE, flat(x), k)
    else:
        pair = _call(_PRODUCT, flat(weights), flat(x), k)
    return pair[0].reshape(features), pair[1].reshape(features)
