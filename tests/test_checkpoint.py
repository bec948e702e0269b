"""Checkpoints with orbax lose nothing: resume bitwise, swap flax for jaxbn and back, restore sharded.

The interrupted run resumes in a new process (``python -m
tests._checkpoint_worker``, which inherits the 8 forced CPU devices from
conftest.py's environment), so nothing survives the interruption but the
checkpoint; linen (variables + optax state) and nnx (``nnx.state`` of the
model and of ``nnx.Optimizer``) alike. flax's BatchNorm checkpoints load into
jaxbn's and back unchanged. Running statistics carry their parameters'
sharding annotations (``nn.with_partitioning``, ``out_sharding``), so a sharded
restore puts them on the parameters' devices.
"""

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.linen
import jaxbn.nnx
from tests import _checkpoint_worker as worker
from tests.conftest import N_DEVICES, needs_devices

pytestmark = needs_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_worker(scenario: str, directory: pathlib.Path) -> None:
    """Runs a scenario of tests/_checkpoint_worker.py in a fresh interpreter; fails with its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "tests._checkpoint_worker", scenario, str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"worker {scenario!r} failed:\n{result.stderr[-4000:]}"


def _assert_bitwise_equal(actual: dict, expected: dict) -> None:
    """Same keys, and per key the same dtype, shape and bits.

    Only for values equal by construction: a checkpoint restore or a copy (the same bytes), constant
    initializers, or the same compiled train step run on the same (restored) inputs on this machine (XLA is
    deterministic). Anything computed by two different programs is compared to rounding.
    """
    assert sorted(actual) == sorted(expected)
    for key in expected:
        a, e = np.asarray(actual[key]), np.asarray(expected[key])
        assert a.dtype == e.dtype and a.shape == e.shape, key
        assert a.tobytes() == e.tobytes(), f"{key}: max |diff| {np.max(np.abs(a - e))}"


# --- linen: interrupt, resume in a new process, restore sharded -----------------------------------------


@pytest.fixture(scope="module")
def linen_run(tmp_path_factory):
    """Trains SAVE_STEP steps, checkpoints, trains on uninterrupted; the worker resumes from the checkpoint."""
    directory = tmp_path_factory.mktemp("linen")
    saved = worker.train(worker.init_state(), 0, worker.SAVE_STEP)
    worker.save(directory / "ckpt", worker.SAVE_STEP, saved)
    uninterrupted = worker.train(saved, worker.SAVE_STEP, worker.SAVE_STEP + worker.RESUME_STEPS)
    _run_worker("linen", directory)
    return directory, worker.flat(saved), worker.flat(uninterrupted)


@pytest.mark.slow  # its fixture resumes in a new process
def test_linen_resume_in_new_process_is_bitwise_identical(linen_run):
    """params, batch_stats and momentum after save -> new process -> restore -> resume equal the uninterrupted run's."""
    directory, saved, uninterrupted = linen_run
    resumed = dict(np.load(directory / "resumed.npz"))
    assert any("batch_stats" in key for key in resumed) and any(".trace" in key for key in resumed)
    # exact: the restore gives the saved bytes, and the resumed steps run the same jitted step on them
    _assert_bitwise_equal(resumed, uninterrupted)
    # Resuming changed everything that trains, so the equality above is not the checkpoint echoed back.
    for key in uninterrupted:
        if "batch_stats" in key or "params" in key or ".trace" in key:
            assert not np.array_equal(saved[key], uninterrupted[key]), key


@pytest.mark.slow  # its fixture resumes in a new process
def test_linen_sharded_restore_places_each_array_as_annotated(linen_run):
    """Restored onto a ('data', 'model') mesh: the saved values, features split over 'model', stats like scale."""
    directory, saved, _ = linen_run
    _assert_bitwise_equal(
        dict(np.load(directory / "sharded_restored.npz")), saved
    )  # exact: a restore
    specs = json.loads((directory / "sharded_specs.json").read_text())
    model_size = N_DEVICES // 2
    expected = {
        "['BatchNorm_0']['scale']": ["model"],
        "['BatchNorm_0']['bias']": ["model"],
        "['BatchNorm_0']['mean']": ["model"],
        "['BatchNorm_0']['var']": ["model"],
        "['Conv_0']['kernel']": [None, None, None, "model"],
        "['Conv_0']['bias']": [],
        "['Dense_0']['kernel']": ["model", None],
        "['Dense_0']['bias']": [],
    }
    assert len(specs) == 14  # 6 params, 2 running statistics, 6 momenta
    for key, got in specs.items():
        (spec,) = [spec for suffix, spec in expected.items() if key.endswith(suffix)]
        assert (
            got["spec"] == spec and got["mesh"] == ["data", "model"] and got["devices"] == N_DEVICES
        ), key
        full = list(saved[key].shape)
        shard = [
            n // model_size if name == "model" else n
            for n, name in zip(full, spec + [None] * len(full))
        ]
        assert got["shard_shape"] == shard, key


