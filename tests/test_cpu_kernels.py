"""jaxbn's C++ sums for XLA:CPU (``jaxbn/_cpu_kernels.cc`` behind :mod:`jaxbn._cpu`).

The kernels take batch norm's two per-feature sums in one read. They must
agree with a float64 NumPy reference for every layout the flattening produces
(rows of features, runs of one feature, tails that are not a multiple of the
vector width, runs longer than a float32 accumulation block), every dtype pair
and under ``vmap``; differentiated, the sums must be exactly XLA's; and the
kernels must stay out of programs XLA may partition, so a sharded batch is
never gathered, and out of per-example statistics, where XLA is faster. ``tests/test_single_device.py`` runs this file, and the
batch-norm suites, on one device, where plain ``jit`` uses the kernels.
"""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _cpu

needs_kernels = pytest.mark.skipif(not _cpu.available(), reason="jaxbn._cpu_kernels is not built")
# Whether plain jit uses the kernels in this process: one device (tests/test_single_device.py).
PLAIN_JIT_USES_KERNELS = _cpu.available() and jax.device_count() == 1
F32, BF16 = jnp.float32, jnp.bfloat16

# (shape, summed axes): what the flattening to (A, C, B) meets in practice.
LAYOUTS = {
    "nhwc_tail": ((16, 5, 5, 37), (0, 1, 2)),  # rows; 37 = 2 groups of 16 + 5 single features
    "rows_exact": ((7, 48), (0,)),  # rows; 3 groups of 16
    "rows_narrow": ((300, 3), (0,)),  # rows narrower than one group
    "nchw": ((2, 19, 9, 9), (0, 2, 3)),  # runs of 81
    "long_runs": ((3, 5, 4100), (0, 2)),  # runs longer than a float32 block (2048), odd tail
    "layer_norm": ((5, 3, 40), (2,)),  # one run per feature: A = 1
    "all_axes": ((4, 6), (0, 1)),  # a single feature
    "one_element": ((1, 1), (0,)),
}
DTYPE_PAIRS = [(F32, None), (BF16, None), (F32, F32), (BF16, BF16), (BF16, F32), (F32, BF16)]


def _data(shape, axes, x_dtype, w_dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape), x_dtype)
    w = None if w_dtype is None else jnp.asarray(rng.normal(0.0, 1.0, shape), w_dtype)
    features = tuple(n for i, n in enumerate(shape) if i not in axes)
    shift = jnp.asarray(rng.normal(3.0, 0.5, features), F32)
    return x, w, shift


def _reference(x, w, shift, axes):
    """The two sums in float64, each with the sum of its summands' magnitudes (for a tolerance)."""
    x = np.asarray(x, np.float64)
    centered = x - np.expand_dims(np.asarray(shift, np.float64), axes)
    if w is None:
        summands = (centered, centered**2)
    else:
        w = np.asarray(w, np.float64)
        summands = (w, w * centered)
    return [(v.sum(axes), np.abs(v).sum(axes)) for v in summands]


def _sums(x, w, shift, axes):
    return jax.jit(lambda x, w, k: _cpu.sums(x, w, k, _cpu.flat_shape(x.shape, axes)))(x, w, shift)


