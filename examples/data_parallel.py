"""Data-parallel BatchNorm on 8 CPU devices: three ways to synchronize, and what not synchronizing costs.

A small MLP (Dense -> jaxbn BatchNorm -> GELU, twice, then a Dense head) is
trained with SGD on scikit-learn's bundled digits (64-pixel vectors, nothing
downloaded), on 8 devices: the CPU shown as 8 devices, so a laptop runs it.

1. **Three styles equal one device.** The same training (same initial
   weights, same global batches) runs on one device with the whole batch and
   data-parallel on 8 devices in the three styles of docs/multi_device.md
   ("Three ways to train data-parallel"): ``jax.jit`` over a batch sharded on a mesh
   (``BatchNorm(axis_name=None)``: jit sees the global batch and XLA inserts
   the cross-device reductions), ``jax.shard_map`` and ``jax.pmap`` (each
   device sees its shard; ``BatchNorm(axis_name='data')`` reduces the
   statistics over all devices, gradients are averaged). The table gives the
   largest difference of the final parameters and running statistics from
   the one-device run, next to a control: the one-device run with each batch
   in reverse order, the same mathematics summed in another order, which
   shows how far float32 rounding alone moves the result. (The MLP uses
   GELU: with ReLU, whose gradient jumps at 0, one pre-activation within
   rounding of 0 is enough to send two such runs ~1e-3 apart.)
2. **Per-device statistics at small per-device batches.** Under
   ``shard_map`` with ``axis_name=None`` each device's BatchNorm normalizes
   with the statistics of its own shard only (what a model written for one
   device does when it is mapped over devices unchanged). Gradients are still
   averaged over all devices, and the per-device running statistics are
   averaged after every step so that all devices keep one state. For 2, 4, 8
   and 16 examples per device (global batches of 16 to 128) and several seeds
   (initialization, split and batch order), the table and
   ``data_parallel.png`` give the test accuracy with the running averages,
   synchronized vs per-device, and of the per-device runs once
   ``jaxbn.recalibrate`` re-estimated their running statistics on the whole
   training set (is the damage in the statistics or in the weights?).

Measured on 2026-12-06 (2 shared CPU cores, 73 s): after 100 steps the
three styles are within 4.3e-7 (relative) of one device, as close as the
reversed-batch control; at 2 examples per device the test accuracy is
0.973 ± 0.004 synchronized vs 0.655 ± 0.083 per device (0.698 recalibrated:
the damage is in the weights), at 4 it is 0.979 vs 0.974, and at 8 and 16
per-device statistics are as good (8: 0.003 better, over 5 seeds).

Usage::

    python examples/data_parallel.py                 # 5 seeds, 1-3 minutes on 2 cores
    python examples/data_parallel.py --seeds 10 --per-device 2 3 4
    python examples/data_parallel.py --quick         # seconds: checks the code runs

Run as a script, it makes the CPU appear as 8 devices (``XLA_FLAGS``) before
JAX starts; imported into a process whose JAX already runs (as the tests do),
it uses the first 8 of ``jax.devices()`` and stops if there are fewer.
Training runs as ``lax.scan`` over chunks of steps: one dispatch per chunk
rather than per step, and (as in ``train_digits.py``) few steps in flight,
which XLA's CPU runtime of jax 0.10 needs on forced host devices.
``main(argv)`` returns the results as a dict.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    batch_indices,
    check_args,
    example_parser,
    force_cpu_devices,
    load_digits,
    markdown_table,
    mean_and_spread,
    progress,
    pyplot,
    save_figure,
    write_report,
)

NAME = "data_parallel"
N_DEVICES = 8
WIDTH = 128
SGD_MOMENTUM, BN_MOMENTUM = 0.9, 0.9
STYLES = ("one device", "jit", "shard_map", "pmap")
CONTROL = "one device, batches reversed"  # the rounding control of the three-styles check


def parse_args(argv: list[str] | None):
    parser = example_parser(__doc__.split("\n\n", 1)[0], NAME, seeds=5)
    parser.add_argument(
        "--per-device",
        type=int,
        nargs="+",
        default=[2, 4, 8, 16],
        help="examples per device in the synchronized vs per-device comparison",
    )
    parser.add_argument(
        "--steps", type=int, default=400, help="SGD steps per run of the comparison"
    )
    parser.add_argument(
        "--eval-every", type=int, default=25, help="steps between test evaluations (curves)"
    )
    parser.add_argument(
        "--check-steps", type=int, default=100, help="steps of the three-styles check"
    )
    parser.add_argument(
        "--check-per-device", type=int, default=8, help="examples per device in that check"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.per_device, args.steps, args.eval_every, args.seeds = [2], 20, 10, 1
        args.check_steps, args.check_per_device = (
            10,
            2,
        )  # shares the compiled shard_map step with the comparison
    if min(args.per_device) < 1 or args.check_per_device < 1:
        parser.error("examples per device must be >= 1")
    if args.eval_every < 1 or args.steps < args.eval_every or args.check_steps < 1:
        parser.error("need --steps >= --eval-every >= 1 and --check-steps >= 1")
    args.steps -= args.steps % args.eval_every  # whole chunks of --eval-every steps
    return args


def make_model(axis_name: str | None):
    """The MLP; its BatchNorms reduce statistics over ``axis_name`` (None: the examples the call sees)."""
    import flax.linen as nn

    from jaxbn.linen import BatchNorm

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            for _ in range(2):
                x = nn.Dense(WIDTH, use_bias=False)(x)  # BatchNorm's bias replaces it
                x = BatchNorm(
                    use_running_average=not train, momentum=BN_MOMENTUM, axis_name=axis_name
                )(x)
                # GELU, not ReLU: see the module docstring (runs that differ by rounding stay together).
                x = nn.gelu(x)
            return nn.Dense(10)(x)

    return MLP()


def local_loss(params, batch_stats, x, y, axis_name: str | None):
    """Mean cross-entropy over the examples this call sees, and the updated running statistics."""
    import optax

    logits, updates = make_model(axis_name).apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]


@functools.cache  # one compiled function per setting, shared by all runs with the same shapes
def make_train_chunk(style: str, lr: float, devices: tuple, synced: bool = True):
    """``train_chunk(state, xs, ys) -> (state, losses)``: ``lax.scan`` of SGD steps over ``xs`` ``(steps, batch, ...)``.

    ``state`` is ``(params, batch_stats, opt_state)``. ``pmap`` takes and
    returns everything with a leading device axis; the others take the global
    batch (``jit`` and ``shard_map``: sharded over the mesh axis ``'data'``).
    ``synced=False`` (shard_map and pmap): BatchNorm without ``axis_name``.
    """
    import jax
    import optax
    from jax import lax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # jax < 0.7
        from jax.experimental.shard_map import shard_map
    bn_axis = "data" if synced else None
    optimizer = optax.sgd(lr, momentum=SGD_MOMENTUM)

    def sgd(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if style == "pmap":

        def device_step(state, xy):
            params, batch_stats, opt_state = state
            (loss, batch_stats), grads = jax.value_and_grad(local_loss, has_aux=True)(
                params, batch_stats, *xy, bn_axis
            )
            # Each device differentiated the mean loss of its shard: the global gradient is their mean.
            loss, grads = lax.pmean((loss, grads), "data")
            if not synced:  # per-device running statistics: average them to keep one state
                batch_stats = lax.pmean(batch_stats, "data")
            params, opt_state = sgd(params, opt_state, grads)
            return (params, batch_stats, opt_state), loss

        return jax.pmap(
            lambda state, xs, ys: lax.scan(device_step, state, (xs, ys)),
            axis_name="data",
            devices=devices,
        )

    if style == "shard_map":
        mesh = Mesh(np.array(devices), ("data",))

        def per_device(params, batch_stats, x, y):
            loss, batch_stats = local_loss(params, batch_stats, x, y, bn_axis)
            if not synced:
                batch_stats = lax.pmean(batch_stats, "data")
            return lax.pmean(
                loss, "data"
            ), batch_stats  # equal shards: the mean of means is the global mean

        # Differentiated outside shard_map: JAX sums the shards' contributions to the replicated params.
        loss_fn = shard_map(
            per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    else:  # 'one device' and 'jit': the function sees the whole batch; where it lives decides the devices
        loss_fn = functools.partial(local_loss, axis_name=None)

    def step(state, xy):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, *xy
        )
        params, opt_state = sgd(params, opt_state, grads)
        return (params, batch_stats, opt_state), loss

    return jax.jit(lambda state, xs, ys: lax.scan(step, state, (xs, ys)))


def placement(style: str, devices):
    """``(state_placement, batch_placement)``: functions putting the state (replicated) and a chunk of batches."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if style == "one device":
        put = lambda tree: jax.device_put(tree, devices[0])
        return put, put
    if (
        style == "pmap"
    ):  # (devices, steps, per_device, ...): device d holds rows d*b:(d+1)*b of each batch
        copies = lambda tree: jax.tree.map(
            lambda a: np.broadcast_to(a, (len(devices), *np.shape(a))), tree
        )
        split = lambda a: np.moveaxis(a.reshape(a.shape[0], len(devices), -1, *a.shape[2:]), 1, 0)
        return copies, lambda tree: jax.tree.map(split, tree)
    mesh = Mesh(np.array(devices), ("data",))
    return (
        lambda tree: jax.device_put(tree, NamedSharding(mesh, P())),
        lambda tree: jax.device_put(tree, NamedSharding(mesh, P(None, "data"))),
    )


