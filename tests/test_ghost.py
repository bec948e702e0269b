"""Ghost (virtual) batch norm: ``batch_norm(..., ghost_batch_size=g)``.

Each group of ``g`` consecutive examples is normalized with its own
statistics; the running statistics average the groups' statistics (count
weighted). Compared with a float64 NumPy reference, with autodiff of a float64
``jnp`` reference for gradients, with plain batch norm at ``g = B``, and across
8 forced CPU devices (pmap, shard_map, jit with a batch sharding) with the
collectives of the compiled programs counted.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from tests import hlo, reference
from tests.conftest import N_DEVICES, structural, tiered

MOMENTUM = 0.9
EPSILON = 1e-5
# (feature axis, shape): 16 examples, ghost batches of 4
LAYOUTS = {"NHWC": (-1, (16, 3, 3, 4)), "NCHW": (1, (16, 4, 3, 3))}
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # jax < 0.7
    from jax.experimental.shard_map import shard_map


def _data(shape, axis, seed=0, offset=5.0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = rng.normal(size=shape) * 1.5 + offset
    x += rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)) * 2  # groups differ
    params = {"scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(size=channels)}
    state = {"mean": rng.normal(size=channels), "var": rng.uniform(0.5, 2, channels)}
    return x, params, state


def _mask(kind, shape, seed=1):
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "examples":  # whole examples, broadcast: a (B, 1, 1, 1) mask
        mask = np.ones((shape[0],) + (1,) * (len(shape) - 1), bool)
        mask[[1, 6, 7, 13]] = False
        return mask
    return rng.uniform(size=shape) < 0.7  # elements


def ghost_reference(
    x, ghost, axis, params, state, mask=None, momentum=MOMENTUM, epsilon=EPSILON, unbiased=False
):
    """Float64 ghost batch norm: per-group statistics; state from their count-weighted average."""
    x = np.asarray(x, np.float64)
    mask = None if mask is None else np.broadcast_to(mask, x.shape)
    outputs, counts, means, variances = [], [], [], []
    for start in range(0, x.shape[0], ghost):
        group = x[start : start + ghost]
        group_mask = None if mask is None else mask[start : start + ghost]
        mean, var = reference.batch_stats(group, axis, group_mask)
        outputs.append(
            reference.normalize(group, mean, var, params["scale"], params["bias"], axis, epsilon)
        )
        valid = np.ones(group.shape, bool) if group_mask is None else group_mask
        counts.append(np.moveaxis(valid, axis, -1).reshape(-1, group.shape[axis]).sum(0))
        means.append(mean)
        variances.append(var)
    counts, means, variances = map(np.asarray, (counts, means, variances))
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    var = (counts * variances).sum(0) / total
    if unbiased:
        var = var * total / (total - 1)
    new_state = {
        "mean": momentum * np.asarray(state["mean"]) + (1 - momentum) * mean,
        "var": momentum * np.asarray(state["var"]) + (1 - momentum) * var,
    }
    return np.concatenate(outputs), new_state


def _as(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


@functools.cache
def _step(ghost, axis, **kwargs):
    return jax.jit(
        functools.partial(
            jaxbn.batch_norm,
            training=True,
            axis=axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            ghost_batch_size=ghost,
            **kwargs,
        )
    )


TOLERANCES = {jnp.float32: (3e-5, 1e-5), jnp.bfloat16: (3e-2, 1e-3), jnp.float64: (1e-10, 1e-12)}


@pytest.mark.parametrize("mask_kind", [None, "examples", "elements"])
@pytest.mark.parametrize(
    "dtype, layout",
    [  # the default tier: float32 in both layouts, bfloat16 in NHWC; x64 in the slow tier
        pytest.param(
            dtype,
            layout,
            id=f"{name}-{layout}",
            marks=() if name == "f32" or (name, layout) == ("bf16", "NHWC") else pytest.mark.slow,
        )
        for dtype, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"), (jnp.float64, "f64"))
        for layout in sorted(LAYOUTS)
    ],
)
def test_outputs_and_running_statistics_match_float64_reference(dtype, layout, mask_kind):
    """Each ghost batch normalized by its own statistics; state from their count-weighted average."""
    axis, shape = LAYOUTS[layout]
    x, params, state = _data(shape, axis)
    mask = _mask(mask_kind, shape)
    with jax.enable_x64(dtype == jnp.float64):
        stats_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
        xd = jnp.asarray(x, dtype)
        y, new_state = _step(4, axis)(
            xd, _as(params, stats_dtype), _as(state, stats_dtype), mask=mask
        )
        assert y.dtype == stats_dtype and y.shape == shape  # flax's rule: promotion of x and params
        y_ref, state_ref = ghost_reference(np.asarray(xd, np.float64), 4, axis, params, state, mask)
        y_tol, state_tol = TOLERANCES[dtype]
        np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, atol=y_tol, rtol=y_tol)
        for key in state_ref:
            assert new_state[key].dtype == stats_dtype
            np.testing.assert_allclose(
                np.asarray(new_state[key], np.float64),
                state_ref[key],
                rtol=state_tol,
                atol=state_tol,
            )


def test_unbiased_running_var_uses_total_count():
    """unbiased_running_var scales the averaged ghost variance by N / (N - 1), N the total count."""
    axis, shape = LAYOUTS["NHWC"]
    x, params, state = _data(shape, axis)
    _, new_state = _step(4, axis, unbiased_running_var=True)(
        jnp.asarray(x, jnp.float32), _as(params, jnp.float32), _as(state, jnp.float32)
    )
    _, state_ref = ghost_reference(x, 4, axis, params, state, unbiased=True)
    np.testing.assert_allclose(new_state["var"], state_ref["var"], rtol=1e-5)


def _ghost_loss(ghost, axis, mask=None, **kwargs):
    def loss(x, params, state, w):
        y, new_state = jaxbn.batch_norm(
            x,
            params,
            state,
            training=True,
            axis=axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            ghost_batch_size=ghost,
            mask=mask,
            **kwargs,
        )
        return jnp.sum(w * y), (y, new_state)

    return loss


@pytest.mark.parametrize(
    "layout, masked", tiered(sorted(LAYOUTS), (False, True), {("NCHW", False), ("NHWC", True)})
)
def test_ghost_size_equal_to_batch_is_batch_norm(layout, masked):
    """g = B is plain batch norm: y, state and gradients agree to float32 rounding.

    The ghost view only adds a size-1 axis (a bitcast) and broadcasts the
    parameters to shape (1, C), so every sum runs over the same elements; but
    the two are different programs, which XLA may fuse (and so round)
    differently on another backend: not compared bit for bit.
    """
    axis, shape = LAYOUTS[layout]
    x, params, state = _data(shape, axis)
    w = np.random.default_rng(3).normal(size=shape)
    mask = _mask("elements", shape) if masked else None
    args = (
        jnp.asarray(x, jnp.float32),
        _as(params, jnp.float32),
        _as(state, jnp.float32),
        jnp.asarray(w, jnp.float32),
    )
    results = []
    for ghost in (None, shape[0]):
        grad = jax.value_and_grad(_ghost_loss(ghost, axis, mask), argnums=(0, 1), has_aux=True)
        (_, (y, new_state)), grads = jax.jit(grad)(*args)
        results.append((y, new_state, grads))
    for plain, ghost in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(ghost, plain, rtol=1e-6, atol=1e-6 * np.abs(plain).max())


def _jnp_ghost_reference(x, params, ghost, axis, mask):
    """Float64 ghost batch norm in plain jnp (two-pass statistics), differentiated by JAX."""
    axis = axis % x.ndim
    groups = x.reshape((x.shape[0] // ghost, ghost) + x.shape[1:])
    valid = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    valid = valid.reshape(groups.shape)
    axes = tuple(i for i in range(1, groups.ndim) if i != axis + 1)
    count = valid.sum(axes, keepdims=True)
    mean = jnp.where(valid, groups, 0).sum(axes, keepdims=True) / count
    var = jnp.where(valid, (groups - mean) ** 2, 0).sum(axes, keepdims=True) / count
    shape = [1] * groups.ndim
    shape[axis + 1] = x.shape[axis]
    y = (groups - mean) / jnp.sqrt(var + EPSILON) * params["scale"].reshape(shape) + params[
        "bias"
    ].reshape(shape)
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    "layout, masked",
    [  # ~5-15 s each: the default tier keeps NHWC, masked
        (layout, masked)
        if (layout, masked) == ("NHWC", True)
        else pytest.param(layout, masked, marks=pytest.mark.slow)
        for masked in (False, True)
        for layout in sorted(LAYOUTS)
    ],
)
def test_gradients_match_autodiff_of_float64_reference(layout, masked):
    """dx, dscale, dbias of sum(w * y) in float64 equal jax.grad of a plain jnp ghost batch norm."""
    axis, shape = LAYOUTS[layout]
    x, params, state = _data(shape, axis)
    w = np.random.default_rng(4).normal(size=shape)
    mask = _mask("elements", shape) if masked else None
    with jax.enable_x64(True):
        args = (jnp.asarray(x), _as(params, jnp.float64), _as(state, jnp.float64), jnp.asarray(w))
        grads = jax.grad(lambda *a: _ghost_loss(4, axis, mask)(*a)[0], argnums=(0, 1))(*args)
        expected = jax.grad(
            lambda x, p: jnp.sum(args[3] * _jnp_ghost_reference(x, p, 4, axis, mask)),
            argnums=(0, 1),
        )(args[0], args[1])
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
        y = _ghost_loss(4, axis, mask)(*args)[1][0]
        np.testing.assert_allclose(
            y, _jnp_ghost_reference(args[0], args[1], 4, axis, mask), atol=1e-12
        )


def test_non_finite_ghost_batch_keeps_whole_state():
    """A NaN in one ghost batch: its outputs are NaN, the others finite, the state (every channel) unchanged."""
    axis, shape = LAYOUTS["NHWC"]
    x, params, state = _data(shape, axis)
    x[5, 0, 0, 1] = np.nan  # ghost batch 1 (examples 4-7), channel 1
    params, state = _as(params, jnp.float32), _as(state, jnp.float32)
    y, new_state = _step(4, axis)(jnp.asarray(x, jnp.float32), params, state)
    y = np.asarray(y)
    assert np.isnan(y[4:8, ..., 1]).all() and np.isfinite(np.delete(y, np.s_[4:8], 0)).all()
    assert np.isfinite(y[4:8, ..., [0, 2, 3]]).all()
    for key in state:  # exact: the update is skipped, the old state selected unchanged
        np.testing.assert_array_equal(new_state[key], state[key])
    _, cumulative = jaxbn.batch_norm(
        jnp.asarray(x, jnp.float32),
        params,
        {**state, "count": jnp.float32(3)},
        training=True,
        momentum=None,
        ghost_batch_size=4,
    )
    assert cumulative["count"] == 3  # exact: a count (small integer), kept unchanged


def test_fully_masked_ghost_batch_has_no_weight():
    """A ghost batch without valid elements adds nothing to the running average; no NaN anywhere."""
    axis, shape = LAYOUTS["NHWC"]
    x, params, state = _data(shape, axis)
    mask = np.ones((shape[0], 1, 1, 1), bool)
    mask[8:12] = False  # ghost batch 2
    x[8:12] = np.nan  # its padding may be junk
    y, new_state = _step(4, axis)(
        jnp.asarray(x, jnp.float32), _as(params, jnp.float32), _as(state, jnp.float32), mask=mask
    )
    valid = np.r_[0:8, 12:16]
    assert np.isfinite(np.asarray(y)[valid]).all()
    _, expected = ghost_reference(x[valid], 4, axis, params, state)
    for key in expected:
        np.testing.assert_allclose(new_state[key], expected[key], rtol=1e-5, atol=1e-6)


def test_inference_and_reestimation():
    """Inference ignores ghost_batch_size (any batch size); update-only re-estimates from ghost statistics."""
    axis, shape = LAYOUTS["NCHW"]
    x, params, state = _data(shape, axis)
    params, state = _as(params, jnp.float32), _as(state, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    plain = jaxbn.batch_norm(x[:5], params, state, training=False, axis=axis)
    ghost = jaxbn.batch_norm(x[:5], params, state, training=False, axis=axis, ghost_batch_size=4)
    # exact: inference drops ghost_batch_size at validation, so both calls run the same eager ops on the same inputs
    np.testing.assert_array_equal(plain[0], ghost[0])
    assert ghost[1] is state
    y, new_state = jaxbn.batch_norm(
        x,
        params,
        state,
        training=False,
        update_running_stats=True,
        axis=axis,
        momentum=MOMENTUM,
        ghost_batch_size=4,
    )
    # exact: y is the inference transform, the same eager ops on the same inputs (the update only adds statistics)
    np.testing.assert_array_equal(
        y, jaxbn.batch_norm(x, params, state, training=False, axis=axis)[0]
    )
    _, trained_state = _step(4, axis)(x, params, state)
    for key in state:
        np.testing.assert_allclose(new_state[key], trained_state[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "ghost, shape, axis, error, message",
    [
        (3, (16, 4), -1, ValueError, r"ghost_batch_size=3 does not divide the batch size 16"),
        (0, (16, 4), -1, ValueError, r"ghost_batch_size must be a positive int.*got 0"),
        (2.0, (16, 4), -1, TypeError, r"ghost_batch_size must be a positive int.*2\.0.*float"),
        (True, (16, 4), -1, TypeError, r"ghost_batch_size must be a positive int.*True"),
        (4, (16, 4), 0, ValueError, r"ghost_batch_size=4 splits axis 0.*feature axis.*\(16, 4\)"),
        (1, (16, 4), -1, ValueError, r"ghost_batch_size=1 leaves one value per feature"),
    ],
)
def test_invalid_ghost_batch_size_raises_at_trace_time(ghost, shape, axis, error, message):
    """Each bad ghost_batch_size names the value and what was expected, before anything runs."""
    params, state = jaxbn.batch_norm_init(shape[axis])
    with pytest.raises(error, match=message):
        jax.jit(
            lambda x: jaxbn.batch_norm(
                x, params, state, training=True, axis=axis, ghost_batch_size=ghost
            )
        ).lower(jnp.ones(shape))


def test_linen_field_appended_and_matches_functional():
    """BatchNorm(ghost_batch_size=g) equals the functional call; flax's fields keep their positions."""
    flax_fields = [f for f in nn.BatchNorm.__dataclass_fields__ if f not in ("parent", "name")]
    ours = [f for f in jaxbn.linen.BatchNorm.__dataclass_fields__ if f not in ("parent", "name")]
    assert (
        ours[: len(flax_fields)] == flax_fields and "ghost_batch_size" in ours[len(flax_fields) :]
    )
    axis, shape = LAYOUTS["NHWC"]
    x = jnp.asarray(_data(shape, axis)[0], jnp.float32)
    module = jaxbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, ghost_batch_size=4)
    variables = module.init(jax.random.key(0), x[:3])  # init needs no divisible batch
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    y_ref, state_ref = _step(4, axis)(x, variables["params"], variables["batch_stats"])
    # eager apply vs jitted function: same math, XLA may fuse differently (an ulp)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6), updates["batch_stats"], state_ref
    )
    default = jaxbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    flax_default = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, default) == jax.tree.map(jnp.shape, flax_default)


