"""Batch norm across 8 forced CPU devices: pmap, shard_map and jit with shardings.

Every distributed result is compared with the single-device result on the
global batch and with a float64 NumPy reference. Compiled functions are built
once per configuration (``functools.cache``) and shared between tests, since
compiling for 8 devices dominates this file's runtime.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from tests import hlo, reference
from tests.conftest import N_DEVICES, needs_devices, tiered

pytestmark = needs_devices

MESH = jax.make_mesh((N_DEVICES,), ("i",))  # (explicit axes: jax.make_mesh's default)
BATCH = NamedSharding(MESH, P("i"))
#: plain jit over a batch sharded on a mesh of explicit axes (sharding in types: each shard's
#: statistics, one all-gather) or of Auto axes (XLA propagates: global sums)
JIT_BATCH = {
    "jit_sharded": BATCH,
    "jit_auto": NamedSharding(
        jax.make_mesh((N_DEVICES,), ("i",), axis_types=(jax.sharding.AxisType.Auto,)), P("i")
    ),
}
MOMENTUM = 0.9
EPSILON = 1e-5
KINDS = ["pmap", "shard_map", "jit_sharded", "jit_auto"]
# (feature axis, global input shape): NHWC and NCHW, 2 examples per device.
LAYOUTS = {"NHWC": (-1, (16, 3, 3, 4)), "NCHW": (1, (16, 4, 3, 3))}


def _rng(seed):
    return np.random.default_rng(seed)


def _per_device(a):
    """(global batch, ...) -> (devices, local batch, ...) for pmap."""
    a = np.asarray(a) if not isinstance(a, jax.Array) else a
    return a.reshape((N_DEVICES, a.shape[0] // N_DEVICES) + a.shape[1:])


def _global(a):
    """(devices, local batch, ...) -> (global batch, ...)."""
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _forward_backward(x, params, state, w, *, axis, axis_name):
    """Training batch norm and the gradient of ``sum(w * y)`` (this device's loss)."""

    def loss(x, params):
        y, new_state = jaxbn.batch_norm(
            x,
            params,
            state,
            training=True,
            axis=axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            axis_name=axis_name,
        )
        return jnp.sum(w * y), (y, new_state)

    (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, params
    )
    return y, new_state, dx, dparams


@functools.cache
def _train_step(kind, axis):
    """``(x, params, state, w) -> (y, new_state, dx, dparams)`` on global arrays.

    ``new_state`` gains a leading device axis for pmap (one copy per device).
    Parameter gradients: under pmap each device differentiates its own loss,
    so its ``dparams`` are its local contribution and the global gradient is
    their sum over devices; under shard_map the parameters are replicated
    inputs (``P()``), so autodiff already sums their cotangents over devices
    (the transpose of the implicit broadcast is a psum) and every device holds
    the global gradient. ``dx`` needs no sum in either: the psum inside batch
    norm transposes to a psum, so each device gets d(sum of all losses)/dx.
    """
    if kind == "single":
        return jax.jit(functools.partial(_forward_backward, axis=axis, axis_name=None))
    if kind in JIT_BATCH:  # plain jit over a batch-sharded input: axis_name=None
        step = jax.jit(functools.partial(_forward_backward, axis=axis, axis_name=None))
        put = functools.partial(jax.device_put, device=JIT_BATCH[kind])
        return lambda x, p, s, w: step(put(x), p, s, put(w))
    local = functools.partial(_forward_backward, axis=axis, axis_name="i")
    if kind == "pmap":
        step = jax.pmap(local, axis_name="i", in_axes=(0, None, None, 0))

        def run(x, p, s, w):
            y, new_state, dx, dparams = step(_per_device(x), p, s, _per_device(w))
            return _global(y), new_state, _global(dx), jax.tree.map(lambda g: g.sum(0), dparams)

        return run
    step = jax.jit(
        jax.shard_map(
            local,
            mesh=MESH,
            in_specs=(P("i"), P(), P(), P("i")),
            out_specs=(P("i"), P(), P("i"), P()),
        )
    )
    return lambda x, p, s, w: step(jax.device_put(x, BATCH), p, s, jax.device_put(w, BATCH))


@pytest.mark.parametrize(  # the default tier: every kind in NHWC, NCHW under shard_map
    "kind, layout",
    tiered(KINDS, sorted(LAYOUTS), {*((kind, "NHWC") for kind in KINDS), ("shard_map", "NCHW")}),
)
def test_synchronized_batch_norm_equals_global_batch(kind, layout):
    """pmap/shard_map/jit-sharded outputs, state and gradients equal the global batch's."""
    axis, shape = LAYOUTS[layout]
    rng = _rng(1)
    channels = shape[axis]
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=channels), jnp.float32),
    }
    state = {
        "mean": jnp.asarray(rng.normal(size=channels), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32),
    }

    y1, state1, dx1, dp1 = _train_step("single", axis)(x, params, state, w)
    y, new_state, dx, dparams = _train_step(kind, axis)(x, params, state, w)

    # Float64 reference for the single-device result.
    mean, var = reference.batch_stats(x, axis)
    np.testing.assert_allclose(
        y1,
        reference.normalize(x, mean, var, params["scale"], params["bias"], axis, EPSILON),
        atol=2e-5,
    )
    np.testing.assert_allclose(
        state1["mean"],
        MOMENTUM * np.asarray(state["mean"]) + (1 - MOMENTUM) * mean,
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        state1["var"], MOMENTUM * np.asarray(state["var"]) + (1 - MOMENTUM) * var, rtol=1e-6
    )
    ref_dx, ref_dscale, ref_dbias = reference.batch_norm_grads(x, w, params["scale"], axis, EPSILON)
    np.testing.assert_allclose(dx1, ref_dx, atol=2e-5)
    np.testing.assert_allclose(dp1["scale"], ref_dscale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp1["bias"], ref_dbias, rtol=1e-5, atol=1e-5)

    # The distributed result equals the single-device one (and so the reference).
    if kind in JIT_BATCH:
        assert len(y.sharding.device_set) == N_DEVICES and not y.sharding.is_fully_replicated
    np.testing.assert_allclose(y, y1, atol=1e-5)
    np.testing.assert_allclose(dx, dx1, atol=1e-5)
    for key in ("scale", "bias"):
        np.testing.assert_allclose(dparams[key], dp1[key], rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        expected = np.broadcast_to(state1[key], np.shape(new_state[key]))  # per device under pmap
        np.testing.assert_allclose(new_state[key], expected, rtol=1e-6, atol=1e-7)


def _masked_forward(x, mask, params, state, *, axis_name):
    return jaxbn.batch_norm(
        x,
        params,
        state,
        training=True,
        axis=-1,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        axis_name=axis_name,
        mask=mask,
    )


@functools.cache
def _masked_step(kind):
    """``(x, mask, params, state) -> (y, per-device new states)`` on global arrays, NHWC."""
    local = functools.partial(_masked_forward, axis_name="i")
    if kind == "pmap":
        step = jax.pmap(local, axis_name="i", in_axes=(0, 0, None, None))

        def run(x, mask, p, s):
            y, new_state = step(_per_device(x), _per_device(mask), p, s)
            return _global(y), new_state

        return run
    step = jax.jit(
        jax.shard_map(
            local, mesh=MESH, in_specs=(P("i"), P("i"), P(), P()), out_specs=(P("i"), P())
        )
    )

    def run(x, mask, p, s):
        y, new_state = step(jax.device_put(x, BATCH), jax.device_put(mask, BATCH), p, s)
        # out_specs P() checks the state is replicated; give it pmap's per-device form.
        return y, jax.tree.map(lambda a: np.broadcast_to(a, (N_DEVICES,) + a.shape), new_state)

    return run


def _masked_data(seed, local_batch=8):
    """Global NHWC input where device d's examples are offset by d, and junk (1e3) padding."""
    rng = _rng(seed)
    shape = (N_DEVICES * local_batch, 2, 3)
    x = rng.normal(size=shape) + np.repeat(np.arange(N_DEVICES), local_batch)[:, None, None]
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    state = {
        "mean": jnp.asarray(rng.normal(size=3), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
    }
    return x, params, state


def _expected_state(state, mean, var):
    return {
        "mean": MOMENTUM * np.asarray(state["mean"], np.float64) + (1 - MOMENTUM) * mean,
        "var": MOMENTUM * np.asarray(state["var"], np.float64) + (1 - MOMENTUM) * var,
    }


@pytest.mark.parametrize("kind", ["pmap", "shard_map"])
def test_uneven_masked_counts_give_global_statistics(kind):
    """Device i with i+1 valid examples: state and outputs use the statistics of all valid elements."""
    local_batch = 8
    x, params, state = _masked_data(2, local_batch)
    valid = np.concatenate([np.arange(local_batch) <= d for d in range(N_DEVICES)])  # 1..8 valid
    mask = valid[:, None, None]
    x = np.where(mask, x, 1e3).astype(np.float32)  # padding that must not count

    mean, var = reference.batch_stats(x, -1, mask=np.broadcast_to(mask, x.shape))
    # The data distinguishes count weighting from averaging per-device means.
    per_device_means = [
        x[d * local_batch : d * local_batch + d + 1].mean((0, 1)) for d in range(N_DEVICES)
    ]
    assert np.all(np.abs(np.mean(per_device_means, 0) - mean) > 0.5)

    y, new_state = _masked_step(kind)(x, mask, params, state)
    expected = _expected_state(state, mean, var)
    for key in ("mean", "var"):
        np.testing.assert_allclose(
            new_state[key], np.broadcast_to(expected[key], (N_DEVICES, 3)), rtol=1e-6, atol=1e-6
        )
    # Every element is normalized with the global statistics, padding included.
    y_ref = reference.normalize(x, mean, var, params["scale"], params["bias"], -1, EPSILON)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["pmap", "shard_map"])
def test_fully_masked_devices_do_not_produce_nan(kind):
    """A fully masked device gives no NaN and the others' statistics; all masked keeps the state."""
    local_batch = 8  # the shapes of the test above: its compiled functions are reused
    x, params, state = _masked_data(3, local_batch)
    x = x.astype(np.float32)
    mask = np.ones((N_DEVICES * local_batch, 1, 1), bool)
    empty = 3
    mask[empty * local_batch : (empty + 1) * local_batch] = False
    run = _masked_step(kind)

    y, new_state = run(x, mask, params, state)
    others = np.delete(x, np.s_[empty * local_batch : (empty + 1) * local_batch], axis=0)
    mean, var = reference.batch_stats(others, -1)
    expected = _expected_state(state, mean, var)
    assert np.all(np.isfinite(y))
    for key in ("mean", "var"):
        assert np.all(np.isfinite(new_state[key]))
        np.testing.assert_allclose(
            new_state[key], np.broadcast_to(expected[key], (N_DEVICES, 3)), rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(
        y,
        reference.normalize(x, mean, var, params["scale"], params["bias"], -1, EPSILON),
        rtol=1e-5,
        atol=1e-4,
    )

    y, new_state = run(x, np.zeros_like(mask), params, state)
    assert np.all(np.isfinite(y))
    for key in (
        "mean",
        "var",
    ):  # exact: no valid element, the update is skipped, the old state selected unchanged
        np.testing.assert_array_equal(new_state[key], np.broadcast_to(state[key], (N_DEVICES, 3)))


@functools.cache
def _pmap_forward(training=True, axis_name="i"):
    """pmapped unmasked batch norm ``(x, params, state) -> (y, new_state)``, NHWC."""
    return jax.pmap(
        lambda x, p, s: jaxbn.batch_norm(
            x, p, s, training=training, momentum=MOMENTUM, axis_name=axis_name
        ),
        axis_name="i",
        in_axes=(0, None, None),
    )


def test_nan_on_one_device_keeps_state_on_every_device():
    """A NaN in one example on one device leaves the running statistics unchanged everywhere."""
    rng = _rng(4)
    x = rng.normal(size=(N_DEVICES, 2, 3, 4)).astype(np.float32)
    params, state = jaxbn.batch_norm_init(4)
    step = _pmap_forward()

    _, clean_state = step(x, params, state)
    assert not np.allclose(clean_state["mean"], state["mean"])  # a finite batch does update

    x[5, 1, 2, 0] = np.nan
    y, new_state = step(x, params, state)
    assert np.isnan(np.asarray(y)).any()  # the output is what the input deserves
    for key in ("mean", "var"):  # exact: the update is skipped, the old state selected unchanged
        np.testing.assert_array_equal(new_state[key], np.broadcast_to(state[key], (N_DEVICES, 4)))


def _replicated(tree):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEVICES,) + a.shape), tree)