@pytest.mark.slow  # its fixture resumes in a new process
def test_linen_sharded_resume_matches_uninterrupted(linen_run):
    """Training on resumes on the mesh (batch over 'data', features over 'model') as on one device."""
    directory, _, uninterrupted = linen_run
    resumed = dict(np.load(directory / "sharded_resumed.npz"))
    assert sorted(resumed) == sorted(uninterrupted)
    for key in uninterrupted:  # XLA reduces in another order across devices: equal up to rounding
        np.testing.assert_allclose(
            resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, err_msg=key
        )


# --- flax.linen.BatchNorm checkpoint -> jaxbn.linen.BatchNorm -> flax -----------------------------------


class _Net(nn.Module):
    """Conv -> BatchNorm (flax's or jaxbn's) -> relu -> Dense; the norm is auto-named as in a user's model."""

    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = self.norm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))


@functools.cache
def _net_step(norm):
    net = _Net(norm)

    def step(variables, x):
        def loss(params):
            y, updates = net.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(y**2), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.01 * g, variables["params"], grads)
        return {"params": params, "batch_stats": batch_stats}

    return jax.jit(step), jax.jit(functools.partial(net.apply, train=False))


def _save_restore(path: pathlib.Path, tree, abstract):
    """Saves ``tree`` with orbax and restores it as ``abstract`` says."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
        return checkpointer.restore(path, abstract)
    finally:
        checkpointer.close()


def test_flax_checkpoint_loads_into_jaxbn_and_back(tmp_path, rng):
    """A flax.linen.BatchNorm model's checkpoint restores into the jaxbn model and back with trees and bits intact."""
    x = [jnp.asarray(rng.normal(3.0, 2.0, (4, 5, 5, 2)), jnp.float32) for _ in range(3)]
    flax_step, flax_eval = _net_step(nn.BatchNorm)
    jaxbn_step, jaxbn_eval = _net_step(jaxbn.linen.BatchNorm)
    flax_abstract, jaxbn_abstract = (
        jax.eval_shape(functools.partial(_Net(norm).init, train=False), jax.random.key(0), x[0])
        for norm in (nn.BatchNorm, jaxbn.linen.BatchNorm)
    )
    assert jax.tree.structure(flax_abstract) == jax.tree.structure(jaxbn_abstract)

    flax_vars = flax_step(_Net(nn.BatchNorm).init(jax.random.key(0), x[0], train=False), x[0])
    loaded = _save_restore(tmp_path / "flax", flax_vars, jaxbn_abstract)
    assert jax.tree.structure(loaded) == jax.tree.structure(flax_vars)
    _assert_bitwise_equal(worker.flat(loaded), worker.flat(flax_vars))  # exact: a restore
    np.testing.assert_allclose(
        jaxbn_eval(loaded, x[1]), flax_eval(flax_vars, x[1]), rtol=1e-5, atol=1e-5
    )

    trained = jaxbn_step(jaxbn_step(loaded, x[1]), x[2])
    back = _save_restore(tmp_path / "jaxbn", trained, flax_abstract)
    assert jax.tree.structure(back) == jax.tree.structure(flax_vars)
    _assert_bitwise_equal(worker.flat(back), worker.flat(trained))  # exact: a restore
    assert not np.array_equal(
        back["batch_stats"]["BatchNorm_0"]["mean"],  # jaxbn's steps changed it
        flax_vars["batch_stats"]["BatchNorm_0"]["mean"],
    )
    np.testing.assert_allclose(
        flax_eval(back, x[0]), jaxbn_eval(trained, x[0]), rtol=1e-5, atol=1e-5
    )