# ---------------------------------------------------------------- devices

needs_devices = pytest.mark.skipif(
    jax.device_count() < N_DEVICES, reason="needs 8 (forced CPU) devices"
)
MD_SHAPE = (32, 3, 3, 4)  # 4 examples per device: two ghost batches of 2
MD_GHOST = 2


def _md_data():
    x, params, state = _data(MD_SHAPE, -1, seed=5)
    w = np.random.default_rng(6).normal(size=MD_SHAPE)
    return (
        jnp.asarray(x, jnp.float32),
        _as(params, jnp.float32),
        _as(state, jnp.float32),
        jnp.asarray(w, jnp.float32),
    )


def _forward_backward(x, params, state, w, axis_name=None):
    loss = _ghost_loss(MD_GHOST, -1, axis_name=axis_name)
    (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, params, state, w
    )
    return y, new_state, dx, dparams


@functools.cache
def _md_step(kind, axis_name):
    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    local = functools.partial(_forward_backward, axis_name=axis_name)
    if kind == "single":
        return jax.jit(local)
    if kind == "pmap":
        step = jax.pmap(local, axis_name="i", in_axes=(0, None, None, 0))

        def run(x, p, s, w):
            split = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
            y, new_state, dx, dparams = step(split(x), p, s, split(w))
            merge = lambda a: a.reshape((-1,) + a.shape[2:])
            return merge(y), new_state, merge(dx), jax.tree.map(lambda g: g.sum(0), dparams)

        return run
    # shard_map: replicated params and state (P()); with axis_name the new state is replicated too
    state_spec = P() if axis_name else P("i")
    step = jax.jit(
        shard_map(
            local,
            mesh=mesh,
            in_specs=(P("i"), P(), P(), P("i")),
            out_specs=(P("i"), state_spec, P("i"), P()),
        )
    )
    batch = NamedSharding(mesh, P("i"))

    def run(x, p, s, w):
        y, new_state, dx, dparams = step(jax.device_put(x, batch), p, s, jax.device_put(w, batch))
        if not axis_name:  # per-device states, concatenated: give them pmap's (devices, C) form
            new_state = jax.tree.map(lambda a: a.reshape(N_DEVICES, -1), new_state)
        return y, new_state, dx, dparams

    return run


