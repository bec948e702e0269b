"""Which devices a statistic spans: sub-groups, tuples of axis names, sharded per-example norms.

On 8 forced CPU devices, every case is compared with the single-device result on
the data the statistic should span (and through it with float64 references):

- sub-group statistics beyond pmap: a factored mesh ``('replica', 'group')``
  with ``axis_name='group'`` under ``shard_map`` gives what ``pmap`` gives with
  ``axis_index_groups`` (which JAX does not implement inside ``shard_map``);
- a tuple of axis names under ``shard_map`` with its default checks on: two
  mesh axes, and a ``vmap`` axis beside a mesh axis;
- layer and RMS norm with the features sharded, group and instance norm with
  the spatial axis sharded, reduced over ``axis_name`` (pmap, shard_map) or by
  XLA (jit-sharded).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import hlo, reference
from tests.conftest import N_DEVICES, needs_devices, tiered

pytestmark = needs_devices

REPLICAS, GROUP = 2, 4
FACTORED = jax.make_mesh((REPLICAS, GROUP), ("replica", "group"))
FLAT = jax.make_mesh((N_DEVICES,), ("i",))
MOMENTUM, EPSILON = 0.9, 1e-5
CHANNELS = 3


def _data(seed, shape):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + 3).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
    }
    state = {
        "mean": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, shape[-1]), jnp.float32),
    }
    return x, w, params, state


def _train(x, w, params, state, axis_name):
    """Training batch norm: ``(y, new_state, dx, dparams)`` for the loss ``sum(w * y)``."""

    def loss(x, params):
        y, new_state = jaxbn.batch_norm(
            x, params, state, training=True, momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name
        )
        return jnp.sum(w * y), (y, new_state)

    (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, params
    )
    return y, new_state, dx, dparams


_single = jax.jit(functools.partial(_train, axis_name=None))


@functools.cache
def _factored_step(axis_name):
    """shard_map over the factored mesh; the batch is split over both axes.

    The state varies over 'replica' when only 'group' is reduced, so it comes
    back stacked per replica. The parameters are replicated, so their gradient
    is that of the sum of all devices' losses, whatever the statistics span.
    """
    spec = P(("replica", "group"))
    per_replica = P("replica") if axis_name == "group" else P()
    step = jax.jit(
        jax.shard_map(
            functools.partial(_train, axis_name=axis_name),
            mesh=FACTORED,
            in_specs=(spec, spec, P(), P()),
            out_specs=(spec, per_replica, spec, P()),
        )
    )
    sharding = NamedSharding(FACTORED, spec)
    return lambda x, w, p, s: _numpy(
        step(jax.device_put(x, sharding), jax.device_put(w, sharding), p, s)
    )


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_same(result, expected, state):
    """``(y, new_state, dx, dparams)`` equal to a single-device result, to float32 rounding.

    ``state`` is the running state both started from.
    """
    (y, new_state, dx, dparams), (y1, state1, dx1, dp1) = result, expected
    np.testing.assert_allclose(y, y1, atol=1e-5)
    np.testing.assert_allclose(dx, dx1, atol=1e-5)
    # The new running mean MOMENTUM * old + (1 - MOMENTUM) * batch_mean may cancel to far below its
    # terms (e.g. 0.016 from terms near 0.3): its relative error is then unbounded, and the order in
    # which the devices' statistics are merged may move it by an ulp of the terms. Each result rounds
    # the terms by at most half an ulp (u = eps / 2) of their magnitude, so the two differ by at
    # most eps * (|MOMENTUM * old| + |(1 - MOMENTUM) * batch_mean|): that absolute tolerance, no more.
    old = MOMENTUM * np.abs(np.asarray(state["mean"], np.float64))
    terms = old + np.abs(
        np.asarray(state1["mean"], np.float64) - MOMENTUM * np.asarray(state["mean"], np.float64)
    )
    eps = np.finfo(np.float32).eps
    np.testing.assert_array_less(
        np.abs(np.asarray(new_state["mean"], np.float64) - state1["mean"]),
        np.maximum(1e-6 * np.abs(np.asarray(state1["mean"], np.float64)), eps * terms),
    )
    np.testing.assert_allclose(new_state["var"], state1["var"], rtol=1e-6)
    for key in ("scale", "bias"):
        np.testing.assert_allclose(dparams[key], dp1[key], rtol=1e-5, atol=1e-5)


def test_factored_mesh_axis_gives_sub_group_statistics():
    """axis_name='group' on a ('replica', 'group') mesh: each replica's 4 devices share statistics."""
    x, w, params, state = _data(0, (16, 5, CHANNELS))
    y, new_state, dx, dparams = _factored_step("group")(x, w, params, state)

    local = x.shape[0] // REPLICAS
    dparams_sum = {"scale": 0.0, "bias": 0.0}
    for r in range(REPLICAS):
        part = slice(r * local, (r + 1) * local)
        y1, state1, dx1, dp1 = _single(x[part], w[part], params, state)
        mean, var = reference.batch_stats(x[part])
        np.testing.assert_allclose(
            y1,
            reference.normalize(
                x[part], mean, var, params["scale"], params["bias"], epsilon=EPSILON
            ),
            atol=2e-5,
        )
        np.testing.assert_allclose(y[part], y1, atol=1e-5)
        np.testing.assert_allclose(dx[part], dx1, atol=1e-5)
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                new_state[key][r * CHANNELS : (r + 1) * CHANNELS], state1[key], rtol=1e-6, atol=1e-7
            )
        dparams_sum = {key: dparams_sum[key] + dp1[key] for key in dparams_sum}
    for key in ("scale", "bias"):
        np.testing.assert_allclose(dparams[key], dparams_sum[key], rtol=1e-5, atol=1e-5)


