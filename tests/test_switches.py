"""Model-wide switches: linen overrides/conversion by interception, nnx freeze/set/convert by graph walk."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference
from tests.conftest import needs_devices


class Net(nn.Module):
    flax_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True, mask=None):
        x = nn.Dense(4)(x)
        bn = nn.BatchNorm if self.flax_bn else jaxbn.linen.BatchNorm
        x = bn(use_running_average=not train, momentum=0.5)(x, mask=mask)
        return nn.LayerNorm()(nn.Dense(3)(x))


def _data(rng, shape=(16, 3)):
    return jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)


def _trained_variables(model, x):
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(
        variables, x + 1.0, mutable=["batch_stats"]
    )  # non-trivial running stats
    return {**variables, **updates}


@pytest.mark.parametrize("flax_bn", [False, True])
def test_linen_freeze_uses_and_keeps_running_stats(rng, flax_bn):
    model, x = Net(flax_bn), _data(rng)
    variables = _trained_variables(model, x)
    with jaxbn.linen.batch_norm_overrides(use_running_average=True, update_running_stats=False):
        y, updates = model.apply(variables, x, mutable=["batch_stats"])
    # exact by construction: the stored statistics are not written
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    np.testing.assert_allclose(y, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
    y_train, _ = model.apply(variables, x, mutable=["batch_stats"])
    assert not np.allclose(
        y, y_train, atol=1e-3
    )  # training output differs: the freeze did something


@pytest.mark.slow  # ~15 s of eager gradients
def test_linen_keep_affine_trainable_false_stops_gradients(rng):
    model, x = Net(), _data(rng)
    variables = _trained_variables(model, x)

    def loss(params, **overrides):
        with jaxbn.linen.batch_norm_overrides(**overrides):
            y, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return (y**2 * jnp.arange(3.0)).sum()

    grads = jax.grad(loss)(variables["params"])["BatchNorm_0"]
    assert float(jnp.abs(grads["scale"]).sum()) > 0
    frozen = jax.grad(lambda p: loss(p, keep_affine_trainable=False))(variables["params"])
    assert (
        float(jnp.abs(frozen["BatchNorm_0"]["scale"]).sum()) == 0
    )  # exact: stop_gradient gives zeros
    assert float(jnp.abs(frozen["Dense_0"]["kernel"]).sum()) > 0


@pytest.mark.slow  # ~6-15 s of eager applies; test_linen_axis_index_groups_override_as_lists stays
@pytest.mark.parametrize("flax_bn", [False, True])
def test_linen_axis_name_override_synchronizes(rng, flax_bn):
    model, x = Net(flax_bn), _data(rng, (16, 3))
    variables = _trained_variables(model, x)
    y_global, upd_global = model.apply(variables, x, mutable=["batch_stats"])

    def shard(xs):
        with jaxbn.linen.batch_norm_overrides(axis_name="data"):
            return model.apply(variables, xs, mutable=["batch_stats"])

    y, upd = jax.vmap(shard, axis_name="data")(x.reshape(4, 4, 3))
    np.testing.assert_allclose(y.reshape(16, 3), y_global, rtol=1e-4, atol=1e-4)
    for leaf, ref in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_global)):
        np.testing.assert_allclose(leaf[0], ref, rtol=1e-5, atol=1e-5)
    y_local, _ = jax.vmap(lambda xs: model.apply(variables, xs, mutable=["batch_stats"]))(
        x.reshape(4, 4, 3)
    )
    assert not np.allclose(y_local.reshape(16, 3), y_global, atol=1e-3)


@pytest.mark.slow  # ~10 s of eager applies; test_linen_overrides_key_the_jit_cache stays
def test_linen_momentum_override(rng):
    model, x = Net(), _data(rng)
    variables = model.init(jax.random.key(0), x)
    h = nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, x)
    with jaxbn.linen.batch_norm_overrides(momentum=0.9):
        _, updates = model.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(
        updates["batch_stats"]["BatchNorm_0"]["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6
    )
    _, default = model.apply(variables, x, mutable=["batch_stats"])  # the field: momentum 0.5
    np.testing.assert_allclose(
        default["batch_stats"]["BatchNorm_0"]["mean"], 0.5 * h.mean(0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow  # ~30 s of eager applies; test_linen_use_jaxbn_keys_the_jit_cache stays
def test_linen_use_jaxbn_equals_flax_and_masks_weight_by_count(rng):
    model, x = Net(flax_bn=True), _data(rng)
    variables = _trained_variables(model, x)
    ref, ref_upd = model.apply(variables, x, mutable=["batch_stats"])
    with jaxbn.linen.use_jaxbn():
        y, upd = model.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), upd, ref_upd)
    assert jax.tree.structure(upd) == jax.tree.structure(ref_upd)

    # uneven masks over 4 shards: jaxbn's statistics are those of all valid rows (count-weighted)
    mask = jnp.asarray(rng.random((16, 1)) < 0.6).at[:2].set(True)
    mask = mask.at[4:8].set(False).at[4].set(True)
    expected, exp_upd = jaxbn.linen.BatchNorm(momentum=0.5).apply(
        {
            "params": variables["params"]["BatchNorm_0"],
            "batch_stats": variables["batch_stats"]["BatchNorm_0"],
        },
        nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, x),
        use_running_average=False,
        mask=jnp.broadcast_to(mask, (16, 4)),
        mutable=["batch_stats"],
    )

    def shard(xs, ms):
        with jaxbn.linen.use_jaxbn(), jaxbn.linen.batch_norm_overrides(axis_name="d"):
            _, state = model.apply(
                variables,
                xs,
                mask=jnp.broadcast_to(ms, (4, 4)),
                mutable=["batch_stats", "intermediates"],
            )
        return state

    state = jax.vmap(shard, axis_name="d")(x.reshape(4, 4, 3), mask.reshape(4, 4, 1))
    np.testing.assert_allclose(
        state["batch_stats"]["BatchNorm_0"]["mean"][0],
        exp_upd["batch_stats"]["mean"],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        state["batch_stats"]["BatchNorm_0"]["var"][0],
        exp_upd["batch_stats"]["var"],
        rtol=1e-5,
        atol=1e-5,
    )
    del expected


@pytest.mark.slow  # ~15 s of eager applies
def test_linen_use_jaxbn_per_example_layers(rng):
    x = _data(rng, (2, 4, 4, 6))
    for layer in (nn.LayerNorm(), nn.RMSNorm(), nn.GroupNorm(num_groups=3), nn.InstanceNorm()):
        variables = layer.init(jax.random.key(1), x)
        ref = layer.apply(variables, x)
        with jaxbn.linen.use_jaxbn():
            y = layer.apply(variables, x)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4, err_msg=type(layer).__name__)


def test_linen_bad_overrides():
    with pytest.raises(TypeError, match="unknown override.*'moment'"):
        jaxbn.linen.batch_norm_overrides(moment=0.9)
    with pytest.raises(ValueError, match="momentum"):
        jaxbn.linen.batch_norm_overrides(momentum=1.5)
    with pytest.raises((TypeError, ValueError), match="use_running_average"):
        jaxbn.linen.batch_norm_overrides(use_running_average="yes")
    x = jnp.ones((4, 3))
    variables = Net().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="count"), jaxbn.linen.batch_norm_overrides(momentum=None):
        Net().apply(variables, x, mutable=["batch_stats"])


class NnxNet(nnx.Module):
    def __init__(self, flax_layers, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        bn = nnx.BatchNorm if flax_layers else jaxbn.nnx.BatchNorm
        self.blocks = nnx.List([bn(4, momentum=0.5, rngs=rngs)])
        self.norms = nnx.Dict(
            ln=nnx.LayerNorm(4, rngs=rngs), gn=nnx.GroupNorm(4, num_groups=2, rngs=rngs)
        )

    def __call__(self, x):
        return self.norms["gn"](self.norms["ln"](self.blocks[0](self.dense(x))))


def test_nnx_freeze_survives_train_and_unfreeze_restores(rng):
    model, x = NnxNet(False, nnx.Rngs(0)), _data(rng)
    model(x + 1.0)
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    jaxbn.nnx.freeze(model)
    model.train()
    y = model(x)
    # exact by construction: a frozen layer does not write its statistics
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), before
    )
    model.eval()
    np.testing.assert_allclose(y, model(x), rtol=1e-6)
    jaxbn.nnx.unfreeze(model)
    model.train()
    model(x)
    assert not np.allclose(model.blocks[0].mean[...], before["blocks"][0]["mean"])


def test_nnx_freeze_affine_and_set_batch_norm(rng):
    model, x = NnxNet(False, nnx.Rngs(0)), _data(rng)
    jaxbn.nnx.freeze(model, keep_affine_trainable=False)
    params = nnx.state(model, nnx.Param)
    assert "blocks" not in nnx.to_pure_dict(
        params
    )  # the BatchNorm's scale and bias are no Param now
    assert "dense" in nnx.to_pure_dict(params)
    assert isinstance(model.blocks[0].scale, jaxbn.nnx.FrozenParam)
    jaxbn.nnx.unfreeze(model)
    assert type(model.blocks[0].scale) is nnx.Param

    jaxbn.nnx.set_batch_norm(model, momentum=0.9)
    model(x)
    h = model.dense(x)
    np.testing.assert_allclose(model.blocks[0].mean[...], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    jaxbn.nnx.set_batch_norm(model, axis_name="d")
    assert model.blocks[0].axis_name == "d"
    with pytest.raises(TypeError, match="unexpected keyword"):
        jaxbn.nnx.set_batch_norm(model, moment=0.5)
    with pytest.raises(ValueError, match="momentum"):
        jaxbn.nnx.set_batch_norm(model, momentum=2.0)
    with pytest.raises(ValueError, match="count"):
        jaxbn.nnx.set_batch_norm(model, momentum=None)
    with pytest.raises(TypeError, match="convert"):
        jaxbn.nnx.freeze(NnxNet(True, nnx.Rngs(0)))
    with pytest.raises(TypeError, match="nnx module"):
        jaxbn.nnx.freeze({"a": 1})


def _nnx_net_float64(model, x, training):
    """``NnxNet``'s output in float64 from ``model``'s variables (its batch norm over the batch when
    ``training``, else with its running statistics)."""
    value = lambda variable: np.asarray(variable[...], np.float64)
    h = np.asarray(x, np.float64) @ value(model.dense.kernel) + value(model.dense.bias)
    bn = model.blocks[0]
    mean, var = reference.batch_stats(h) if training else (value(bn.mean), value(bn.var))
    h = reference.normalize(h, mean, var, value(bn.scale), value(bn.bias), epsilon=bn.epsilon)
    for name, groups in (("ln", 1), ("gn", 2)):  # per example, over each group of features
        layer = model.norms[name]
        grouped = reference.per_example_norm(
            h.reshape(len(h), groups, -1),
            (2,),
            (1, 2),
            value(layer.scale),
            value(layer.bias),
            epsilon=layer.epsilon,
        )
        h = grouped.reshape(h.shape)
    return h


def test_nnx_convert_keeps_variables_and_outputs(rng):
    x = _data(rng)
    reference = NnxNet(True, nnx.Rngs(0))
    reference(x + 1.0)
    model = nnx.clone(reference)
    state_before = nnx.state(model)
    converted = jaxbn.nnx.convert(model)
    assert isinstance(converted.blocks[0], jaxbn.nnx.BatchNorm)
    assert isinstance(converted.norms["ln"], jaxbn.nnx.LayerNorm)
    assert isinstance(converted.norms["gn"], jaxbn.nnx.GroupNorm)
    state = nnx.state(converted)
    assert jax.tree.structure(state) == jax.tree.structure(state_before)
    # exact by construction: the converted layers hold the very same variables
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(state), nnx.to_pure_dict(state_before)
    )
    # the outputs against float64, not against flax's: flax's layer and group norms take the
    # variance as E[x²] - E[x]², whose cancellation depends on how the CPU rounds (3.3e-4 off in
    # one of these rows with XLA:CPU's kernels compiled for SSE4.2, where jaxbn's are 1.1e-7 off)
    expected = _nnx_net_float64(converted, x, training=True)
    np.testing.assert_allclose(converted(x), expected, rtol=1e-5, atol=1e-5)  # training step
    reference(x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.to_pure_dict(nnx.state(converted)),
        nnx.to_pure_dict(nnx.state(reference)),
    )
    converted.eval(), reference.eval()
    expected = _nnx_net_float64(converted, x, training=False)
    np.testing.assert_allclose(converted(x), expected, rtol=1e-5, atol=1e-5)
    jaxbn.nnx.freeze(converted)  # now allowed
    single = jaxbn.nnx.convert(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    assert isinstance(single, jaxbn.nnx.BatchNorm)


# -- the switches are part of jax.jit's cache key --------------------------------------------------------


def _freeze():
    return jaxbn.linen.batch_norm_overrides(use_running_average=True, update_running_stats=False)


def _mean(updates):
    return np.asarray(updates["batch_stats"]["BatchNorm_0"]["mean"])


@pytest.mark.parametrize("flax_bn", [False, True])
def test_linen_overrides_key_the_jit_cache(rng, flax_bn):
    """One jitted step called before, inside, nested inside and after a block entered around its
    calls does what the block says each time (running statistics frozen only inside); so does a
    step traced first inside the block, and one that enters the block inside itself."""
    model, x = Net(flax_bn), _data(rng)
    variables = _trained_variables(model, x)
    stored, y_eval = _mean(variables), model.apply(variables, x, train=False)
    _, trained = model.apply(variables, x, mutable=["batch_stats"])
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))

    def assert_trains(out):
        np.testing.assert_allclose(_mean(out[1]), _mean(trained), rtol=1e-5, atol=1e-6)
        assert not np.allclose(_mean(out[1]), stored, atol=1e-3)
        assert not np.allclose(out[0], y_eval, atol=1e-3)

    def assert_frozen(out):
        np.testing.assert_array_equal(_mean(out[1]), stored)  # exact by construction: not written
        np.testing.assert_allclose(out[0], y_eval, rtol=1e-5, atol=1e-5)

    assert_trains(step(variables, x))  # traced outside any block
    with _freeze():
        assert_frozen(step(variables, x))
        with jaxbn.linen.batch_norm_overrides(
            update_running_stats=True
        ):  # nested: the inner wins per name
            y, updates = step(variables, x)
            np.testing.assert_allclose(
                y, y_eval, rtol=1e-5, atol=1e-5
            )  # running statistics used ...
            assert not np.allclose(_mean(updates), stored, atol=1e-3)  # ... and updated
        assert_frozen(step(variables, x))
    assert_trains(step(variables, x))

    fresh = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    with _freeze():
        assert_frozen(fresh(variables, x))  # traced first inside the block
    assert_trains(fresh(variables, x))

    @jax.jit
    def frozen_step(v, x):  # the block entered inside the jitted function
        with _freeze():
            return model.apply(v, x, mutable=["batch_stats"])

    assert_frozen(frozen_step(variables, x))
    assert_trains(step(variables, x))
    with _freeze():
        assert_frozen(frozen_step(variables, x))


def test_linen_use_jaxbn_keys_the_jit_cache(rng):
    """One jitted step of a flax BatchNorm called before, inside and after use_jaxbn(): a NaN batch
    poisons flax's running statistics, jaxbn's skip it (only inside the block)."""
    model, x = Net(flax_bn=True), _data(rng)
    variables = _trained_variables(model, x)
    x_nan = x.at[0, 0].set(jnp.nan)
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[1])
    assert np.isnan(_mean(step(variables, x_nan))).all()  # flax's, traced before the block
    with jaxbn.linen.use_jaxbn():
        np.testing.assert_array_equal(
            _mean(step(variables, x_nan)), _mean(variables)
        )  # exact: the batch is skipped
    assert np.isnan(_mean(step(variables, x_nan))).all()
    fresh = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[1])
    with jaxbn.linen.use_jaxbn():
        assert np.isfinite(_mean(fresh(variables, x_nan))).all()  # traced first inside the block
    assert np.isnan(_mean(fresh(variables, x_nan))).all()


def test_linen_overrides_are_local_to_the_thread(rng):
    """A block open in one thread changes nothing in another calling the same jitted step, and a
    thread started inside a block does not inherit it."""
    model, x = Net(), _data(rng)
    variables = _trained_variables(model, x)
    stored = _mean(variables)
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))
    results, entered, main_done = {}, threading.Event(), threading.Event()

    def frozen_worker():
        try:
            with _freeze():
                entered.set()
                assert main_done.wait(timeout=300)
                results["worker"] = step(variables, x)
        finally:
            entered.set()

    worker = threading.Thread(target=frozen_worker)
    worker.start()
    try:
        assert entered.wait(timeout=300)
        results["main"] = step(variables, x)  # while the worker's block is open
    finally:
        main_done.set()
        worker.join(timeout=300)
    with _freeze():
        child = threading.Thread(target=lambda: results.setdefault("child", step(variables, x)))
        child.start()
        child.join(timeout=300)
        results["main_frozen"] = step(variables, x)
    for name, frozen in (
        ("worker", True),
        ("main", False),
        ("child", False),
        ("main_frozen", True),
    ):
        assert name in results, name
        # exact by construction when frozen (not written); far from it when trained
        assert np.array_equal(_mean(results[name][1]), stored) == frozen, name


@needs_devices
def test_linen_axis_index_groups_override_as_lists(rng):
    """axis_index_groups given as lists (made a tuple key) reaches the statistics: under pmap each
    group of 4 devices normalizes with the statistics of its own half of the batch."""
    model, x = Net(), _data(rng, (16, 3))
    variables = _trained_variables(model, x)

    def step(xs):
        with jaxbn.linen.batch_norm_overrides(
            axis_name="i", axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]
        ):
            return model.apply(variables, xs, mutable=["batch_stats"])

    y, _ = jax.pmap(step, axis_name="i")(x.reshape(8, 2, 3))
    for half in range(2):
        part = x[8 * half : 8 * half + 8]
        y_half, _ = model.apply(variables, part, mutable=["batch_stats"])
        np.testing.assert_allclose(
            np.asarray(y)[4 * half : 4 * half + 4].reshape(8, 3), y_half, rtol=1e-4, atol=1e-4
        )


def test_linen_overrides_must_be_static():
    """An override that cannot key the cache (a jax.Array of groups, a traced momentum) raises a
    TypeError naming it; lists, tuples and 0-d arrays of numbers are accepted."""
    with pytest.raises(
        TypeError, match=r"(?s)axis_index_groups=.* is not a static Python value.*cache key"
    ):
        jaxbn.linen.batch_norm_overrides(axis_index_groups=jnp.asarray([[0, 1], [2, 3]]))
    with pytest.raises(TypeError, match=r"axis_name=\{.* is not a static Python value"):
        jaxbn.linen.batch_norm_overrides(axis_name={"a": 1})

    @jax.jit
    def traced_momentum(m):
        with jaxbn.linen.batch_norm_overrides(momentum=m):
            return m

    with pytest.raises(TypeError, match="momentum=.*Tracer.* is not a static Python value"):
        traced_momentum(0.5)
    for overrides in (
        dict(axis_index_groups=[[0, 1], [2, 3]]),
        dict(axis_index_groups=((0, 1), (2, 3))),
        dict(axis_name=["a", "b"]),
        dict(momentum=np.float32(0.5)),
        dict(momentum=jnp.asarray(0.5)),
    ):
        with jaxbn.linen.batch_norm_overrides(**overrides):
            pass


# -- nnx.convert of shared layers, validated before anything changes -------------------------------------


class _Holder(nnx.Module):
    def __init__(self, layer):
        self.inner = layer


class _Tied(nnx.Module):
    """One flax BatchNorm held in seven places: attributes, nnx.List, nnx.Dict, a nested module, plain containers."""

    def __init__(self, rngs):
        bn = nnx.BatchNorm(3, momentum=0.5, rngs=rngs)
        self.a = bn
        self.b = bn
        self.blocks = nnx.List([bn, nnx.LayerNorm(3, rngs=rngs)])
        self.named = nnx.Dict(bn=bn)
        self.sub = _Holder(bn)
        self.plain_list = nnx.data([bn])
        self.plain_dict = nnx.data({"bn": bn})


def test_nnx_convert_keeps_a_shared_layer_shared(rng):
    """A layer held in several places becomes one jaxbn layer held in all of them: a NaN batch
    through any of them cannot poison the statistics (flax's half would)."""
    x = _data(rng, (8, 3))
    model = _Tied(nnx.Rngs(0))
    model.a(x + 1.0)
    state_before = nnx.to_pure_dict(nnx.state(model))
    converted = jaxbn.nnx.convert(model)
    layer = converted.a
    assert type(layer) is jaxbn.nnx.BatchNorm
    for name, other in (
        ("b", converted.b),
        ("blocks[0]", converted.blocks[0]),
        ("named", converted.named["bn"]),
        ("sub", converted.sub.inner),
        ("plain_list", converted.plain_list[0]),
        ("plain_dict", converted.plain_dict["bn"]),
    ):
        assert other is layer, name
    assert type(converted.blocks[1]) is jaxbn.nnx.LayerNorm
    assert not any(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(converted))
    # exact by construction: the very same variables
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(converted)), state_before
    )
    mean = np.asarray(layer.mean[...])
    for call in (converted.b, converted.sub.inner, converted.plain_dict["bn"]):
        call(x.at[0, 0].set(jnp.nan))
        np.testing.assert_array_equal(
            layer.mean[...], mean
        )  # exact by construction: the batch is skipped
    assert np.isfinite(np.asarray(layer.var[...])).all()


class _Mixed(nnx.Module):
    def __init__(self, rngs, last):
        self.first = nnx.BatchNorm(3, rngs=rngs)
        self.later = last


def test_nnx_convert_changes_nothing_when_it_raises():
    """A layer in a tuple, or a flax layer jaxbn refuses (momentum 1.5), raises naming the layer
    before any layer is replaced."""
    rngs = nnx.Rngs(0)
    for last, error, match in (
        (
            nnx.data((nnx.BatchNorm(3, rngs=rngs), 1)),
            TypeError,
            r"BatchNorm at later/0 inside a tuple.*Nothing",
        ),
        (
            nnx.List([nnx.BatchNorm(3, momentum=1.5, rngs=rngs)]),
            ValueError,
            r"BatchNorm at later/0: momentum.*Nothing",
        ),
    ):
        model = _Mixed(rngs, last)
        first = model.first
        with pytest.raises(error, match=match):
            jaxbn.nnx.convert(model)
        assert model.first is first and type(first) is nnx.BatchNorm
        assert not any(isinstance(node, jaxbn.nnx.BatchNorm) for _, node in nnx.iter_graph(model))
