"""Model-wide switches: linen overrides/conversion by interception, nnx freeze/set/convert by graph walk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx


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
    _, updates = model.apply(variables, x + 1.0, mutable=["batch_stats"])  # non-trivial running stats
    return {**variables, **updates}


@pytest.mark.parametrize("flax_bn", [False, True])
def test_linen_freeze_uses_and_keeps_running_stats(rng, flax_bn):
    model, x = Net(flax_bn), _data(rng)
    variables = _trained_variables(model, x)
    with jaxbn.linen.batch_norm_overrides(use_running_average=True, update_running_stats=False):
        y, updates = model.apply(variables, x, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    np.testing.assert_allclose(y, model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
    y_train, _ = model.apply(variables, x, mutable=["batch_stats"])
    assert not np.allclose(y, y_train, atol=1e-3)  # training output differs: the freeze did something


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
    assert float(jnp.abs(frozen["BatchNorm_0"]["scale"]).sum()) == 0
    assert float(jnp.abs(frozen["Dense_0"]["kernel"]).sum()) > 0


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
    y_local, _ = jax.vmap(lambda xs: model.apply(variables, xs, mutable=["batch_stats"]))(x.reshape(4, 4, 3))
    assert not np.allclose(y_local.reshape(16, 3), y_global, atol=1e-3)


def test_linen_momentum_override(rng):
    model, x = Net(), _data(rng)
    variables = model.init(jax.random.key(0), x)
    h = nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, x)
    with jaxbn.linen.batch_norm_overrides(momentum=0.9):
        _, updates = model.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    _, default = model.apply(variables, x, mutable=["batch_stats"])  # the field: momentum 0.5
    np.testing.assert_allclose(default["batch_stats"]["BatchNorm_0"]["mean"], 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)


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
        {"params": variables["params"]["BatchNorm_0"], "batch_stats": variables["batch_stats"]["BatchNorm_0"]},
        nn.Dense(4).apply({"params": variables["params"]["Dense_0"]}, x), use_running_average=False,
        mask=jnp.broadcast_to(mask, (16, 4)), mutable=["batch_stats"])

    def shard(xs, ms):
        with jaxbn.linen.use_jaxbn(), jaxbn.linen.batch_norm_overrides(axis_name="d"):
            _, state = model.apply(variables, xs, mask=jnp.broadcast_to(ms, (4, 4)), mutable=["batch_stats",
                                                                                               "intermediates"])
        return state

    state = jax.vmap(shard, axis_name="d")(x.reshape(4, 4, 3), mask.reshape(4, 4, 1))
    np.testing.assert_allclose(state["batch_stats"]["BatchNorm_0"]["mean"][0], exp_upd["batch_stats"]["mean"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["BatchNorm_0"]["var"][0], exp_upd["batch_stats"]["var"],
                               rtol=1e-5, atol=1e-5)
    del expected


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
        self.norms = nnx.Dict(ln=nnx.LayerNorm(4, rngs=rngs), gn=nnx.GroupNorm(4, num_groups=2, rngs=rngs))

    def __call__(self, x):
        return self.norms["gn"](self.norms["ln"](self.blocks[0](self.dense(x))))


def test_nnx_freeze_survives_train_and_unfreeze_restores(rng):
    model, x = NnxNet(False, nnx.Rngs(0)), _data(rng)
    model(x + 1.0)
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    jaxbn.nnx.freeze(model)
    model.train()
    y = model(x)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), before)
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
    assert "blocks" not in nnx.to_pure_dict(params)  # the BatchNorm's scale and bias are no Param now
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
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state), nnx.to_pure_dict(state_before))
    np.testing.assert_allclose(converted(x), reference(x), rtol=1e-4, atol=1e-4)  # training step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 nnx.to_pure_dict(nnx.state(converted)), nnx.to_pure_dict(nnx.state(reference)))
    converted.eval(), reference.eval()
    np.testing.assert_allclose(converted(x), reference(x), rtol=1e-4, atol=1e-4)
    jaxbn.nnx.freeze(converted)  # now allowed
    single = jaxbn.nnx.convert(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    assert isinstance(single, jaxbn.nnx.BatchNorm)