def test_factored_mesh_equals_pmap_axis_index_groups():
    """The same sub-groups through pmap's axis_index_groups give the same numbers."""
    x, w, params, state = _data(1, (16, 5, CHANNELS))
    groups = [list(range(r * GROUP, (r + 1) * GROUP)) for r in range(REPLICAS)]

    pmapped = jax.pmap(lambda x, w: _train_groups(x, w, params, state, groups), axis_name="i")
    y_p, state_p, dx_p = pmapped(
        x.reshape(N_DEVICES, 2, 5, CHANNELS), w.reshape(N_DEVICES, 2, 5, CHANNELS)
    )
    y, new_state, dx, _ = _factored_step("group")(x, w, params, state)
    np.testing.assert_allclose(y, y_p.reshape(y.shape), atol=1e-6)
    np.testing.assert_allclose(dx, dx_p.reshape(dx.shape), atol=1e-6)
    for r in range(REPLICAS):
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                new_state[key][r * CHANNELS : (r + 1) * CHANNELS],
                state_p[key][r * GROUP],
                rtol=1e-6,
            )


def _train_groups(x, w, params, state, groups):
    def loss(x):
        y, new_state = jaxbn.batch_norm(
            x,
            params,
            state,
            training=True,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            axis_name="i",
            axis_index_groups=groups,
        )
        return jnp.sum(w * y), (y, new_state)

    (_, (y, new_state)), dx = jax.value_and_grad(loss, has_aux=True)(x)
    return y, new_state, dx


def test_axis_index_groups_inside_shard_map_says_what_to_do():
    params, state = jaxbn.batch_norm_init(CHANNELS)
    fn = jax.jit(
        jax.shard_map(
            lambda x: jaxbn.batch_norm(
                x,
                params,
                state,
                training=True,
                axis_name="i",
                axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]],
            ),
            mesh=FLAT,
            in_specs=P("i"),
            out_specs=(P("i"), P()),
        )
    )
    x = jax.device_put(jnp.ones((16, CHANNELS)), NamedSharding(FLAT, P("i")))
    with pytest.raises(
        NotImplementedError, match=r"(?s)pmap only.*factor the mesh axis.*axis_name='group'"
    ):
        fn(x)


def test_tuple_of_mesh_axes_under_shard_map_equals_global_batch():
    """axis_name=('replica', 'group') reduces over all 8 devices: one all-gather forward, one all-reduce backward."""
    x, w, params, state = _data(2, (16, 5, CHANNELS))
    y, new_state, dx, dparams = _factored_step(("replica", "group"))(x, w, params, state)
    y1, state1, dx1, dp1 = _single(x, w, params, state)
    _assert_same((y, new_state, dx, dparams), (y1, state1, dx1, dp1), state)
    spec = NamedSharding(FACTORED, P(("replica", "group")))
    step = jax.jit(
        jax.shard_map(
            functools.partial(_train, axis_name=("replica", "group")),
            mesh=FACTORED,
            in_specs=(spec.spec, spec.spec, P(), P()),
            out_specs=(spec.spec, P(), spec.spec, P()),
        )
    )
    text = (
        step.lower(jax.device_put(x, spec), jax.device_put(w, spec), params, state)
        .compile()
        .as_text()
    )
    _assert_one_collective_per_direction(text)