def test_kernels_are_built_where_ci_runs():
    """setup.py builds the extension on Linux (x86-64 or Arm), so the fast path is what CI tests."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("the extension is optional elsewhere")
    assert _cpu.available()


@needs_kernels
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=lambda d: getattr(d, "__name__", str(d)))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sums_match_float64(layout, x_dtype, w_dtype):
    """Both sums of each kernel equal float64 sums of the same (rounded) inputs."""
    shape, axes = LAYOUTS[layout]
    x, w, shift = _data(shape, axes, x_dtype, w_dtype)
    for got, (want, magnitude) in zip(_sums(x, w, shift, axes), _reference(x, w, shift, axes)):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        # float32 accumulation in blocks of at most 2048 values, float64 between blocks
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.max(magnitude) + 1e-6)


@needs_kernels
def test_flat_shape():
    """Kept axes must be contiguous to merge into one dimension."""
    assert _cpu.flat_shape((2, 3, 4, 5), (0, 1, 2)) == (24, 5, 1)
    assert _cpu.flat_shape((2, 3, 4, 5), (0, 2, 3)) == (2, 3, 20)
    assert _cpu.flat_shape((2, 3, 4, 5), (0, 3)) == (2, 12, 5)
    assert _cpu.flat_shape((2, 3, 4), (0, 1, 2)) == (1, 1, 24)
    assert _cpu.flat_shape((2, 3, 4), (1,)) is None


@needs_kernels
def test_sums_are_deterministic():
    """The chunks are fixed by the shape, so repeated calls agree to the bit."""
    x, w, shift = _data((64, 8, 8, 32), (0, 1, 2), F32, F32)
    first = [np.asarray(v) for v in _sums(x, w, shift, (0, 1, 2))]
    for _ in range(3):
        for a, b in zip(first, _sums(x, w, shift, (0, 1, 2))):
            np.testing.assert_array_equal(a, b)


@needs_kernels
@pytest.mark.parametrize("layout", ["nhwc_tail", "nchw"])
def test_vmap_sums_each_instance(layout):
    """vmap adds a leading dimension; each instance gets its own sums."""
    shape, axes = LAYOUTS[layout]
    xs, ws, shifts = zip(*(_data(shape, axes, F32, F32, seed) for seed in range(3)))
    xs, ws, shifts = (jnp.stack(v) for v in (xs, ws, shifts))
    flat = _cpu.flat_shape(shape, axes)
    batched = jax.jit(jax.vmap(lambda x, w, k: _cpu.sums(x, w, k, flat)))(xs, ws, shifts)
    for i in range(3):
        for got, (want, _) in zip(batched, _reference(xs[i], ws[i], shifts[i], axes)):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-3)


def _one_device_shard_map(fn):
    """``fn`` in a shard_map over one device: every mesh axis is manual, so the kernels apply."""
    mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))


@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_derivatives_are_those_of_xla_sums(dtype):
    """Differentiated, the sums are XLA's: the JVP of moments equals, to the bit, the one without kernels."""
    rng = np.random.default_rng(0)
    x, dx = (jnp.asarray(rng.normal(2.0, 3.0, (16, 6, 6, 24)), dtype) for _ in range(2))
    shift = jnp.full((24,), 2.0)

    def jvp(args):
        x, dx = args
        return jax.jvp(lambda x: tuple(jaxbn.moments(x, (0, 1, 2), shift=shift)[:2]), (x,), (dx,))

    fast = _one_device_shard_map(jvp)
    assert " custom-call(" not in fast.lower((x, dx)).compile().as_text()
    with _cpu.disabled():
        reference = _one_device_shard_map(jvp)((x, dx))
    for got, want in zip(jax.tree_util.tree_leaves(fast((x, dx))), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(got, want)


@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_batch_norm_agrees_with_xla_sums(dtype):
    """Outputs, statistics, and first and second derivatives: C++ sums vs XLA's, one program each."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (16, 6, 6, 24)), dtype)
    dy = jnp.asarray(rng.normal(size=x.shape), dtype)
    params, state = jaxbn.batch_norm_init(24)

    def step(args):
        x, dy, params, state = args

        def loss(x, params):
            y, new_state = jaxbn.batch_norm(x, params, state, training=True, dtype=dtype)
            return jnp.sum(y.astype(F32) * dy.astype(F32)), new_state

        (value, new_state), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        # a second derivative: the gradient of |dL/dx|^2 differentiates the custom VJP's backward
        second = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: loss(x, params)[0])(x).astype(F32) ** 2))(x)
        return value, new_state, grads, second

    args = (x, dy, params, state)
    fast = _one_device_shard_map(step)
    assert " custom-call(" in fast.lower(args).compile().as_text()
    with _cpu.disabled():
        slow = _one_device_shard_map(step)
        assert " custom-call(" not in slow.lower(args).compile().as_text()
        reference = slow(args)
    tolerance = 2e-2 if dtype == BF16 else 1e-4
    for got, want in zip(jax.tree_util.tree_leaves(fast(args)), jax.tree_util.tree_leaves(reference)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * max(1.0, np.max(np.abs(want))))


@needs_kernels
def test_only_where_xla_will_not_partition():
    """Never in plain jit over several devices (a custom call would be gathered); always in a full shard_map."""
    x = jnp.ones((8, 4, 4, 16), F32)
    axes = (0, 1, 2)
    seen = {}

    def record(where):
        def fn(x):
            seen[where] = _cpu.layout(x, None, axes)
            return x

        return fn

    jax.jit(record("jit"))(x)
    assert seen["jit"] == ((8 * 16, 16, 1) if PLAIN_JIT_USES_KERNELS else None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("i",))
    jax.jit(jax.shard_map(record("shard_map"), mesh=mesh, in_specs=P("i"), out_specs=P("i")))(x)
    assert seen["shard_map"] == (8 // jax.device_count() * 16, 16, 1)
    assert _cpu.layout(x.astype(jnp.float16), None, axes) is None  # float32 and bfloat16 only
    assert _cpu.layout(jnp.ones((2, 3, 4)), None, (1,)) is None  # kept axes 0 and 2
    assert _cpu.layout(jnp.ones((64, 128)), None, (1,)) is None  # per-example: XLA's row sums are faster
    with _cpu.disabled():
        assert _cpu.layout(x, None, axes) is None


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py forces them)")
def test_sharded_batch_is_not_gathered():
    """Under jit with the batch sharded over 8 devices: XLA's reductions, one all-reduce, no all-gather."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("i",))
    x = jax.device_put(jnp.ones((64, 4, 4, 16)), jax.NamedSharding(mesh, P("i")))
    params, state = jaxbn.batch_norm_init(16)
    text = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True)).lower(x).compile().as_text()
    assert " custom-call(" not in text and "all-gather" not in text
    assert "all-reduce" in text


def test_other_backends_lower_without_the_kernels():
    """The kernels are XLA:CPU's only: lowering for GPU or TPU (no such device needed) has no custom call."""
    x = jnp.ones((8, 4, 4, 16))
    params, state = jaxbn.batch_norm_init(16)

    def forward_backward(x, params):
        return jax.grad(lambda x, p: jnp.sum(jaxbn.batch_norm(x, p, state, training=True)[0] ** 2), (0, 1))(x, params)

    traced = jax.jit(forward_backward).trace(x, params)
    calls = {platform: traced.lower(lowering_platforms=(platform,)).as_text().count("jaxbn_sums")
             for platform in ("cpu", "cuda", "tpu")}
    on_cpu = 3 if PLAIN_JIT_USES_KERNELS else 0  # forward, its re-shift branch, backward
    assert calls == {"cpu": on_cpu, "cuda": 0, "tpu": 0}


def test_environment_switch_turns_the_kernels_off():
    """JAXBN_CPU_KERNELS=0 leaves XLA's reductions everywhere (for bisecting)."""
    code = "import jax.numpy as jnp; from jaxbn import _cpu; print(_cpu.layout(jnp.ones((4, 3)), None, (0,)))"
    env = {**os.environ, "JAXBN_CPU_KERNELS": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