# --- sharding metadata on the running statistics ---------------------------------------------------------

FEATURES = 16
MESH = Mesh(np.array(jax.devices()[:N_DEVICES]), ("model",))  # Auto axes: XLA propagates shardings
RULES = (("embed", "model"),)
ONES, ZEROS = nn.initializers.ones, nn.initializers.zeros
ANNOTATIONS = {
    # name: (BatchNorm keyword arguments, the names the running statistics should carry)
    "partitioned": (
        dict(
            scale_init=nn.with_partitioning(ONES, ("model",)),
            bias_init=nn.with_partitioning(ZEROS, ("model",)),
        ),
        ("model",),
    ),
    "logical": (
        dict(
            scale_init=nn.with_logical_partitioning(ONES, ("embed",)),
            bias_init=nn.with_logical_partitioning(ZEROS, ("embed",)),
        ),
        ("embed",),
    ),
    "scale_only": (dict(scale_init=nn.with_partitioning(ONES, ("model",))), ("model",)),
    "bias_only": (
        dict(use_scale=False, bias_init=nn.with_partitioning(ZEROS, ("model",))),
        ("model",),
    ),
    "cumulative": (
        dict(momentum=None, scale_init=nn.with_partitioning(ONES, ("model",))),
        ("model",),
    ),
}


def _x(rng):
    return jnp.asarray(rng.normal(1.0, 2.0, (4, 3, FEATURES)), jnp.float32)


def _mesh_shardings(abstract, logical: bool):
    """NamedShardings from the boxes, mapping logical names through RULES where they are logical."""
    specs = nn.get_partition_spec(abstract)
    if logical:
        return nn.logical_to_mesh_sharding(specs, MESH, RULES)
    return jax.tree.map(
        lambda spec: NamedSharding(MESH, spec), specs, is_leaf=lambda s: isinstance(s, P)
    )


@pytest.mark.parametrize("name", sorted(ANNOTATIONS))
def test_running_stats_carry_the_parameters_partitioning(name, rng):
    """mean/var get scale's (else bias's) box: same type and names, so the same partition spec."""
    kwargs, names = ANNOTATIONS[name]
    bn = jaxbn.linen.BatchNorm(use_running_average=False, **kwargs)
    abstract = jax.eval_shape(bn.init, jax.random.key(0), _x(rng))
    source = abstract["params"]["scale" if "scale" in abstract["params"] else "bias"]
    specs = nn.get_partition_spec(abstract)
    for key in ("mean", "var"):
        box = abstract["batch_stats"][key]
        assert type(box) is type(source) and box.names == names and box.value.shape == (FEATURES,)
        assert specs["batch_stats"][key] == P(*names)
    if name == "cumulative":  # a scalar: nothing to shard
        assert not isinstance(abstract["batch_stats"]["count"], meta.AxisMetadata)
        assert specs["batch_stats"]["count"] == P()


def test_unannotated_running_stats_stay_plain_arrays(rng):
    """Without annotations the variables are flax's: plain arrays, the same tree and values."""
    x = _x(rng)
    ours = jaxbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert all(
        type(leaf) is type(jnp.zeros(1))
        for leaf in jax.tree.leaves(ours, is_leaf=meta.is_axis_metadata)
    )
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    _assert_bitwise_equal(
        worker.flat(ours), worker.flat(theirs)
    )  # exact: constant inits (ones, zeros)