def train(
    style: str,
    devices,
    data,
    *,
    per_device: int,
    steps: int,
    chunk: int,
    lr: float,
    seed: int,
    synced: bool = True,
    evaluate=None,
    reverse_rows: bool = False,
) -> dict[str, Any]:
    """Trains the MLP ``steps`` steps on ``per_device * len(devices)`` examples per step.

    ``reverse_rows``: each batch in reverse order; the same mathematics (the
    loss and BatchNorm's statistics ignore the order), summed in another order.

    Returns ``{'params', 'batch_stats'}`` (host arrays), ``'losses'`` (per
    step) and ``'accuracy'``: the test accuracy with the running averages after
    every ``chunk`` steps (when ``evaluate`` is given).
    """
    import jax
    import optax

    train_chunk = make_train_chunk(style, lr, tuple(devices), synced)
    state = initial_state(optax.sgd(lr, momentum=SGD_MOMENTUM), data.x_train.shape[1], seed)
    index = batch_indices(
        np.random.default_rng(seed), len(data.x_train), per_device * len(devices), steps
    )
    host = lambda tree: jax.device_get(
        jax.tree.map(lambda a: a[0], tree) if style == "pmap" else tree
    )
    put_state, put_batches = placement(style, devices)
    state = put_state(state)
    losses, accuracy = [], []
    for start in range(0, steps, chunk):
        rows = index[start : start + chunk, ::-1] if reverse_rows else index[start : start + chunk]
        state, loss = train_chunk(state, *put_batches((data.x_train[rows], data.y_train[rows])))
        losses.append(host(loss))  # waits for the chunk: one chunk in flight at a time
        if evaluate is not None:
            accuracy.append(evaluate(host(state[:2])))
    params, batch_stats = host(state[:2])
    return {
        "params": params,
        "batch_stats": batch_stats,
        "losses": np.concatenate(losses),
        "accuracy": accuracy,
    }