def test_hlo_counter_on_hand_made_functions():
    """tests/hlo.py counts collectives outside/inside conditionals and loop bodies, and async pairs once."""

    def f(x):
        total = lax.psum(x, "i")  # unconditional
        y = lax.cond(total.sum() > 0, lambda: lax.psum(2 * x, "i"), lambda: x)  # in a branch
        trips = (total[0] > 100).astype(jnp.int32) + 3  # not static: stays a while loop
        return lax.fori_loop(0, trips, lambda _, c: lax.psum(c, "i") / 8, y)  # in a loop body

    text = hlo.compiled_text(jax.pmap(f, axis_name="i"), jnp.ones((N_DEVICES, 4)))
    assert " while(" in text and " conditional(" in text
    assert hlo.count_collectives(text) == 1
    assert hlo.count_in_branches(text) == 2  # the branch and the loop body
    assert hlo.count_collectives(text, include_branches=True) == 3
    assert hlo.count_collectives(text, op="all-gather") == 0

    hand_made = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%true_branch (t: (f32[2], f32[])) -> (f32[2], f32[]) {
  %t = (f32[2]{0}, f32[]) parameter(0)
  %g = f32[2]{0} get-tuple-element(%t), index=0
  %ar = f32[2]{0} all-reduce(%g), replica_groups={}, to_apply=%add
  ROOT %out = (f32[2]{0}, f32[]) tuple(%ar, %ar)
}

