"""The training run that tests/test_checkpoint.py interrupts, and the process that resumes it.

Imported by the test (the model, the data, the step and the checkpoint layout
live here once) and run as ``python -m tests._checkpoint_worker SCENARIO DIR``
from the repository root: a fresh process that knows nothing of the run except
the checkpoint under ``DIR``. It writes what it computed to ``DIR`` as ``.npz``
files (keys are ``jax.tree_util.keystr`` paths) and a ``.json`` of shardings,
for the test to compare with the run that was never interrupted.

Scenarios:
  ``linen``: restore the latest step onto one device, train ``RESUME_STEPS``
    more steps, write ``resumed.npz``; restore the same step onto a 2 x 4
    ('data', 'model') mesh (features sharded over 'model' as the model's ``nn.with_partitioning``
    annotations say, optimizer state like its parameters), write
    ``sharded_restored.npz`` and ``sharded_specs.json``; train
    ``RESUME_STEPS`` steps there with the batch sharded over 'data', write
    ``sharded_resumed.npz``.
  ``nnx``: restore ``nnx.state`` of the model and optimizer into an
    ``nnx.eval_shape`` model, train ``RESUME_STEPS`` more steps, write
    ``resumed.npz``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn.linen
import jaxbn.nnx

FEATURES = 8  # sharded over the mesh's 'model' axis
CLASSES = 4
BATCH = 8
SAVE_STEP = 3  # steps before the interruption
RESUME_STEPS = 3  # steps after it
TX = optax.sgd(0.05, momentum=0.9)  # momentum: the optimizer has state to lose


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of ``step`` (a pure function of it, so a resumed run sees the same data)."""
    rng = np.random.default_rng(step)
    x = rng.normal(2.0, 3.0, (BATCH, 6, 6, 3)).astype(np.float32)
    return x, rng.integers(0, CLASSES, BATCH)


class Model(nn.Module):
    """Conv -> jaxbn BatchNorm -> relu -> mean pool -> Dense, features annotated for a 'model' mesh axis."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(
            FEATURES,
            (3, 3),
            kernel_init=nn.with_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "model")
            ),
        )(x)
        x = jaxbn.linen.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            scale_init=nn.with_partitioning(nn.initializers.ones, ("model",)),
            bias_init=nn.with_partitioning(nn.initializers.zeros, ("model",)),
        )(x)
        x = nn.relu(x).mean((1, 2))
        return nn.Dense(
            CLASSES,
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None)),
        )(x)


MODEL = Model()


def init_state() -> dict:
    """``{'variables': {'params', 'batch_stats'}, 'opt_state'}`` at step 0, plain (unboxed) arrays."""
    variables = nn.unbox(MODEL.init(jax.random.key(0), batch(0)[0], train=False))
    return {"variables": variables, "opt_state": TX.init(variables["params"])}


def _step(state: dict, x: jax.Array, y: jax.Array) -> dict:
    variables = state["variables"]

    def loss(params):
        logits, updates = MODEL.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates[
            "batch_stats"
        ]

    grads, batch_stats = jax.grad(loss, has_aux=True)(variables["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {"variables": {"params": params, "batch_stats": batch_stats}, "opt_state": opt_state}


train_step = jax.jit(_step)


def train(state: dict, start: int, stop: int, step_fn=train_step, put=lambda a: a) -> dict:
    """Steps ``start .. stop - 1``; ``put`` places each batch (e.g. sharded over devices)."""
    for step in range(start, stop):
        x, y = batch(step)
        state = step_fn(state, put(x), put(y))
    return state


def save(directory: pathlib.Path, step: int, state: dict) -> None:
    """Saves ``state`` (one item per key) as step ``step`` and waits until it is on disk."""
    mngr = ocp.CheckpointManager(directory, item_names=tuple(state))
    mngr.save(
        step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in state.items()})
    )
    mngr.wait_until_finished()
    mngr.close()


def restore(directory: pathlib.Path, abstract: dict) -> tuple[int, dict]:
    """The latest step and its state, restored as ``abstract`` says (shapes, dtypes, shardings)."""
    mngr = ocp.CheckpointManager(directory, item_names=tuple(abstract))
    step = mngr.latest_step()
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}),
    )
    mngr.close()
    return step, {k: restored[k] for k in abstract}


def flat(tree) -> dict[str, np.ndarray]:
    """``{keystr(path): numpy array}`` of a pytree's leaves."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def shardings(mesh: jax.sharding.Mesh) -> dict:
    """The state's shardings on ``mesh``: as annotated (statistics like ``scale``), optimizer like params."""
    boxed = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), batch(0)[0], train=False))
    variables = nn.get_sharding(boxed, mesh)
    abstract_params = nn.unbox(boxed)["params"]
    opt_state = optax.tree_map_params(
        TX,
        lambda _, s: s,
        jax.eval_shape(TX.init, abstract_params),
        variables["params"],
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    return {"variables": variables, "opt_state": opt_state}


def abstract_state(sharding_tree=None) -> dict:
    """``jax.ShapeDtypeStruct`` s of the state, with ``sharding_tree``'s shardings if given."""
    abstract = jax.eval_shape(init_state)
    if sharding_tree is None:
        return abstract
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding_tree
    )