def _assert_one_collective_per_direction(text):
    """The forward's statistics in ONE all-gather, the backward's sums in ONE all-reduce, no loop."""
    assert hlo.count_collectives(text, op="all-gather") == 1
    assert hlo.count_collectives(text) == 1
    assert " while(" not in text


def _vmapped_step(x, w, params, state):
    """Per device, a vmap over 'v' (2 lanes) inside shard_map over 'i'; stats over ('i', 'v')."""

    def lane(x, w):
        y, new_state, dx, dparams = _train(x, w, params, state, axis_name=("i", "v"))
        return y, new_state, dx, dparams

    x = x.reshape((2, -1) + x.shape[1:])
    w = w.reshape(x.shape)
    y, new_state, dx, dparams = jax.vmap(lane, axis_name="v")(x, w)
    # Each lane differentiates its own loss: the global gradient is the sum over lanes.
    merge = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
    return (
        merge(y),
        jax.tree.map(lambda a: a[0], new_state),
        merge(dx),
        jax.tree.map(lambda a: a.sum(0), dparams),
    )


@functools.cache
def _vmap_in_shard_map():
    return jax.jit(
        jax.shard_map(
            _vmapped_step,
            mesh=FLAT,
            in_specs=(P("i"), P("i"), P(), P()),
            out_specs=(P("i"), P(), P("i"), P()),
        )
    )


def test_vmap_axis_beside_mesh_axis_under_shard_map_with_checks_on():
    """axis_name=('i', 'v'): a vmap axis and a mesh axis together, shard_map's vma checks on."""
    x, w, params, state = _data(3, (32, 3, CHANNELS))
    sharding = NamedSharding(FLAT, P("i"))
    args = (jax.device_put(x, sharding), jax.device_put(w, sharding), params, state)
    y, new_state, dx, dparams = _numpy(_vmap_in_shard_map()(*args))
    y1, state1, dx1, dp1 = _single(x, w, params, state)
    # Lane l of device d holds rows [d*4 + 2l, d*4 + 2l + 2): the same rows as the global batch.
    _assert_same((y, new_state, dx, dparams), (y1, state1, dx1, dp1), state)
    text = _vmap_in_shard_map().lower(*args).compile().as_text()
    # Forward: the lanes' statistics gathered on the device, then one all-gather over 'i'.
    # Backward: each lane's parameter gradient must also be summed over 'i' (a lane
    # differentiates its own loss), and XLA combines that sum with the backward's
    # [Σdy, Σdy·x̂] into the same all-reduce.
    _assert_one_collective_per_direction(text)


# Per-example norms across devices: features sharded (layer/RMS), or the spatial axis (group/instance).
ALTERNATIVES = {
    # name: (function of (x, params, axis_name), sharded axis of x, params sharded with x?)
    "layer_norm": (
        lambda x, p, n: jaxbn.layer_norm(x, p, reduction_axes=-1, feature_axes=-1, axis_name=n),
        2,
        True,
    ),
    "rms_norm": (
        lambda x, p, n: jaxbn.rms_norm(x, p, reduction_axes=-1, feature_axes=-1, axis_name=n),
        2,
        True,
    ),
    "group_norm": (lambda x, p, n: jaxbn.group_norm(x, p, num_groups=2, axis_name=n), 1, False),
    "instance_norm": (lambda x, p, n: jaxbn.instance_norm(x, p, axis_name=n), 1, False),
}
ALT_SHAPE = (3, 16, 16)  # (batch, spatial, features): axis 1 or 2 is split over 8 devices


def _drop_loss(outputs):
    (_, y), grads = outputs
    return y, grads


def _alt_loss(fn, x, w, params, axis_name):
    y = fn(x, params, axis_name)
    return jnp.sum(w * y), y