ENTRY %main (p: f32[2], q: pred[]) -> (f32[2], f32[]) {
  %p = f32[2]{0} parameter(0)
  %q = pred[] parameter(1)
  %start = ((f32[2]{0}, f32[]), f32[2]{0}) all-reduce-start(%p, %p), to_apply=%add, metadata={op_name="all-reduce("}
  %done = f32[2]{0} all-reduce-done(%start)
  %tup = (f32[2]{0}, f32[]) tuple(%done, %done)
  ROOT %c = (f32[2]{0}, f32[]) conditional(%q, %tup, %tup), true_computation=%true_branch, false_computation=%add
}
"""
    assert hlo.count_collectives(hand_made) == 1
    assert hlo.count_in_branches(hand_made) == 1
    assert hlo.count_per_execution(hand_made) == 1  # the false branch runs none
    assert hlo.count_per_execution(text) == 1  # the branch at its cheapest, the loop at zero trips
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.count_collectives("HloModule empty")


@pytest.mark.parametrize("mask_shape", [None, (16, 1, 1, 1), (16, 4, 4, 1), (16, 4, 4, 8)])
@pytest.mark.parametrize(
    "kind, collectives",
    [
        # explicit axes: (all-gathers, all-reduces) forward, then forward and backward, any mask
        ("jit_sharded", {None: ((1, 0), (1, 1))}),
        # Auto axes: all-reduces (none gathers), the mask of examples or positions one more
        ("jit_auto", {None: ((0, 3), (0, 4)), (16, 1, 1, 1): ((0, 4), (0, 5))}),
    ],
)
def test_collectives_under_jit_with_a_sharded_batch(kind, collectives, mask_shape):
    """Without an axis name (docs/multi_device.md). A batch sharded on a mesh of explicit axes
    (sharding in types): each shard's statistics on its own device, then one all-gather of every
    shard's (count, K, mean - K, var), merged in shard order; the backward's one all-reduce. On
    Auto axes XLA's partitioner makes the collectives of the global sums: one all-reduce gives
    every device K (the first element, on the first shard), one per pass, one in the backward; a
    mask sharded as the batch adds one forward where it is small (of examples or of positions:
    the first valid element searched in the mask's own shape) and none where it is as large as x
    (the shift its largest valid element). No control flow either way."""
    params, state = jaxbn.batch_norm_init(8)
    put = functools.partial(jax.device_put, device=JIT_BATCH[kind])
    x = put(jnp.ones((N_DEVICES * 2, 4, 4, 8)))
    masks = () if mask_shape is None else (put(jnp.ones(mask_shape, bool)),)
    small_mask = mask_shape is not None and mask_shape != x.shape
    expected = collectives[(16, 1, 1, 1) if small_mask and kind == "jit_auto" else None]

    def forward(x, p, *mask):
        return jaxbn.batch_norm(x, p, state, training=True, mask=(*mask, None)[0])

    def step(x, p, *mask):
        loss = lambda x, p: jnp.sum(jnp.sin(forward(x, p, *mask)[0]))
        return jax.grad(loss, argnums=(0, 1))(x, p)

    for program, (all_gathers, all_reduces) in zip((forward, step), expected, strict=True):
        text = jax.jit(program).lower(x, params, *masks).compile().as_text()
        assert hlo.count_collectives(text, op="all-gather") == all_gathers, program.__name__
        assert hlo.count_collectives(text) == all_reduces, program.__name__
        assert " while(" not in text and " conditional(" not in text


@pytest.mark.parametrize(
    "case, all_gathers, all_reduces",
    [
        ("train_forward", 1, 0),
        ("train_forward_backward", 1, 1),
        ("train_masked_forward", 1, 0),
        ("inference", 0, 0),
        ("shard_map_train_forward", 1, 0),
        ("linen_train_forward", 1, 0),
    ],
)
def test_collectives_per_batch_norm_call(case, all_gathers, all_reduces):
    """Compiled HLO: training runs one all-gather forward and one all-reduce backward; inference none."""
    # The forward's statistics: every device's stacked (count, K, mean - K, var) travel in ONE
    # all-gather and are merged in a fixed order on every device (stats.merge_stacked): no
    # all-reduce. The backward: the custom VJP's stacked [Σdy, Σdy·x̂] psum (which also yields
    # the parameter gradients where they are replicated), one all-reduce. Nothing depends on
    # the data: no while loop, no conditional, so every execution runs exactly these.
    x = jnp.ones((N_DEVICES, 4, 3))
    params, state = jaxbn.batch_norm_init(3)
    if case == "train_forward":
        fn, args = _pmap_forward(), (x, params, state)
    elif case == "inference":
        fn, args = _pmap_forward(training=False), (x, params, state)
    elif case == "train_masked_forward":
        fn = jax.pmap(
            functools.partial(_masked_forward, axis_name="i"),
            axis_name="i",
            in_axes=(0, 0, None, None),
        )
        args = (x, jnp.ones((N_DEVICES, 4, 1), bool), params, state)
    elif case == "train_forward_backward":

        def loss(x, p, s):
            y, _ = jaxbn.batch_norm(x, p, s, training=True, axis_name="i")
            return jnp.sum(jnp.sin(y))

        fn = jax.pmap(jax.grad(loss, argnums=(0, 1)), axis_name="i", in_axes=(0, None, None))
        args = (x, params, state)
    elif case == "shard_map_train_forward":
        fn = jax.jit(
            jax.shard_map(
                lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True, axis_name="i"),
                mesh=MESH,
                in_specs=(P("i"), P(), P()),
                out_specs=(P("i"), P()),
            )
        )
        args = (jax.device_put(_global(x), BATCH), params, state)
    else:
        module = jaxbn.linen.BatchNorm(use_running_average=False, axis_name="i")
        variables = module.init(jax.random.key(0), x[0])
        fn = jax.pmap(
            lambda v, x: module.apply(v, x, mutable=["batch_stats"]),
            axis_name="i",
            in_axes=(None, 0),
        )
        args = (variables, x)
    lowered = fn.lower(*args)
    text = lowered.compile().as_text()
    assert hlo.count_collectives(text, op="all-gather") == all_gathers
    assert hlo.count_collectives(text) == all_reduces
    assert " while(" not in text and " conditional(" not in text  # no data-dependent control flow
    for op in ("all-gather", "all-reduce"):
        assert hlo.count_in_branches(text, op=op) == 0
    # Before XLA optimizes: jaxbn itself emits one (stacked) collective per reduction.
    # XLA's combiners would merge separate independent all-gathers or psums, so only
    # these counts see whether the statistics really travel in one array.
    stablehlo = lowered.as_text()
    assert stablehlo.count('"stablehlo.all_gather"') == all_gathers
    assert stablehlo.count('"stablehlo.all_reduce"') == all_reduces
    assert "stablehlo.while" not in stablehlo


STEPS = 50


@functools.cache
def _pmap_scan(momentum):
    """pmapped ``lax.scan`` of training steps: ``(xs, params, state) -> (ys, states)``."""

    def local(xs, params, state):
        def step(state, x):
            y, state = jaxbn.batch_norm(
                x, params, state, training=True, momentum=momentum, axis_name="i"
            )
            return state, (y, state)

        return lax.scan(step, state, xs)[1]

    return jax.pmap(local, axis_name="i", in_axes=(0, None, None))


@pytest.mark.parametrize(
    "dtype, param_dtype, means",
    [
        ("float32", "float32", (1e2, 1e3, 1e4, 1e5)),
        ("bfloat16", "float32", (1e2,) * 4),
        ("bfloat16", "bfloat16", (1e2,) * 4),
    ],
)
def test_large_offsets_keep_variance_exact(dtype, param_dtype, means):
    """Mean up to 1e5, std 1, 8 devices: batch variance within 1e-5 at step 1 and over 50 steps."""
    # bfloat16 at 1e2 pins dtype handling and the output bound; it cannot catch
    # cancellation: its values are multiples of 0.5, so even E[x^2] - E[x]^2 is
    # exact in float32 for this batch size. The float32 case pins stability.
    # momentum=0 makes the state the batch statistics themselves (0*old + 1*batch
    # is exact). Step 1 is a cold start (running mean 0, up to 1e5 std from the
    # batch mean); steps 2..50 run with the previous batch's mean as running mean.
    # The statistics must be exact at both, asserted below from the float64 data.
    rng = _rng(5)
    channels = len(means)
    shape = (N_DEVICES, STEPS, 4, 4, channels)  # 16 values per channel per device and step
    xs = jnp.asarray(rng.normal(size=shape) + np.asarray(means), dtype)
    x64 = np.asarray(xs.astype(jnp.float32), np.float64)  # the rounded values themselves
    params, state = jaxbn.batch_norm_init(channels, dtype=param_dtype)
    state = jax.tree.map(lambda a: a.astype(jnp.float32), state)

    ys, states = _pmap_scan(0.0)(xs, params, state)
    assert ys.dtype == jnp.result_type(dtype, param_dtype)

    batch = np.moveaxis(x64, 1, 0).reshape(
        STEPS, -1, channels
    )  # step, all devices' values, channel
    mean, var = batch.mean(1), batch.var(1)
    np.testing.assert_array_equal(np.asarray(state["mean"]), 0)  # step 1: a cold start
    assert np.all(np.abs(mean[0]) > 50 * np.sqrt(var[0]))  # ... far from every batch mean

    for device in range(N_DEVICES):
        var_jax = np.asarray(states["var"][device], np.float64)
        rel = np.abs(var_jax - var) / var
        assert rel[0].max() <= 1e-5, f"step 1 variance rel err {rel[0]}"
        assert rel.max() <= 1e-5, f"variance rel err over {STEPS} steps: {rel.max(0)}"
        np.testing.assert_allclose(states["mean"][device], mean, rtol=1e-6)

    y_ref = (x64 - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    err = np.abs(np.asarray(ys, np.float64) - y_ref)
    if ys.dtype == jnp.float32:
        assert err[:, [0, -1]].max() <= 1e-4  # includes the 1e5 channel at steps 1 and 50
        assert err.max() <= 1e-4
    else:
        # bfloat16 output: rounding to nearest costs at most half an ulp, 2^-8 |y|.
        assert np.all(err <= 2.0**-8 * np.abs(y_ref) + 1e-4)


def test_linen_module_under_pmap_equals_global_batch():
    """jaxbn.linen.BatchNorm(axis_name='i') under pmap equals the module on the global batch, 3 steps."""
    rng = _rng(6)
    batches = [(rng.normal(size=(16, 3, 5)) * (i + 1) + 3 - i).astype(np.float32) for i in range(3)]
    module = jaxbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name="i")
    single_module = module.clone(axis_name=None)
    variables = single_module.init(jax.random.key(0), batches[0])
    params = variables["params"]

    single = jax.jit(
        lambda p, s, x: single_module.apply(
            {"params": p, "batch_stats": s}, x, mutable=["batch_stats"]
        )
    )
    pmapped = jax.pmap(
        lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"]),
        axis_name="i",
        in_axes=(None, 0, 0),
    )
    ref_outputs, ref_state = reference.batch_norm_steps(batches, momentum=MOMENTUM, epsilon=EPSILON)
    stats_single = variables["batch_stats"]
    stats_devices = _replicated(variables["batch_stats"])
    for x, y_ref in zip(batches, ref_outputs):
        y1, updates1 = single(params, stats_single, x)
        y, updates = pmapped(params, stats_devices, _per_device(x))
        stats_single, stats_devices = updates1["batch_stats"], updates["batch_stats"]
        np.testing.assert_allclose(y1, y_ref, atol=2e-5)
        np.testing.assert_allclose(_global(y), y1, atol=1e-5)
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                stats_devices[key],
                np.broadcast_to(stats_single[key], (N_DEVICES, 5)),
                rtol=1e-6,
                atol=1e-6,
            )
    for key in ("mean", "var"):
        np.testing.assert_allclose(stats_single[key], ref_state[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["eager", "jit", "pmap_other_name"])
def test_unbound_axis_name_raises(where):
    """axis_name that no enclosing pmap/shard_map binds raises a ValueError saying how to bind it."""
    params, state = jaxbn.batch_norm_init(3)
    x = jnp.ones((N_DEVICES, 4, 3))

    def call(x):
        return jaxbn.batch_norm(x, params, state, training=True, axis_name="i")

    fn = {"eager": call, "jit": jax.jit(call), "pmap_other_name": jax.pmap(call, axis_name="j")}[
        where
    ]
    with pytest.raises(ValueError, match=r"(?s)'i'.*shard_map.*pmap"):
        fn(x)


def test_tuple_of_axis_names_reduces_over_both():
    """axis_name=('i', 'v') (pmap over devices, vmap inside) equals the global batch, grads too."""
    rng = _rng(11)
    x = (rng.normal(size=(N_DEVICES, 2, 3, 4)) * 2 + 50).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    params, state = jaxbn.batch_norm_init(4)

    def loss(x, w, p):
        y, new_state = jaxbn.batch_norm(
            x, p, state, training=True, momentum=MOMENTUM, axis_name=("i", "v")
        )
        return jnp.sum(w * y), new_state

    inner = jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(0, 0, None), axis_name="v")
    (_, new_state), dx = jax.pmap(inner, axis_name="i", in_axes=(0, 0, None))(x, w, params)
    flat_x, flat_w = x.reshape(-1, 4), w.reshape(-1, 4)
    mean, var = reference.batch_stats(flat_x)
    np.testing.assert_allclose(
        new_state["mean"][0, 0], MOMENTUM * 0 + (1 - MOMENTUM) * mean, rtol=1e-6
    )
    np.testing.assert_allclose(
        new_state["var"][3, 1], MOMENTUM * 1 + (1 - MOMENTUM) * var, rtol=1e-5
    )
    ref_dx, _, _ = reference.batch_norm_grads(flat_x, flat_w, params["scale"], -1, EPSILON)
    np.testing.assert_allclose(dx.reshape(-1, 4), ref_dx, atol=2e-5)


# The running-statistics options and complex input sync like plain batch norm.
OPTIONS = {
    "cumulative": dict(momentum=None),
    "unbiased": dict(momentum=MOMENTUM, unbiased_running_var=True),
    "complex": dict(momentum=MOMENTUM),
    "renorm": dict(momentum=MOMENTUM, r_max=1.5, d_max=0.5),
}


def _option_data(option):
    rng = _rng(12)
    shape = (16, 3, 4)
    x = rng.normal(size=shape) * 2 + 1
    w = rng.normal(size=shape)
    if option == "complex":
        x, w = x + 1j * rng.normal(size=shape), w + 1j * rng.normal(size=shape)
    dtype = np.complex64 if option == "complex" else np.float32
    params, state = jaxbn.batch_norm_init(4, cumulative=option == "cumulative")
    if option == "cumulative":
        state = {**state, "mean": jnp.full(4, 0.5), "count": jnp.asarray(2.0)}
    if option == "complex":
        state = {**state, "mean": state["mean"].astype(jnp.complex64)}
    return x.astype(dtype), w.astype(dtype), params, state


def _option_step(x, w, params, state, *, option, axis_name):
    kwargs = dict(OPTIONS[option])
    fn = jaxbn.batch_renorm if option == "renorm" else jaxbn.batch_norm

    def loss(x, params):
        y, new_state = fn(x, params, state, training=True, axis_name=axis_name, **kwargs)
        return jnp.sum(jnp.real(jnp.conj(w) * y)), (y, new_state)

    (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, params
    )
    return y, new_state, dx, dparams


@pytest.mark.parametrize(
    "kind", [k if k == "shard_map" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS]
)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_and_complex_input_sync_like_batch_norm(option, kind):
    """Cumulative average, unbiased variance, batch renorm and complex input: the global batch's results."""
    x, w, params, state = _option_data(option)
    single = jax.jit(functools.partial(_option_step, option=option, axis_name=None))
    y1, state1, dx1, dp1 = single(x, w, params, state)
    if kind in JIT_BATCH:
        put = functools.partial(jax.device_put, device=JIT_BATCH[kind])
        y, new_state, dx, dparams = single(put(x), put(w), params, state)
    elif kind == "shard_map":
        local = functools.partial(_option_step, option=option, axis_name="i")
        step = jax.jit(
            jax.shard_map(
                local,
                mesh=MESH,
                in_specs=(P("i"), P("i"), P(), P()),
                out_specs=(P("i"), P(), P("i"), P()),
            )
        )
        y, new_state, dx, dparams = step(
            jax.device_put(x, BATCH), jax.device_put(w, BATCH), params, state
        )
    else:
        local = functools.partial(_option_step, option=option, axis_name="i")
        y, new_state, dx, dparams = jax.pmap(local, axis_name="i", in_axes=(0, 0, None, None))(
            _per_device(x), _per_device(w), params, state
        )
        y, dx = _global(y), _global(dx)
        new_state = jax.tree.map(lambda a: a[0], new_state)
        dparams = jax.tree.map(
            lambda g: g.sum(0), dparams
        )  # each device's gradient of its own loss
    np.testing.assert_allclose(np.asarray(y), y1, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dx), dx1, atol=2e-5)
    for key in state1:
        np.testing.assert_allclose(np.asarray(new_state[key]), state1[key], rtol=2e-6, atol=1e-6)
    for key in dp1:
        np.testing.assert_allclose(np.asarray(dparams[key]), dp1[key], rtol=1e-5, atol=2e-5)
    if option == "cumulative":  # (2 batches averaged before) -> the mean of 3
        np.testing.assert_allclose(state1["count"], 3.0)
        np.testing.assert_allclose(
            state1["mean"], (2 * 0.5 + x.reshape(-1, 4).mean(0)) / 3, rtol=1e-5
        )
    if option == "unbiased":
        n = x.size // 4
        var = np.asarray(x, np.float64).reshape(-1, 4).var(0) * n / (n - 1)
        np.testing.assert_allclose(state1["var"], MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-5)
    if option == "complex":
        z = np.asarray(x, np.complex128).reshape(-1, 4)
        var = np.mean(np.abs(z - z.mean(0)) ** 2, 0)
        np.testing.assert_allclose(state1["var"], MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-5)