@needs_devices
@pytest.mark.parametrize("axis_name", [None, "i"])
@pytest.mark.parametrize("kind", [pytest.param("pmap", marks=pytest.mark.slow), "shard_map"])
def test_per_device_ghost_batches_equal_single_device(kind, axis_name):
    """pmap/shard_map give the single-device ghost outputs and gradients, with or without axis_name.

    Without axis_name each device's state averages its own ghost batches; with
    it, every device holds the single-device state (the average over all).
    """
    x, params, state, w = _md_data()
    y1, state1, dx1, dp1 = _md_step("single", None)(x, params, state, w)
    y, new_state, dx, dparams = _md_step(kind, axis_name)(x, params, state, w)
    np.testing.assert_allclose(y, y1, atol=1e-5)
    np.testing.assert_allclose(dx, dx1, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), dparams, dp1)
    for key in state:
        per_device = (
            np.asarray(new_state[key]).reshape(-1, MD_SHAPE[-1])
            if kind == "pmap" or not axis_name
            else np.asarray(new_state[key])[None]
        )
        if axis_name:
            np.testing.assert_allclose(
                per_device, np.broadcast_to(state1[key], per_device.shape), rtol=1e-5
            )
        else:
            local = MD_SHAPE[0] // N_DEVICES
            for d in range(N_DEVICES):
                _, expected, _, _ = _md_step("single", None)(
                    x[d * local : (d + 1) * local], params, state, w[d * local : (d + 1) * local]
                )
                np.testing.assert_allclose(per_device[d], expected[key], rtol=1e-5, atol=1e-6)