@functools.cache
def _init(features: int):
    """The jitted init of the MLP: compiled once for every seed."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda key: make_model(None).init(key, jnp.zeros((2, features)), train=False))


def initial_state(optimizer, features: int, seed: int):
    """``(params, batch_stats, opt_state)`` for ``seed``, as host arrays."""
    import jax

    # rbg (XLA's RngBitGenerator) compiles several times faster than the default threefry on CPU.
    variables = jax.device_get(_init(features)(jax.random.key(seed, impl="rbg")))
    return (
        variables["params"],
        variables["batch_stats"],
        jax.device_get(optimizer.init(variables["params"])),
    )


def max_difference(a, b) -> tuple[float, float]:
    """The largest absolute difference over the arrays of two trees, and relative to the largest ``|b|`` per array."""
    import jax

    pairs = [
        (np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return (
        max(float(np.max(np.abs(u - v))) for u, v in pairs),
        max(float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30)) for u, v in pairs),
    )


def get_devices():
    """The first 8 devices; forces 8 CPU devices first when JAX has not started yet."""
    if "jax" not in sys.modules:
        force_cpu_devices(N_DEVICES)
    import jax

    devices = jax.devices()
    if len(devices) < N_DEVICES:
        raise RuntimeError(
            f"{NAME} needs {N_DEVICES} devices, JAX has {len(devices)}: run it as a script (it then sets "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES}), or set that flag and "
            "JAX_PLATFORMS=cpu before JAX starts."
        )
    return devices[:N_DEVICES]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs both parts; returns ``{'check': {style: {...}}, 'sweep': {(per_device, synced): {...}}, 'steps'}``.

    ``check[style]`` has ``'params_diff'`` and ``'stats_diff'`` (largest
    absolute difference from the one-device run), ``'loss'`` (last step) and
    ``'accuracy'``; ``sweep[(b, synced)]`` has ``'accuracy'`` (final test
    accuracy per seed) and ``'curves'`` (seeds x evaluations).
    """
    started = time.perf_counter()
    args = parse_args(argv)
    devices = get_devices()
    import jax
    import jax.numpy as jnp

    show = not args.no_progress
    eval_model = make_model(None)
    predict = jax.jit(
        lambda variables, x: jnp.argmax(eval_model.apply(variables, x, train=False), -1)
    )

    def evaluator(data):
        return lambda v: float(
            np.mean(
                np.asarray(predict({"params": v[0], "batch_stats": v[1]}, data.x_test))
                == data.y_test
            )
        )

    print(f"{len(devices)} {devices[0].platform} devices")

    # 1. The three styles against one device, and one device against itself with each batch reversed:
    # the same mathematics in another summation order shows how far float32 rounding alone goes.
    data = load_digits(0)
    check = {}
    for style in progress([*STYLES, CONTROL], desc="styles", enabled=show):
        run = train(
            "one device" if style == CONTROL else style,
            devices,
            data,
            per_device=args.check_per_device,
            steps=args.check_steps,
            chunk=min(args.check_steps, args.eval_every),
            lr=args.lr,
            seed=0,
            reverse_rows=style == CONTROL,
        )
        run["accuracy"] = evaluator(data)((run["params"], run["batch_stats"]))
        check[style] = run
    reference = check["one device"]
    check_rows = []
    for style, run in check.items():
        run["params_diff"], run["params_rel"] = max_difference(run["params"], reference["params"])
        run["stats_diff"], run["stats_rel"] = max_difference(
            run["batch_stats"], reference["batch_stats"]
        )
        run["loss"] = float(run["losses"][-1])
        axis = {"jit": "None", "shard_map": "'data'", "pmap": "'data'"}.get(style, "-")
        check_rows.append(
            [
                style,
                axis,
                f"{run['params_diff']:.1e} ({run['params_rel']:.1e})",
                f"{run['stats_diff']:.1e} ({run['stats_rel']:.1e})",
                f"{run['loss']:.4f}",
                f"{run['accuracy']:.3f}",
            ]
        )
    check_table = markdown_table(
        [
            "style",
            "BatchNorm axis_name",
            "max abs diff, params (relative)",
            "max abs diff, running stats (relative)",
            "last loss",
            "test accuracy",
        ],
        check_rows,
    )
    print(
        f"\n{args.check_steps} steps, global batch {args.check_per_device * len(devices)}, "
        "differences from the one-device run:"
    )
    print(check_table)

    # 2. Synchronized vs per-device statistics (shard_map), several seeds.
    import jaxbn

    settings = [(b, synced) for b in args.per_device for synced in (True, False)]
    splits = {seed: load_digits(seed) for seed in range(args.seeds)}
    sweep = {key: {"accuracy": [], "curves": [], "recalibrated": []} for key in settings}
    runs = [(key, seed) for key in settings for seed in range(args.seeds)]
    for (b, synced), seed in progress(runs, desc="synced vs per-device", enabled=show):
        data = splits[seed]
        run = train(
            "shard_map",
            devices,
            data,
            per_device=b,
            steps=args.steps,
            chunk=args.eval_every,
            lr=args.lr,
            seed=seed,
            synced=synced,
            evaluate=evaluator(data),
        )
        sweep[b, synced]["curves"].append(run["accuracy"])
        sweep[b, synced]["accuracy"].append(run["accuracy"][-1])
        if (
            not synced
        ):  # are the running statistics to blame? Re-estimate them from the whole training set
            variables = {"params": run["params"], "batch_stats": run["batch_stats"]}
            variables = jaxbn.recalibrate(
                eval_model, variables, [data.x_train], train=False, progress=False
            )
            sweep[b, synced]["recalibrated"].append(
                evaluator(data)((variables["params"], variables["batch_stats"]))
            )

    sweep_rows, gaps = [], {}
    for b in args.per_device:
        synced, unsynced = (np.asarray(sweep[b, s]["accuracy"]) for s in (True, False))
        gaps[b] = synced - unsynced  # paired by seed
        sweep_rows.append(
            [
                b,
                b * len(devices),
                mean_and_spread(synced),
                mean_and_spread(unsynced),
                mean_and_spread(sweep[b, False]["recalibrated"]),
                mean_and_spread(gaps[b]),
            ]
        )
    sweep_table = markdown_table(
        [
            "per device",
            "global batch",
            "synchronized",
            "per-device",
            "per-device, recalibrated",
            "synchronized - per-device",
        ],
        sweep_rows,
    )
    print(f"\ntest accuracy after {args.steps} steps, mean ± std over {args.seeds} seed(s):")
    print(sweep_table)

    figure = plot(args, sweep, len(devices))
    path = save_figure(figure, args.out, f"{NAME}.png")
    body = "\n\n".join(
        [
            f"### Three styles vs one device\n\n{args.check_steps} steps of SGD, global batch "
            f"{args.check_per_device * len(devices)} ({args.check_per_device} per device), seed 0; relative: the "
            "difference over the largest magnitude of the array; the last row is the rounding control, one device "
            f"with the rows of each batch reversed.\n\n{check_table}",
            f"### Synchronized vs per-device statistics\n\nshard_map on {len(devices)} devices, {args.steps} steps, "
            f"lr {args.lr}; test accuracy with the running averages, mean ± std over {args.seeds} seed(s) (seeds "
            "change the split, the initialization and the batch order); recalibrated: the per-device run's running "
            "statistics re-estimated on the whole training set with `jaxbn.recalibrate`; the difference is paired "
            f"by seed.\n\n{sweep_table}",
            f"![test accuracy, synchronized vs per-device statistics]({path.name})",
            "### What this shows\n\n" + findings(args, check, gaps, sweep),
        ]
    )
    report = write_report(
        args.out, NAME, "Data-parallel BatchNorm on 8 CPU devices", body, started=started, argv=argv
    )
    return {
        "check": {
            style: {
                k: run[k]
                for k in (
                    "params_diff",
                    "params_rel",
                    "stats_diff",
                    "stats_rel",
                    "loss",
                    "accuracy",
                )
            }
            for style, run in check.items()
        },
        "sweep": sweep,
        "steps": args.steps,
        "figure": path,
        "report": report,
    }