#: sharding in types: jax.set_mesh over a mesh of 4 x 2 devices, x sharded over its batch, its
#: channels or both (the per-example norms' statistics are of each example: sharded with it)
TYPED_MESH = jax.make_mesh((N_DEVICES // 2, 2), ("d", "m"))
TYPED_SPECS = {
    "batch": P("d"),
    "channels": P(None, None, None, "m"),
    "batch and channels": P("d", None, None, "m"),
}


def _typed_calls(features):
    """``{name: f(x, mask, state)}``: every normalizer's training call (and moments), NHWC input."""
    params = {"scale": jnp.linspace(0.5, 1.5, features), "bias": jnp.linspace(-1, 1, features)}
    renorm = dict(r_max=1.5, d_max=0.5)
    return {
        "batch_norm": lambda x, m, s: jaxbn.batch_norm(x, params, s, training=True, mask=m),
        "batch_renorm": lambda x, m, s: jaxbn.batch_renorm(
            x, params, s, training=True, mask=m, **renorm
        ),
        "layer_norm": lambda x, m, s: jaxbn.layer_norm(x, params, mask=m),
        "rms_norm": lambda x, m, s: jaxbn.rms_norm(x, {"scale": params["scale"]}, mask=m),
        "group_norm": lambda x, m, s: jaxbn.group_norm(x, params, num_groups=4, mask=m),
        "instance_norm": lambda x, m, s: jaxbn.instance_norm(x, params, mask=m),
        "moments of examples": lambda x, m, s: jaxbn.moments(x, (1, 2, 3), mask=m),
        "moments of channels": lambda x, m, s: jaxbn.moments(x, (0, 1, 2), mask=m),
    }


@pytest.mark.parametrize(
    "spec, masked",
    tiered(sorted(TYPED_SPECS), (False, True), {("batch and channels", True), ("batch", False)}),
)
def test_sharding_in_types_equals_the_unsharded_call(spec, masked, rng):
    """Under ``jax.set_mesh`` (explicit axes: shardings are part of the types, and a select takes
    operands of one sharding), every normalizer trains on a sharded batch, its gradient too, as
    without shardings; y keeps x's sharding and the running statistics theirs. (The per-feature
    values jaxbn makes, e.g. a fallback shift or a count, take the statistics' sharding: before,
    every per-example norm, and batch norm with sharded channels, failed to trace.)"""
    shape = (N_DEVICES * 2, 4, 4, 8)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(*shape[:3], 1)) < 0.8) if masked else None
    sharding = NamedSharding(TYPED_MESH, TYPED_SPECS[spec])
    calls = _typed_calls(shape[-1])

    def every_call(x, m, s):  # (one program for all: a compilation each is most of the time)
        outputs = {name: call(x, m, s) for name, call in calls.items()}
        loss = lambda call: (
            lambda x: sum(
                jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(call(x, m, s)) if leaf.ndim
            )
        )
        return outputs, {name: jax.grad(loss(call))(x) for name, call in calls.items()}

    state = jaxbn.batch_norm_init(shape[-1])[1]
    expected = jax.jit(every_call)(x, mask, state)
    with jax.set_mesh(TYPED_MESH):  # (the state an argument, replicated)
        x_sharded = jax.device_put(x, sharding)
        m_sharded = None
        if masked:
            m_sharded = jax.device_put(mask, NamedSharding(TYPED_MESH, P(sharding.spec[0])))
        state = jax.device_put(state, NamedSharding(TYPED_MESH, P()))
        outputs, gradients = jax.jit(every_call)(x_sharded, m_sharded, state)
    for name in calls:
        got, want = (outputs[name], gradients[name]), (expected[0][name], expected[1][name])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        assert gradients[name].sharding.is_equivalent_to(sharding, x.ndim), name
        if not name.startswith("moments"):
            y = outputs[name][0] if name.startswith("batch") else outputs[name]
            assert y.sharding.is_equivalent_to(sharding, y.ndim), name
        if name.startswith("batch"):  # the running statistics keep theirs (replicated)
            assert outputs[name][1]["mean"].sharding.is_fully_replicated, name