def _collectives(text):
    ops = ["all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"]
    return {op: hlo.count_collectives(text, op, include_branches=True) for op in ops}


def _all_reduce_types(text):
    return sorted(re.findall(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", text))


@needs_devices
def test_jit_sharded_ghost_batches_need_no_statistics_collective():
    """jit over a batch sharded on 8 devices, ghost batches inside shards: zero collectives.

    The statistics that normalize are local (two passes per group around an
    element of the group: nothing spans the groups of different devices), and so is the
    backward's normalization. Updating a replicated running state adds one
    all-reduce of the per-ghost vectors (the count-weighted sums, two f32[C]
    in one tuple); the backward one for the parameter gradients. No all-gather of x.
    """
    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    x, params, state, w = _md_data()
    xs, ws = (jax.device_put(a, NamedSharding(mesh, P("i"))) for a in (x, w))
    expected = {False: [], True: ["(f32[4]{0}, f32[4]{0})"]}
    for update in (False, True):
        forward = jax.jit(
            lambda x, p, s: jaxbn.batch_norm(
                x, p, s, training=True, update_running_stats=update, ghost_batch_size=MD_GHOST
            )
        )
        text = hlo.compiled_text(forward, xs, params, state)
        counts = _collectives(text)
        assert counts == {**dict.fromkeys(counts, 0), "all-reduce": len(expected[update])}, (
            update,
            counts,
        )
        assert _all_reduce_types(text) == expected[update]
    # forward + backward: the backward adds the parameter gradients' sum over the batch (one all-reduce)
    step = jax.jit(lambda x, p, s, w: _forward_backward(x, p, s, w)[2:])
    text = hlo.compiled_text(step, xs, params, state, ws)
    counts = _collectives(text)
    assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
    assert not any(t.startswith("f32[32") for t in _all_reduce_types(text))  # never x-sized
    y, _, dx, _ = _md_step("single", None)(x, params, state, w)
    np.testing.assert_allclose(step(xs, params, state, ws)[0], dx, atol=1e-5)


@needs_devices
@pytest.mark.parametrize("axis_name, expected", [(None, 0), ("i", 1)])
def test_shard_map_collectives(axis_name, expected):
    """Under shard_map ghost batch norm's forward has no collective; axis_name adds one for the state."""
    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    x, params, state, _ = _md_data()
    local = lambda x, p, s: jaxbn.batch_norm(
        x, p, s, training=True, ghost_batch_size=MD_GHOST, axis_name=axis_name
    )
    fn = jax.jit(
        shard_map(
            local,
            mesh=mesh,
            in_specs=(P("i"), P(), P()),
            out_specs=(P("i"), P() if axis_name else P("i")),
        )
    )
    text = hlo.compiled_text(fn, jax.device_put(x, NamedSharding(mesh, P("i"))), params, state)
    assert _collectives(text) == {**dict.fromkeys(_collectives(text), 0), "all-reduce": expected}


@needs_devices
def test_moments_exact_at_large_offsets_whatever_the_shift():
    """moments is exact at a large offset whatever ``shift`` is given (0, the mean, 1e8 away), and
    per-group statistics need no collective under jit with the groups sharded over devices.

    Each group's sums go around an element of the group itself (two passes, no decision taken
    from the data), so nothing spans the groups of different devices: this is how ghost batch
    norm's forward is collective-free under jit (test_jit_sharded_ghost_batches_need_no_statistics_collective
    counts it for batch_norm). ``shift`` is at most a fallback: a group whose first element is
    masked out is exact at any shift too.
    """
    from jaxbn import stats

    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(8, 2, 5, 3)) + 1e4).astype(np.float32)  # (ghost groups, g, ..., C)
    x64 = np.asarray(x, np.float64)
    mask = np.ones(x.shape, bool)
    mask[:, 0, 0] = (
        False  # the first element of every group masked out: the sums cannot go around it
    )
    valid = np.where(mask, x64, np.nan)
    expected = {
        "unmasked": (x64.mean((1, 2)), x64.var((1, 2))),
        "masked": (np.nanmean(valid, (1, 2)), np.nanvar(valid, (1, 2))),
    }
    shifts = {
        "none": None,
        "zero": np.zeros((8, 3), np.float32),
        "mean": expected["unmasked"][0].astype(np.float32),
        "1e8 away": np.full((8, 3), -1e8, np.float32),
    }
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("i")))
    fn = jax.jit(lambda x, m, k: stats.moments(x, (1, 2), mask=m, shift=k))
    # (the masked case unsharded: test_masked_ghost_batches_under_jit_with_a_sharded_batch shards it)
    for case, args in (("unmasked", (xs, None)), ("masked", (jnp.asarray(x), jnp.asarray(mask)))):
        for name, shift in shifts.items():
            if case == "unmasked":
                text = hlo.compiled_text(fn, *args, shift)
                assert _collectives(text) == dict.fromkeys(_collectives(text), 0), name
                assert " while(" not in text, name
            result = fn(*args, shift)
            mean, var = expected[case]
            # float32 data at 1e4: the mean to its rounding, the variance (~1) to 1e-4 (the data's own
            # rounding, 1e4 * 6e-8, relative to a standard deviation of 1)
            np.testing.assert_allclose(
                result.mean, mean, rtol=1e-6, err_msg=f"{case}, shift {name}"
            )
            np.testing.assert_allclose(result.var, var, rtol=1e-4, err_msg=f"{case}, shift {name}")
    with pytest.raises(TypeError, match="reshift"):  # no longer an argument: Python's own TypeError
        stats.moments(x, 0, reshift=True)