@pytest.mark.parametrize("name", ["partitioned", "logical"])
def test_running_stats_shard_like_scale(name, tmp_path, rng):
    """jit-init with the specs' shardings, a training step, and an orbax restore put mean/var where scale is."""
    kwargs, _ = ANNOTATIONS[name]
    bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9, **kwargs)
    x = _x(rng)
    abstract = jax.eval_shape(bn.init, jax.random.key(0), x)
    shardings = _mesh_shardings(abstract, logical=name == "logical")
    features = NamedSharding(MESH, P("model"))
    for key in ("mean", "var"):
        assert shardings["batch_stats"][key].is_equivalent_to(features, 1)

    variables = jax.jit(bn.init, out_shardings=shardings)(jax.random.key(0), x)
    for collection, key in (("params", "scale"), ("batch_stats", "mean"), ("batch_stats", "var")):
        value = variables[collection][key].value
        assert value.sharding.is_equivalent_to(features, 1)
        assert {shard.data.shape for shard in value.addressable_shards} == {
            (FEATURES // N_DEVICES,)
        }

    # A step keeps the boxes (so the updated statistics save and restore with the same specs) and computes
    # what the unannotated module computes on one device.
    _, updates = jax.jit(functools.partial(bn.apply, mutable=["batch_stats"]))(variables, x)
    plain = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    _, expected = plain.apply(plain.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    for key in ("mean", "var"):
        assert type(updates["batch_stats"][key]) is type(abstract["batch_stats"][key])
        # sharded sums round differently: relative to the statistics' scale, not to a mean near 0
        np.testing.assert_allclose(
            updates["batch_stats"][key].value, expected["batch_stats"][key], rtol=1e-6, atol=1e-7
        )

    # Saved from one device, restored onto the mesh as the annotations say.
    state = nn.unbox({"params": variables["params"], "batch_stats": updates["batch_stats"]})
    state = jax.tree.map(lambda a: jax.device_put(a, jax.devices()[0]), state)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract),
        shardings,
    )
    restored = _save_restore(tmp_path / "stats", state, target)
    _assert_bitwise_equal(worker.flat(restored), worker.flat(state))  # exact: a restore
    for key in ("mean", "var"):
        assert restored["batch_stats"][key].sharding.is_equivalent_to(features, 1)


# --- nnx: the same guarantees for nnx.state and nnx.Optimizer ---------------------------------------------


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    """As ``linen_run``, checkpointing ``nnx.state`` of the model and the optimizer."""
    directory = tmp_path_factory.mktemp("nnx")
    model, optimizer = worker.nnx_init()
    worker.nnx_train(model, optimizer, 0, worker.SAVE_STEP)
    saved = worker.nnx_flat(model, optimizer)
    worker.save(directory / "ckpt", worker.SAVE_STEP, worker.nnx_states(model, optimizer))
    worker.nnx_train(model, optimizer, worker.SAVE_STEP, worker.SAVE_STEP + worker.RESUME_STEPS)
    _run_worker("nnx", directory)
    return directory, saved, worker.nnx_flat(model, optimizer)


@pytest.mark.slow  # its fixture resumes in a new process
def test_nnx_resume_in_new_process_is_bitwise_identical(nnx_run):
    """Model state, momentum and step restored into an nnx.eval_shape model in a new process resume bitwise."""
    directory, saved, uninterrupted = nnx_run
    resumed = dict(np.load(directory / "resumed.npz"))
    assert "['model']['bn']['mean']" in resumed and "['optimizer']['step']" in resumed
    # exact: the restore gives the saved bytes, and the resumed steps run the same jitted step on them
    _assert_bitwise_equal(resumed, uninterrupted)
    for key in uninterrupted:  # everything trains, so the checkpoint is not merely echoed back
        assert not np.array_equal(saved[key], uninterrupted[key]), key
    assert int(resumed["['optimizer']['step']"]) == worker.SAVE_STEP + worker.RESUME_STEPS