def findings(args, check, gaps, sweep) -> str:
    """The 'What this shows' paragraph, worded from the measured numbers."""
    worst = max(max(check[style]["params_rel"], check[style]["stats_rel"]) for style in STYLES)
    control = max(check[CONTROL]["params_rel"], check[CONTROL]["stats_rel"])
    losses = [check[style]["loss"] for style in [*STYLES, CONTROL]]
    parts, significant_loss = [], set()
    if worst <= max(10 * control, 1e-5):
        parts.append(
            f"After {args.check_steps} steps the three data-parallel styles are within {worst:.1e} "
            "(relative) of the one-device run, parameters and running statistics, where the one-device "
            f"run itself moves by {control:.1e} when each batch is summed in reverse order: the "
            f"differences are float32 rounding (the last losses agree to {max(losses) - min(losses):.1e})."
        )
    else:
        parts.append(
            f"After {args.check_steps} steps the three styles differ from the one-device run by up to "
            f"{worst:.1e} (relative), more than ten times the {control:.1e} that reversing each batch "
            "gives on one device: more than float32 rounding explains."
        )
    if args.seeds < 2:
        parts.append(
            "With one seed there is no spread to judge the synchronized vs per-device differences by."
        )
    else:
        better, worse, unclear = [], [], []
        for b, gap in gaps.items():
            error = gap.std(ddof=1) / np.sqrt(len(gap))
            group = (
                better if gap.mean() > 2 * error else worse if gap.mean() < -2 * error else unclear
            )
            group.append(f"{b} ({gap.mean():+.3f})")
            if group is better:
                significant_loss.add(b)
        if better:
            parts.append(
                "Synchronized statistics give a higher test accuracy than per-device ones, by more "
                "than twice the standard error over seeds, at "
                + ", ".join(better)
                + " examples per device."
            )
        if unclear:
            parts.append(
                "At "
                + ", ".join(unclear)
                + " examples per device the difference is within twice the "
                f"standard error over {args.seeds} seeds: per-device statistics cost nothing measurable "
                "there."
            )
        if worse:
            parts.append(
                "At "
                + ", ".join(worse)
                + " examples per device per-device statistics give the higher "
                "accuracy, by more than twice the standard error: there the claim is reversed."
            )
    small = min(args.per_device)
    plain, synced = (
        np.mean(sweep[small, False]["accuracy"]),
        np.mean(sweep[small, True]["accuracy"]),
    )
    recalibrated = np.mean(sweep[small, False]["recalibrated"])
    parts.append(
        f"At {small} examples per device the per-device runs reach {plain:.3f} test accuracy on average, "
        f"the synchronized ones {synced:.3f}; re-estimating the per-device runs' running statistics "
        f"on the whole training set gives {recalibrated:.3f}."
    )
    if small in significant_loss:
        parts.append(
            "Most of the lost accuracy comes back: it lay in the running statistics."
            if recalibrated - plain > (synced - plain) / 2
            else "So the lost accuracy lies in the weights trained with per-device statistics, not in the "
            "running statistics alone."
        )
    return " ".join(parts)