@needs_devices
def test_masked_ghost_batches_under_jit_with_a_sharded_batch():
    """A mask sharded with the batch (jax.make_mesh's explicit axes), ghost groups inside shards: the
    statistics of the valid elements of each group, with no collective for them."""
    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    x, params, state, _ = _md_data()
    mask = np.random.default_rng(3).uniform(size=(x.shape[0],) + (1,) * (x.ndim - 1)) < 0.7
    mask[::MD_GHOST] = False  # every group's first example masked out
    mask[1::MD_GHOST] = True  # ... and none empty
    sharding = NamedSharding(mesh, P("i"))
    forward = jax.jit(
        lambda x, m, p, s: jaxbn.batch_norm(
            x, p, s, training=True, update_running_stats=False, mask=m, ghost_batch_size=MD_GHOST
        )[0]
    )
    y = forward(
        jax.device_put(x, sharding), jax.device_put(jnp.asarray(mask), sharding), params, state
    )
    y_ref, _ = ghost_reference(np.asarray(x, np.float64), MD_GHOST, -1, params, state, mask)
    valid = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], atol=1e-5)
    text = hlo.compiled_text(
        forward,
        jax.device_put(x, sharding),
        jax.device_put(jnp.asarray(mask), sharding),
        params,
        state,
    )
    assert _collectives(text) == dict.fromkeys(_collectives(text), 0)