def _linen(directory: pathlib.Path) -> None:
    step, state = restore(directory / "ckpt", abstract_state())
    np.savez(directory / "resumed.npz", **flat(train(state, step, step + RESUME_STEPS)))

    # Mesh, not jax.make_mesh: its axes are Auto (sharding propagated by XLA) in every jax version.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    target = shardings(mesh)
    step, sharded = restore(directory / "ckpt", abstract_state(target))
    np.savez(directory / "sharded_restored.npz", **flat(sharded))
    specs = {
        jax.tree_util.keystr(path): {
            "spec": list(leaf.sharding.spec),
            "mesh": list(leaf.sharding.mesh.axis_names),
            "devices": len({shard.device for shard in leaf.addressable_shards}),
            "shard_shape": list(leaf.addressable_shards[0].data.shape),
        }
        for path, leaf in jax.tree_util.tree_leaves_with_path(sharded)
    }
    (directory / "sharded_specs.json").write_text(json.dumps(specs))

    data = NamedSharding(mesh, P("data"))  # batch over 'data', features over 'model'
    sharded_step = jax.jit(_step, in_shardings=(target, data, data), out_shardings=target)
    resumed = train(
        sharded, step, step + RESUME_STEPS, sharded_step, lambda a: jax.device_put(a, data)
    )
    np.savez(directory / "sharded_resumed.npz", **flat(resumed))


class NnxNet(nnx.Module):
    """The same network in nnx: Conv -> BatchNorm (jaxbn's by default) -> relu -> mean pool -> Linear."""

    def __init__(self, rngs: nnx.Rngs, norm: type = jaxbn.nnx.BatchNorm):
        self.conv = nnx.Conv(3, FEATURES, (3, 3), rngs=rngs)
        self.bn = norm(FEATURES, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(FEATURES, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def nnx_init() -> tuple[NnxNet, nnx.Optimizer]:
    """The model and its optimizer at step 0."""
    model = NnxNet(nnx.Rngs(0))
    return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


@nnx.jit
def _nnx_step(model: NnxNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    optimizer.update(model, nnx.grad(loss)(model))


def nnx_train(model: NnxNet, optimizer: nnx.Optimizer, start: int, stop: int) -> None:
    """Steps ``start .. stop - 1``, in place."""
    model.train()
    for step in range(start, stop):
        _nnx_step(model, optimizer, *batch(step))


def nnx_states(model: NnxNet, optimizer: nnx.Optimizer) -> dict:
    """What an nnx run checkpoints: ``nnx.state`` of the model (params and batch stats) and the optimizer."""
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def nnx_flat(model: NnxNet, optimizer: nnx.Optimizer) -> dict[str, np.ndarray]:
    """:func:`flat` of the pure dicts of :func:`nnx_states`."""
    return flat(
        {key: nnx.to_pure_dict(state) for key, state in nnx_states(model, optimizer).items()}
    )


def nnx_restore(directory: pathlib.Path) -> tuple[int, NnxNet, nnx.Optimizer]:
    """The latest step, and the model and optimizer built abstractly (``nnx.eval_shape``) and filled from it."""
    abstract_model, abstract_optimizer = nnx.eval_shape(nnx_init)
    (model_def, model_state), (opt_def, opt_state) = (
        nnx.split(abstract_model),
        nnx.split(abstract_optimizer),
    )
    step, restored = restore(directory, {"model": model_state, "optimizer": opt_state})
    return step, nnx.merge(model_def, restored["model"]), nnx.merge(opt_def, restored["optimizer"])


def _nnx(directory: pathlib.Path) -> None:
    step, model, optimizer = nnx_restore(directory / "ckpt")
    nnx_train(model, optimizer, step, step + RESUME_STEPS)
    np.savez(directory / "resumed.npz", **nnx_flat(model, optimizer))


def main(argv: list[str]) -> None:
    scenario, directory = argv[1], pathlib.Path(argv[2])
    {"linen": _linen, "nnx": _nnx}[scenario](directory)


if __name__ == "__main__":
    main(sys.argv)