@pytest.mark.parametrize(
    "name, spec, forward, backward",
    [
        ("batch_norm", "batch", 1, 1),
        ("batch_norm", "batch and channels", 1, 1),
        ("layer_norm", "channels", 1, 1),
        ("rms_norm", "batch and channels", 1, 1),
        ("moments of channels", "batch", 1, 0),  # (the variance's derivative needs no sum)
        ("group_norm", "batch and channels", 0, 0),  # (each device holds whole groups)
    ],
)
def test_statistics_over_split_axes_take_one_collective_each_way(name, spec, forward, backward):
    """Sharding in types, no axis name: where the statistics span an axis split over devices (the
    batch for batch norm, the channels for layer norm), each shard's statistics are taken on its
    device and ONE all-gather merges them (docs/multi_device.md); the backward's sums ONE
    all-reduce. Before: 3 all-reduces forward, and layer norm's backward all-gathered dy and y
    whole (its replicated scale met the sharded x)."""
    shape = (N_DEVICES * 2, 4, 4, 8)
    sharding = NamedSharding(TYPED_MESH, TYPED_SPECS[spec])
    call = _typed_calls(shape[-1])[name]
    state = jaxbn.batch_norm_init(shape[-1])[1]
    first = lambda x: jax.tree.leaves(call(x, None, state))[0]
    gradient = jax.grad(lambda x: jnp.sum(jnp.sin(first(x))))
    with jax.set_mesh(TYPED_MESH):
        x = jax.device_put(jnp.ones(shape), sharding)
        texts = [jax.jit(f).lower(x).compile().as_text() for f in (first, gradient)]
    counts = [
        {op: hlo.count_collectives(text, op=op) for op in ("all-gather", "all-reduce")}
        for text in texts
    ]
    assert counts[0] == {"all-gather": forward, "all-reduce": 0}, counts
    assert counts[1] == {"all-gather": forward, "all-reduce": backward}, counts