@structural
def test_ghost_batches_cost_no_more_traffic_than_batch_norm():
    """Ghost training moves no more of x than plain batch norm (4S/10S on XLA:CPU, both).

    Every statistic takes the same two passes around an element of its own
    batch (or ghost group), with no decision shared by the groups, so ghost
    batches pay nothing for zero collectives under jit: only their per-group
    vectors (about 0.06S here). The parameters are broadcast to the groups by
    a custom VJP whose sum over the groups XLA cannot fold into the per-group
    reduction (which would read dy once more for the bias gradient).
    """
    shape = (32, 16, 16, 64)
    size = np.prod(shape) * 4
    params, state = jaxbn.batch_norm_init(shape[-1])

    def traffic(ghost):
        def forward_backward(x, p, s, dy):
            (y, new_state), vjp = jax.vjp(
                lambda x, p: jaxbn.batch_norm(x, p, s, training=True, ghost_batch_size=ghost), x, p
            )
            return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))

        x = jnp.zeros(shape)
        forward = jax.jit(
            lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True, ghost_batch_size=ghost)
        )
        return (
            hlo.memory_traffic(hlo.compiled_text(forward, x, params, state))[0] / size,
            hlo.memory_traffic(hlo.compiled_text(jax.jit(forward_backward), x, params, state, x))[0]
            / size,
        )

    plain, ghost = traffic(None), traffic(4)
    assert ghost[0] <= plain[0] + 0.1 and ghost[1] <= plain[1] + 0.1, (plain, ghost)