@functools.cache
def _alt_step(name, kind):
    fn, axis, params_sharded = ALTERNATIVES[name]
    grad = jax.value_and_grad(functools.partial(_alt_loss, fn), argnums=(0, 2), has_aux=True)
    if kind == "single":
        return jax.jit(lambda x, w, p: _drop_loss(grad(x, w, p, None)))
    spec = P(*([None] * axis + ["i"]))
    pspec = P("i") if params_sharded else P()
    if kind == "jit_sharded":
        step = jax.jit(lambda x, w, p: _drop_loss(grad(x, w, p, None)))
        place = lambda a: jax.device_put(a, NamedSharding(FLAT, spec))  # noqa: E731
        pplace = lambda a: jax.device_put(a, NamedSharding(FLAT, pspec))  # noqa: E731
        return lambda x, w, p: _numpy(step(place(x), place(w), jax.tree.map(pplace, p)))
    if kind == "shard_map":

        def local(x, w, p):
            (_, y), grads = grad(x, w, p, "i")  # the loss is this device's part
            return y, grads

        step = jax.jit(
            jax.shard_map(
                local, mesh=FLAT, in_specs=(spec, spec, pspec), out_specs=(spec, (spec, pspec))
            )
        )
        sharding, psharding = NamedSharding(FLAT, spec), NamedSharding(FLAT, pspec)
        return lambda x, w, p: _numpy(
            step(
                jax.device_put(x, sharding),
                jax.device_put(w, sharding),
                jax.device_put(p, psharding),
            )
        )

    # pmap: split the sharded axis into a leading device axis.
    def split(a, ax):
        return np.stack(np.split(np.asarray(a), N_DEVICES, axis=ax))

    def join(a, ax):
        return np.concatenate(list(np.asarray(a)), axis=ax)

    step = jax.pmap(
        lambda x, w, p: grad(x, w, p, "i"),
        axis_name="i",
        in_axes=(0, 0, 0 if params_sharded else None),
    )

    def run(x, w, p):
        p_in = jax.tree.map(lambda a: split(a, 0), p) if params_sharded else p
        (_, y), (dx, dp) = step(split(x, axis), split(w, axis), p_in)
        if params_sharded:
            dp = jax.tree.map(lambda a: join(a, 0), dp)
        else:  # each device's gradient of its own loss: sum them
            dp = jax.tree.map(lambda a: np.asarray(a).sum(0), dp)
        return join(y, axis), (join(dx, axis), dp)

    return run


@pytest.mark.parametrize(  # the default tier: each under shard_map; layer norm (channels split)
    # and group norm (a spatial axis split: each shard's statistics, per group) under sharded jit
    "name, kind",
    tiered(
        sorted(ALTERNATIVES),
        ("pmap", "shard_map", "jit_sharded"),
        {
            *((name, "shard_map") for name in ALTERNATIVES),
            ("layer_norm", "jit_sharded"),
            ("group_norm", "jit_sharded"),
        },
    ),
)
def test_per_example_norm_over_sharded_axis_equals_unsharded(name, kind):
    """Statistics reduced over the device axis equal those of the unsharded tensor, grads too."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=ALT_SHAPE) * 3 + 20).astype(np.float32)
    w = rng.normal(size=ALT_SHAPE).astype(np.float32)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, ALT_SHAPE[-1]), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=ALT_SHAPE[-1]), jnp.float32),
    }
    if name == "rms_norm":
        del params["bias"]  # RMS norm has a scale only
    y1, (dx1, dp1) = _alt_step(name, "single")(x, w, params)
    y, (dx, dp) = _alt_step(name, kind)(x, w, params)

    reduction = {"layer_norm": (2,), "rms_norm": (2,), "group_norm": None, "instance_norm": (1,)}[
        name
    ]
    if reduction is not None:  # float64 reference of the unsharded result
        expected = reference.per_example_norm(
            x, reduction, (2,), params["scale"], params.get("bias"), center=name != "rms_norm"
        )
        np.testing.assert_allclose(y1, expected, atol=2e-5)
    np.testing.assert_allclose(y, y1, atol=2e-5)
    np.testing.assert_allclose(dx, dx1, atol=2e-5)
    for key in params:
        np.testing.assert_allclose(dp[key], dp1[key], rtol=1e-5, atol=2e-5)