def plot(args, sweep, n_devices: int):
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for synced, key, label, marker in (
        (True, "accuracy", "synchronized (axis_name='data')", "o"),
        (False, "accuracy", "per device", "s"),
        (False, "recalibrated", "per device, recalibrated", "^"),
    ):
        acc = np.array([sweep[b, synced][key] for b in args.per_device])
        left.errorbar(
            args.per_device,
            acc.mean(1),
            yerr=acc.std(1),
            marker=marker,
            capsize=3,
            label=label,
            linestyle=":" if key == "recalibrated" else "-",
        )
    left.set_xscale("log", base=2)
    left.set_xticks(args.per_device, [str(b) for b in args.per_device])
    left.set_xlabel(f"examples per device ({n_devices} devices)")
    left.set_ylabel("test accuracy (running averages)")
    left.set_title(f"after {args.steps} steps, mean ± std over {args.seeds} seed(s)")
    left.legend()
    steps = np.arange(1, args.steps // args.eval_every + 1) * args.eval_every
    for b, color in zip(sorted({min(args.per_device), max(args.per_device)}), ("C3", "C0")):
        for synced, style in ((True, "-"), (False, "--")):
            curves = np.asarray(sweep[b, synced]["curves"])
            label = f"{b}/device, {'synchronized' if synced else 'per device'}"
            right.plot(steps, curves.mean(0), style, color=color, label=label)
            right.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15)
    right.set_xlabel("step")
    right.set_ylabel("test accuracy (running averages)")
    right.set_title("during training (band: min-max over seeds)")
    right.legend()
    return figure


if __name__ == "__main__":
    main()