def _nnx_model(norm):
    """``(model, its abstract state)``: an NnxNet with ``norm`` and its state built by nnx.eval_shape."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: worker.NnxNet(nnx.Rngs(0), norm)))
    return worker.NnxNet(nnx.Rngs(0), norm), abstract


@nnx.jit
def _nnx_eval(model, x):
    model.eval()
    y = model(x)
    model.train()
    return y


@pytest.mark.slow  # ~5 s; test_nnx.py's state swaps and the linen checkpoint test stay
def test_flax_nnx_state_loads_into_jaxbn_nnx_and_back(tmp_path):
    """flax.nnx.BatchNorm's nnx.state restores into jaxbn.nnx.BatchNorm's abstract model and back, bits intact."""
    theirs, flax_abstract = _nnx_model(nnx.BatchNorm)
    ours, jaxbn_abstract = _nnx_model(jaxbn.nnx.BatchNorm)
    assert jax.tree.structure(flax_abstract) == jax.tree.structure(jaxbn_abstract)
    x = worker.batch(100)[0]

    worker.nnx_train(theirs, nnx.Optimizer(theirs, worker.TX, wrt=nnx.Param), 0, 2)
    flax_state = nnx.state(theirs)
    loaded = _save_restore(tmp_path / "flax", flax_state, jaxbn_abstract)
    assert jax.tree.structure(loaded) == jax.tree.structure(flax_state)
    _assert_bitwise_equal(
        worker.flat(nnx.to_pure_dict(loaded)), worker.flat(nnx.to_pure_dict(flax_state))
    )  # restore
    nnx.update(ours, loaded)
    np.testing.assert_allclose(_nnx_eval(ours, x), _nnx_eval(theirs, x), rtol=1e-5, atol=1e-5)

    worker.nnx_train(ours, nnx.Optimizer(ours, worker.TX, wrt=nnx.Param), 2, 4)
    jaxbn_state = nnx.state(ours)
    back = _save_restore(tmp_path / "jaxbn", jaxbn_state, flax_abstract)
    assert jax.tree.structure(back) == jax.tree.structure(flax_state)
    _assert_bitwise_equal(
        worker.flat(nnx.to_pure_dict(back)), worker.flat(nnx.to_pure_dict(jaxbn_state))
    )  # restore
    assert not np.array_equal(back["bn"]["mean"][...], flax_state["bn"]["mean"][...])
    nnx.update(theirs, back)
    np.testing.assert_allclose(_nnx_eval(theirs, x), _nnx_eval(ours, x), rtol=1e-5, atol=1e-5)


NNX_ANNOTATIONS = {  # every parameter placed on the mesh, so that a jitted call sees one device set
    "metadata": dict(
        scale_metadata={"out_sharding": ("model",), "mesh": MESH},
        bias_metadata={"out_sharding": ("model",), "mesh": MESH},
    ),
    "initializer": dict(
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("model",), mesh=MESH),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",), mesh=MESH),
    ),
    "scale_first": dict(
        scale_metadata={"out_sharding": ("model",), "mesh": MESH},  # bias replicated
        bias_metadata={"out_sharding": (None,), "mesh": MESH},
    ),
    "bias_only": dict(use_scale=False, bias_metadata={"out_sharding": ("model",), "mesh": MESH}),
}


@pytest.mark.parametrize("name", sorted(NNX_ANNOTATIONS))
def test_nnx_running_stats_shard_like_scale(name, tmp_path, rng):
    """jaxbn.nnx.BatchNorm: mean/var get the parameter's sharding metadata, placement and sharded restore."""
    kwargs = NNX_ANNOTATIONS[name]
    param = "bias" if name == "bias_only" else "scale"
    features = NamedSharding(MESH, P("model"))
    bn = jaxbn.nnx.BatchNorm(FEATURES, momentum=0.9, rngs=nnx.Rngs(0), **kwargs)
    specs = nnx.get_partition_spec(nnx.state(bn))
    for key in ("mean", "var"):
        assert specs[key].get_value() == specs[param].get_value() == P("model")
        assert getattr(bn, key).get_metadata()["out_sharding"] == ("model",)
        assert getattr(bn, key)[...].sharding.is_equivalent_to(features, 1)

    # A checkpoint of an unannotated module (one device) restores onto the annotated module's devices.
    x = _x(rng)
    plain = jaxbn.nnx.BatchNorm(
        FEATURES, momentum=0.9, rngs=nnx.Rngs(0), use_scale=param == "scale"
    )
    plain(x)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(
            lambda: jaxbn.nnx.BatchNorm(FEATURES, momentum=0.9, rngs=nnx.Rngs(0), **kwargs)
        )
    )
    restored = _save_restore(tmp_path / "stats", nnx.state(plain), abstract)
    # exact: a restore of the saved state
    _assert_bitwise_equal(
        worker.flat(nnx.to_pure_dict(restored)), worker.flat(nnx.to_pure_dict(nnx.state(plain)))
    )
    for key in ("mean", "var"):
        assert restored[key][...].sharding.is_equivalent_to(features, 1)
    sharded = nnx.merge(graphdef, restored)
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(sharded, x), plain(x), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(sharded.mean[...], plain.mean[...], rtol=1e-6, atol=1e-7)


def test_nnx_unannotated_running_stats_are_flax_s():
    """Without annotations jaxbn.nnx.BatchNorm's state has flax's tree, variable types and metadata."""
    ours = nnx.state(jaxbn.nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(0)))
    theirs = nnx.state(nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(0)))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for key in ("mean", "var"):
        assert ours[key].get_metadata() == theirs[key].get_metadata()
