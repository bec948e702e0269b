"""Train a small CNN on scikit-learn's digits with and without BatchNorm.

The model is a Flax linen CNN (two 3x3 convolutions, each followed by
BatchNorm and ReLU, then average pooling and a Dense head) trained with optax
on the 8x8 digits images that ship with scikit-learn, so nothing is
downloaded. Training is data-parallel over every local device the modern way:
the global batch is sharded over a 1-D ``jax.sharding.Mesh`` of
``jax.local_devices()`` and ``jax.jit`` compiles one program for all of them.
Parameters and batch statistics are replicated. Because ``jit`` sees the
global batch, BatchNorm needs no ``axis_name``: XLA inserts the cross-device
reductions itself.

Usage::

    python examples/train_digits.py                      # jaxbn vs flax vs none
    python examples/train_digits.py --norm jaxbn --epochs 5
    python examples/train_digits.py --cpu-devices 8      # 8 fake CPU devices
    python examples/train_digits.py --quick              # one epoch: checks the code runs

``--cpu-devices N`` is for a laptop without accelerators: it makes the CPU
show up as N devices (and selects the CPU platform) so the sharded path is
exercised. On GPU or TPU, leave it out; the script uses whatever devices JAX
sees.

Evaluation uses the running averages (``use_running_average=True``), which is
what a deployed model would use. The script prints a table and writes the
curves (``train_digits.png``) and the table (``train_digits.md``) to
``--out`` (default: a folder of the system's temporary directory, which it
prints; ``--update-committed`` rewrites the committed ones in
``examples/figures``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Split,
    check_args,
    example_parser,
    force_cpu_devices,
    load_digits,
    markdown_table,
    progress,
    pyplot,
    save_figure,
    write_report,
)

NORMS = ("jaxbn", "flax", "none")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses command-line arguments.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    # --quick, --out, --update-committed, --no-progress; no --seeds: --seed picks the one run's seed.
    parser = example_parser(__doc__.split("\n\n", 1)[0], "train_digits", seeds=None)
    parser.add_argument(
        "--norm",
        choices=(*NORMS, "all"),
        default="all",
        help="normalization after each convolution; 'all' trains each and "
        "prints a comparison table",
    )
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="global batch size; rounded to a multiple of the device count",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="fixes the train/test split, initialisation and batch order",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="run on N forced host-platform (CPU) devices; leave out on "
        "GPU/TPU to use the devices JAX sees",
    )
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.epochs = 1
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        parser.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    return args


def load_data(seed: int) -> Split:
    """Loads digits as NHWC float32 images in [0, 1] with a stratified 80/20 split (seed ``seed``)."""
    return load_digits(seed, images=True, test_fraction=0.2)


def make_model(norm: str) -> Any:
    """Builds the CNN for one normalization choice.

    Args:
        norm: One of ``'jaxbn'``, ``'flax'`` or ``'none'``.

    Returns:
        A ``flax.linen.Module`` called as ``model(x, train=...)``.
    """
    import flax.linen as nn

    if norm == "jaxbn":
        # Imported only when asked for, so the other runs need nothing but Flax.
        from jaxbn.linen import BatchNorm
    elif norm == "flax":
        BatchNorm = nn.BatchNorm
    elif norm == "none":
        BatchNorm = None
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

    class CNN(nn.Module):
        """Conv-BN-ReLU x2, average pooling, Dense head."""

        @nn.compact
        def __call__(self, x, train: bool):
            for features in (32, 64):
                # BatchNorm's bias makes the convolution's redundant.
                x = nn.Conv(features, (3, 3), use_bias=BatchNorm is None)(x)
                if BatchNorm is not None:
                    # momentum=0.9 rather than Flax's 0.99: with ~20 steps an
                    # epoch, 0.99 would leave the running averages dominated by
                    # their initial values for most of a short run, and
                    # evaluation uses the running averages.
                    x = BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(10)(x)

    return CNN()


def train_one(
    norm: str, data: tuple[np.ndarray, ...], args: argparse.Namespace, mesh: Any, batch_size: int
) -> dict[str, float]:
    """Trains and evaluates one model.

    Args:
        norm: Normalization choice, see ``make_model``.
        data: ``(x_train, y_train, x_test, y_test)`` from ``load_data``.
        args: Parsed command-line arguments.
        mesh: 1-D mesh with axis ``'data'`` over the local devices.
        batch_size: Global batch size, a multiple of the mesh size.

    Returns:
        ``{'train_loss', 'test_accuracy', 'seconds', 'compile_seconds',
        'curves'}``: the last epoch's mean training loss, the test accuracy
        with running averages, the wall time of the whole run, the part of it
        spent initialising and compiling before the first step, and
        ``curves = {'train_loss': [...], 'test_accuracy': [...]}`` per epoch.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = data
    n_devices = mesh.size
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))

    model = make_model(norm)
    tx = optax.sgd(args.lr, momentum=0.9)

    # Initialising under jit with a replicated output puts the state on every
    # device directly, and costs one compilation instead of many eager ops.
    def init(key):
        variables = model.init(key, jnp.zeros((1, *x_train.shape[1:])), train=False)
        params = variables["params"]
        return params, variables.get("batch_stats", {}), tx.init(params)

    init = jax.jit(init, out_shardings=replicated)
    state = init(jax.random.key(args.seed))

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", {})

    def train_step(state, x, y):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), loss

    def predict(params, batch_stats, x):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.argmax(logits, axis=-1)

    # The shardings say everything about the parallelism: the batch is split
    # over 'data', the training state is replicated, and XLA adds the
    # all-reduces for the gradients and for BatchNorm's batch statistics.
    def batch_spec(a, rows):
        return jax.ShapeDtypeStruct((rows, *a.shape[1:]), a.dtype, sharding=sharded)

    # Compiled ahead of time so that compilation is timed on its own.
    train_step = (
        jax.jit(
            train_step,
            in_shardings=(replicated, sharded, sharded),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        .lower(state, batch_spec(x_train, batch_size), batch_spec(y_train, batch_size))
        .compile()
    )

    # Evaluate the whole test set in one sharded call, padded to a multiple of
    # the device count; the padding's predictions are dropped.
    n_test = len(x_test)
    pad = -n_test % n_devices
    x_test_dev = jax.device_put(
        np.concatenate([x_test, np.zeros((pad, *x_test.shape[1:]), x_test.dtype)]), sharded
    )
    predict = (
        jax.jit(predict, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)
        .lower(state[0], state[1], x_test_dev)
        .compile()
    )

    def accuracy(state):
        pred = np.asarray(predict(state[0], state[1], x_test_dev))[:n_test]
        return float((pred == y_test).mean())

    compile_seconds = time.perf_counter() - start

    rng = np.random.default_rng(args.seed)
    steps = len(x_train) // batch_size
    curves: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
    for epoch in range(1, args.epochs + 1):
        # Drop the last partial batch: every step has the same shape, so one
        # compiled step serves them all and divides evenly over the devices.
        order = rng.permutation(len(x_train))[: steps * batch_size]
        losses = []
        for i in progress(range(steps), desc=f"{norm} epoch {epoch}", enabled=not args.no_progress):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = jax.device_put(x_train[idx], sharded)
            y = jax.device_put(y_train[idx], sharded)
            state, loss = train_step(state, x, y)
            # Keep at most two steps in flight. With many steps queued, XLA's
            # CPU runtime in jax 0.10 can deadlock in the all-reduce on forced
            # host devices (--cpu-devices); one step of lag still overlaps
            # host and device work.
            if losses:
                losses[-1].block_until_ready()
            losses.append(loss)
        # One host transfer per epoch, not one per step.
        train_loss = float(np.mean(jax.device_get(losses)))
        test_accuracy = accuracy(state)
        curves["train_loss"].append(train_loss)
        curves["test_accuracy"].append(test_accuracy)
        print(
            f"[{norm:>5}] epoch {epoch:3d}  train loss {train_loss:.4f}  "
            f"test accuracy {test_accuracy:.4f}",
            flush=True,
        )
    return {
        "train_loss": train_loss,
        "test_accuracy": test_accuracy,
        "seconds": time.perf_counter() - start,
        "compile_seconds": compile_seconds,
        "curves": curves,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Runs the example.

    Args:
        argv: Command-line arguments without the program name; ``None`` reads
            ``sys.argv``.

    Returns:
        For each trained normalization, the dict ``train_one`` returns:
        ``{'train_loss', 'test_accuracy', 'seconds', 'compile_seconds',
        'curves'}``, e.g. ``main(['--norm', 'flax', '--epochs', '1'])['flax']``.
    """
    started = time.perf_counter()
    args = parse_args(argv)
    if args.cpu_devices is not None:
        if "jax" in sys.modules:
            print(
                "note: jax was imported before main(); --cpu-devices only takes "
                "effect if no JAX computation has run yet",
                file=sys.stderr,
            )
        force_cpu_devices(args.cpu_devices)

    import jax
    from jax.sharding import Mesh

    devices = jax.local_devices()
    if args.cpu_devices is not None and len(devices) != args.cpu_devices:
        print(
            f"note: asked for {args.cpu_devices} CPU devices but JAX has "
            f"{len(devices)}; its backend was initialised before the flag was set",
            file=sys.stderr,
        )
    mesh = Mesh(np.array(devices), ("data",))
    n_devices = len(devices)

    data = load_data(args.seed)
    n_train = len(data[0])
    # The global batch is split evenly across devices, so it must be a
    # multiple of the device count and fit in the training set.
    batch_size = max(n_devices, round(args.batch_size / n_devices) * n_devices)
    batch_size = min(batch_size, n_train // n_devices * n_devices)
    if batch_size != args.batch_size:
        print(
            f"note: global batch size {args.batch_size} rounded to {batch_size}, "
            f"a multiple of the {n_devices} devices that fits in {n_train} "
            "training examples"
        )
    print(
        f"{n_devices} {devices[0].platform} device(s), global batch {batch_size} "
        f"({batch_size // n_devices} per device), {n_train} train / "
        f"{len(data[2])} test examples"
    )

    # The first compilation in a process also starts the backend; do that here
    # rather than inside the first model's timed run.
    jax.block_until_ready(jax.jit(lambda a: a + 1)(np.zeros(n_devices, np.float32)))

    norms = NORMS if args.norm == "all" else (args.norm,)
    results = {norm: train_one(norm, data, args, mesh, batch_size) for norm in norms}

    table = markdown_table(
        ["norm", "train loss", "test accuracy", "seconds", "compile seconds"],
        [
            [
                norm,
                r["train_loss"],
                r["test_accuracy"],
                f"{r['seconds']:.1f}",
                f"{r['compile_seconds']:.1f}",
            ]
            for norm, r in results.items()
        ],
        digits=4,
    )
    setup = (
        f"{n_devices} {devices[0].platform} device(s), global batch {batch_size}, {args.epochs} epoch(s) of SGD "
        f"(lr {args.lr:g}, momentum 0.9), seed {args.seed}; test accuracy with the running averages; seconds: "
        "wall time of the run; compile seconds: the part before the first step."
    )
    print(f"\n{setup}\n\n{table}")
    plot = plot_curves(results, args.out)
    write_report(
        args.out,
        "train_digits",
        "Digits CNN: jaxbn vs flax.linen BatchNorm vs none",
        f"{setup}\n\n{table}\n\n![curves]({plot.name})\n",
        started=started,
        argv=argv,
    )
    return results


def plot_curves(results: dict[str, dict[str, Any]], out_dir: pathlib.Path) -> pathlib.Path:
    """Plots training loss and test accuracy per epoch for each norm; returns the PNG's path."""
    plt = pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    for norm, r in results.items():
        epochs = np.arange(1, len(r["curves"]["train_loss"]) + 1)
        # jaxbn and flax train to the same numbers: dashes let both curves show.
        style = {"linestyle": "--"} if norm == "flax" else {}
        loss_axes.plot(epochs, r["curves"]["train_loss"], marker="o", label=norm, **style)
        accuracy_axes.plot(epochs, r["curves"]["test_accuracy"], marker="o", label=norm, **style)
    loss_axes.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title="training loss")
    accuracy_axes.set(
        xlabel="epoch", ylabel="test accuracy (running averages)", title="test accuracy"
    )
    loss_axes.legend()
    return save_figure(figure, out_dir, "train_digits.png")


if __name__ == "__main__":
    main()