@needs_devices
@pytest.mark.parametrize("ghost", [4, 16])  # (2 examples per device: across 2 devices, across all)
@pytest.mark.parametrize("mask_kind", [None, "examples"])
def test_ghost_batches_under_sharding_in_types(ghost, mask_kind):
    """jit over a batch sharded on a mesh of explicit axes (sharding in types), ghost batches
    larger than a device's part of it: the same outputs, running statistics and gradients as
    unsharded, y sharded as x. (Before, their reshape failed to trace: JAX asks for its output
    sharding; now each group is split over the devices it needs.)"""
    mesh = jax.make_mesh((N_DEVICES,), ("i",))  # (explicit axes: jax.make_mesh's default)
    shape = (2 * N_DEVICES, 3, 3, 4)
    x, params, state = jax.tree.map(jnp.asarray, _data(shape, -1))
    mask = _mask(mask_kind, shape)

    def step(x, m):
        def call(x):
            return jaxbn.batch_norm(x, params, state, training=True, mask=m, ghost_batch_size=ghost)

        (y, new_state), vjp = jax.vjp(call, x)
        return y, new_state, vjp((jnp.sin(y), jax.tree.map(jnp.zeros_like, new_state)))[0]

    expected = jax.jit(step)(x, mask)
    sharding = NamedSharding(mesh, P("i"))
    put = lambda a: None if a is None else jax.device_put(a, sharding)
    got = jax.jit(step)(put(x), put(mask))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got[0].sharding.is_equivalent_to(sharding, x.ndim)
