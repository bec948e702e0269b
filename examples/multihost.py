"""Data-parallel BatchNorm training that runs unchanged on one or several processes.

A small Flax model (Dense -> jaxbn BatchNorm -> relu -> Dense) is trained
with optax SGD on a global batch that is sharded over every device of every
process. The same training code runs in four styles, and each must give the
same parameters and running statistics as one process on the same global batch:

- ``jit``: ``jax.jit`` over global arrays sharded with ``NamedSharding(mesh,
  P('data'))`` on a mesh of ``jax.devices()`` (all processes' devices), its
  axes Auto (``jax.sharding.Mesh``). BatchNorm gets ``axis_name=None``; XLA
  inserts the cross-host reductions.
- ``jit_explicit``: the same on a mesh of explicit axes (``jax.make_mesh``'s
  default: sharding in types). jaxbn reads the split batch from the types:
  each device's statistics, one all-gather across hosts.
- ``shard_map``: the loss runs per shard under ``jax.shard_map`` on that mesh
  with ``BatchNorm(axis_name='data')``.
- ``pmap``: ``jax.pmap(..., axis_name='data')``; each process feeds its
  *local* devices, and the collectives span all devices of all processes.

Each process builds its part of the global batch (here: its rows of a
deterministic global batch; in real use, its own data loader) and turns it
into a global array with ``jax.make_array_from_process_local_data``. With
``--valid`` some examples are padding (``mask=False``): the processes then hold
different numbers of valid examples, and jaxbn's count-weighted statistics are
still exactly those of all valid examples together.

Usage::

    python examples/multihost.py                  # one process, its local devices
    python examples/multihost.py --launch 2       # 2 local processes x 4 CPU devices
    python examples/multihost.py --launch 3 --valid 16,9,3   # uneven valid counts

``--launch N`` starts N copies of this script on 127.0.0.1 (each with
``--cpu-devices 4``), waits for them, and prints each process's results and
whether they agree with each other. A copy started by hand is one process of
a multi-process run::

    python examples/multihost.py --coordinator HOST:PORT --num-processes N --process-id K

On a GPU cluster run that on every host (same HOST:PORT, the address of
process 0; K = 0..N-1). On Cloud TPU, SLURM or Open MPI, pass ``--auto``
instead: ``jax.distributed.initialize()`` then detects all three itself. Only
these arguments change; the training code is the same.

Options: ``--steps`` (3), ``--batch`` (global batch, 48; a multiple of the
number of devices), ``--valid`` (comma-separated numbers of valid examples in
each of ``len(valid)`` equal blocks of the global batch; with one block per
process, process k holds ``valid[k]``), ``--modes``, ``--seed``, ``--quick``
(2 steps), and ``--out DIR``: a one-process run or ``--launch`` writes its
report, ``multihost.md`` (the losses of every process and mode, and whether
they agree), there, and each process of a multi-process run started by hand
writes ``DIR/process_K.npz``. The default ``DIR`` is a folder of the system's
temporary directory (printed); ``--update-committed`` writes the report to
``examples/figures`` (``examples/figures/quick`` with ``--quick``).
``--no-progress`` is accepted like in the other examples (there are no
progress bars here). ``main(argv)`` returns the results as a dict ``{mode:
{name: array}}`` (with ``--launch``, a list of them, one per process).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_args, example_parser, force_cpu_devices, markdown_table, write_report  # noqa: E402

NAME = "multihost"
MODES = ("jit", "jit_explicit", "shard_map", "pmap")
FEATURES, HIDDEN = 8, 16
LEARNING_RATE, SGD_MOMENTUM, BN_MOMENTUM = 0.1, 0.9, 0.9
PADDING = 1e3  # the value of invalid examples: it must not reach the statistics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses command-line arguments (``None`` reads ``sys.argv``)."""
    # --quick, --out, --update-committed, --no-progress; no --seeds: every process and mode must agree on one seed.
    parser = example_parser(__doc__.split("\n\n", 1)[0], NAME, seeds=None)
    parser.add_argument(
        "--launch", type=int, metavar="N", help="start N local processes on 127.0.0.1"
    )
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument(
        "--auto",
        action="store_true",
        help="jax.distributed.initialize() without arguments (Cloud TPU, SLURM, Open MPI)",
    )
    parser.add_argument("--cpu-devices", type=int, help="make the CPU appear as this many devices")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=48, help="global batch size")
    parser.add_argument("--valid", help="valid examples per block of the global batch, e.g. 16,9,3")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds --launch waits")
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.steps = 2
    args.modes = tuple(args.modes.split(","))
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes must be a subset of {MODES}, got {args.modes}")
    if args.valid is not None:
        args.valid = tuple(int(v) for v in args.valid.split(","))
        block = args.batch // len(args.valid)
        if args.batch % len(args.valid) or not all(0 <= v <= block for v in args.valid):
            parser.error(
                f"--valid {args.valid}: {len(args.valid)} blocks of the batch {args.batch} "
                f"must be equal and each count in [0, {block}]"
            )
    if args.launch is not None and args.launch < 1:
        parser.error(f"--launch must be >= 1, got {args.launch}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.num_processes > 1 and not args.coordinator:
        parser.error("--num-processes > 1 needs --coordinator HOST:PORT (or use --auto)")
    return args


# ----------------------------------------------------------------------------
# Data: a deterministic global batch; each process takes its rows.


def global_batch(step: int, batch: int, valid: tuple[int, ...] | None, seed: int):
    """The global batch of ``step``: ``x (batch, FEATURES)``, ``y (batch,)``, ``mask (batch,) or None``.

    Examples are offset along the batch (row i by ``3 i / batch``), so every
    process's rows have a different mean and averaging per-process means
    would give wrong statistics. Invalid rows hold ``PADDING``.
    """
    rng = np.random.default_rng([seed, step])
    offsets = 3.0 * np.arange(batch) / batch
    x = rng.normal(size=(batch, FEATURES)) + offsets[:, None]
    w = np.random.default_rng(seed).normal(size=FEATURES)  # the same target weights every step
    y = np.tanh(x - offsets[:, None]) @ w + 0.1 * rng.normal(size=batch)
    mask = None
    if valid is not None:
        block = batch // len(valid)
        mask = np.concatenate([np.arange(block) < v for v in valid])
        x = np.where(mask[:, None], x, PADDING)
        y = np.where(mask, y, 0.0)
    return x.astype(np.float32), y.astype(np.float32), mask


# ----------------------------------------------------------------------------
# The model and the training step, written once for every mode.


@functools.cache
def make_model(axis_name: str | None):
    """Dense -> jaxbn BatchNorm -> relu -> Dense, reducing statistics over ``axis_name``."""
    import flax.linen as nn

    import jaxbn.linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, mask, train: bool):
            h = nn.Dense(HIDDEN, use_bias=False)(x)  # BatchNorm's bias replaces it
            h = jaxbn.linen.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, axis_name=axis_name
            )(h, mask=None if mask is None else mask[:, None])
            return nn.Dense(1)(nn.relu(h))[:, 0]

    return Net()


def local_loss(params, batch_stats, x, y, mask, *, axis_name: str | None):
    """Squared error summed over this shard's valid examples / the global count.

    Summed over shards (``psum``; under plain ``jit`` the shard is the global
    batch) it is the mean over all valid examples. Returns ``(loss, new batch_stats)``.
    """
    import jax
    import jax.numpy as jnp

    pred, updates = make_model(axis_name).apply(
        {"params": params, "batch_stats": batch_stats}, x, mask, train=True, mutable=["batch_stats"]
    )
    err = jnp.square(pred - y)
    if mask is None:
        total, count = err.sum(), jnp.asarray(err.size, jnp.float32)
    else:
        total, count = jnp.where(mask, err, 0).sum(), mask.sum(dtype=jnp.float32)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)  # the global count (no gradient flows through it)
    return total / jnp.maximum(count, 1), updates["batch_stats"]


def make_step(mode: str, mesh, optimizer):
    """``(params, batch_stats, opt_state, x, y, mask) -> (same, loss)`` for ``mode``.

    ``jit`` and ``shard_map`` take global arrays; ``pmap`` takes this
    process's rows split over its local devices, and the per-device copies of
    the state it returns.
    """
    import jax
    import optax
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # jax < 0.7
        from jax.experimental.shard_map import shard_map

    def apply_update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if mode == "pmap":

        def device_step(params, batch_stats, opt_state, x, y, mask):
            grad_fn = jax.value_and_grad(
                functools.partial(local_loss, axis_name="data"), has_aux=True
            )
            (loss, batch_stats), grads = grad_fn(params, batch_stats, x, y, mask)
            # Each device differentiated its own share of the loss: the
            # gradient of the global loss is their sum.
            loss, grads = jax.lax.psum((loss, grads), "data")
            params, opt_state = apply_update(params, opt_state, grads)
            return params, batch_stats, opt_state, loss

        return jax.pmap(device_step, axis_name="data")

    if mode == "shard_map":
        batch_spec = P("data")

        def global_loss(params, batch_stats, x, y, mask):
            def shard_loss(params, batch_stats, x, y, mask):
                loss, batch_stats = local_loss(params, batch_stats, x, y, mask, axis_name="data")
                return jax.lax.psum(loss, "data"), batch_stats

            return shard_map(
                shard_loss,
                mesh=mesh,
                in_specs=(P(), P(), batch_spec, batch_spec, batch_spec),
                out_specs=(P(), P()),
            )(params, batch_stats, x, y, mask)
    else:  # jit, jit_explicit: the global batch, axis_name=None (across devices and hosts: XLA's
        # reductions, or on explicit axes each device's statistics and one all-gather)
        global_loss = functools.partial(local_loss, axis_name=None)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, mask):
        (loss, batch_stats), grads = jax.value_and_grad(global_loss, has_aux=True)(
            params, batch_stats, x, y, mask
        )
        params, opt_state = apply_update(params, opt_state, grads)
        return params, batch_stats, opt_state, loss

    return step


def init_variables(batch: int, valid, seed: int) -> dict:
    """The model's initial ``{'params', 'batch_stats'}``, the same on every process (same key)."""
    import jax

    x, _, mask = global_batch(0, batch, valid, seed)
    return make_model(None).init(
        jax.random.key(seed), x[:2], None if mask is None else mask[:2], train=False
    )


def process_rows(sharding, batch: int) -> slice:
    """The rows of the global batch that this process's devices hold under ``sharding``."""
    indices = sharding.addressable_devices_indices_map((batch,)).values()
    rows = sorted({index[0].indices(batch)[:2] for index in indices})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's devices hold non-contiguous rows {rows}")
    return slice(start, stop)


def train(
    mode: str, *, steps: int, batch: int, valid, seed: int, devices=None
) -> dict[str, np.ndarray]:
    """Trains ``steps`` steps in ``mode`` on ``devices`` (default: every device of every process).

    Returns:
      ``{'loss': (steps,), 'params/...': ..., 'batch_stats/...': ...,
      'step1_batch_stats/...': ...}`` as NumPy arrays (identical on every
      process), the last being the running statistics after the first step.
    """
    import jax
    import optax
    from flax import traverse_util
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices() if devices is None else list(devices)
    if batch % len(devices):
        raise ValueError(
            f"--batch {batch} must be a multiple of the number of devices, {len(devices)}"
        )
    if mode == "jit_explicit":  # (sharding in types)
        mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    else:  # (Auto axes)
        mesh = Mesh(np.array(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rows = process_rows(sharded, batch)

    variables = init_variables(batch, valid, seed)
    optimizer = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    step_fn = make_step(mode, mesh, optimizer)

    local_devices = [d for d in devices if d.process_index == jax.process_index()]
    if mode == "pmap":
        if len(local_devices) != jax.local_device_count() or len(devices) != jax.device_count():
            raise ValueError("pmap mode runs on all devices")
        # One copy of the state per local device (a host array with a leading axis).
        state = jax.tree.map(
            lambda a: np.broadcast_to(np.asarray(a), (len(local_devices),) + np.shape(a)), state
        )
    else:
        state = jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)), state
        )

    def to_numpy(tree):
        # This process's first copy: the state is replicated (identical on every device).
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)

    losses, step1 = [], None
    for i in range(steps):
        x, y, mask = (None if a is None else a[rows] for a in global_batch(i, batch, valid, seed))
        if mode == "pmap":
            per_device = lambda a: (
                None if a is None else a.reshape((len(local_devices), -1) + a.shape[1:])
            )
            inputs = [per_device(a) for a in (x, y, mask)]
        else:
            inputs = [
                None
                if a is None
                else jax.make_array_from_process_local_data(sharded, a, (batch,) + a.shape[1:])
                for a in (x, y, mask)
            ]
        *state, loss = step_fn(*state, *inputs)
        losses.append(float(to_numpy(loss).ravel()[0]))
        if i == 0:
            step1 = to_numpy(state[1])

    params, batch_stats, _ = to_numpy(state)
    if mode == "pmap":
        params, batch_stats, step1 = (
            jax.tree.map(lambda a: a[0], t) for t in (params, batch_stats, step1)
        )
    out = {"loss": np.asarray(losses, np.float32)}
    for prefix, tree in (
        ("params", params),
        ("batch_stats", batch_stats),
        ("step1_batch_stats", step1),
    ):
        for key, value in traverse_util.flatten_dict(tree, sep="/").items():
            out[f"{prefix}/{key}"] = np.asarray(value)
    return out


# ----------------------------------------------------------------------------
# One process of a run, and the local launcher.


def run_process(args: argparse.Namespace) -> dict[str, dict[str, np.ndarray]]:
    """Initialises ``jax.distributed`` if asked, trains every mode; a multi-process run writes OUT/process_K.npz."""
    if args.cpu_devices is not None:
        force_cpu_devices(args.cpu_devices)
    import jax

    distributed = args.auto or args.num_processes > 1
    if distributed:
        # Cross-process collectives on CPU (the default already in recent jax;
        # GPUs and TPUs use their own interconnect and ignore it).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.auto:
            jax.distributed.initialize()
        else:
            host = args.coordinator.rsplit(":", 1)[0]
            jax.distributed.initialize(
                coordinator_address=args.coordinator,
                num_processes=args.num_processes,
                process_id=args.process_id,
                # A local run listens on loopback only (the default is every interface).
                coordinator_bind_address=args.coordinator
                if host in ("127.0.0.1", "localhost")
                else None,
            )
    try:
        print(
            f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
            f"{jax.device_count()} global {jax.devices()[0].platform} devices",
            flush=True,
        )
        results = {
            mode: train(mode, steps=args.steps, batch=args.batch, valid=args.valid, seed=args.seed)
            for mode in args.modes
        }
        for mode, result in results.items():
            print(
                f"process {jax.process_index()} {mode:12s} losses "
                + " ".join(f"{v:.6f}" for v in result["loss"]),
                flush=True,
            )
        if (
            distributed
        ):  # how the launcher (or a user of a cluster run) collects each process's results
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"process_{jax.process_index()}.npz")
            np.savez(
                path,
                **{
                    f"{mode}:{key}": value
                    for mode, result in results.items()
                    for key, value in result.items()
                },
            )
            print(f"process {jax.process_index()} wrote {path}", flush=True)
    finally:
        if distributed:
            jax.distributed.shutdown()
    return results


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_results(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Reads a ``process_K.npz`` back into ``{mode: {name: array}}``."""
    results: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            mode, name = key.split(":", 1)
            results.setdefault(mode, {})[name] = data[key]
    return results


def launch(
    num_processes: int, argv: list[str], out: str, *, cpu_devices: int = 4, timeout: float = 120.0
) -> list[dict[str, dict[str, np.ndarray]]]:
    """Runs this script as ``num_processes`` processes on 127.0.0.1 and returns their results.

    Each child gets ``cpu_devices`` forced CPU devices (its own ``XLA_FLAGS``
    and ``JAX_PLATFORMS=cpu``, set before it imports jax), its own process
    group, and stdout/stderr files in ``out``. On a failure or after
    ``timeout`` seconds every child's process group is killed and a
    ``RuntimeError`` shows the children's exit codes and stderr; nothing is
    left running either way.
    """
    port = free_port()
    env = dict(os.environ)
    flag = "--xla_force_host_platform_device_count"
    env["XLA_FLAGS"] = " ".join(
        [
            *(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(flag)),
            f"{flag}={cpu_devices}",
        ]
    )
    env["JAX_PLATFORMS"] = "cpu"
    procs, logs = [], []
    try:
        for k in range(num_processes):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *argv,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(num_processes),
                "--process-id",
                str(k),
                "--out",
                out,
            ]
            stdout, stderr = (
                open(os.path.join(out, f"process_{k}.{s}"), "w") for s in ("out", "err")
            )
            logs += [stdout, stderr]
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(
                    p.pid, signal.SIGKILL
                )  # the child's own group: it and anything it started
            p.wait()
        for f in logs:
            f.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        report = [
            f"{num_processes} processes (pids {[p.pid for p in procs]}) on 127.0.0.1:{port}, exit codes {codes} "
            f"(negative: killed by that signal, after {timeout:.0f} s or a sibling's failure)"
        ]
        for k in range(num_processes):
            with open(os.path.join(out, f"process_{k}.err")) as f:
                report.append(f"--- process {k} stderr (tail) ---\n" + f.read()[-4000:])
        raise RuntimeError("\n".join(report))
    return [load_results(os.path.join(out, f"process_{k}.npz")) for k in range(num_processes)]


def compare(results: list[dict[str, dict[str, np.ndarray]]], rtol: float = 1e-6) -> list[str]:
    """Every (mode, process) result against the first one; returns the differences found.

    Arrays agree within ``rtol`` relative to each element or, for elements
    near 0, to the larger of 1 and the array's largest magnitude (float32 sums
    taken in another order differ by ~1e-7 of that).
    """
    problems = []
    reference = results[0][next(iter(results[0]))]
    for k, per_mode in enumerate(results):
        for mode, result in per_mode.items():
            for key, expected in reference.items():
                atol = rtol * max(1.0, np.max(np.abs(expected)))
                if not np.allclose(result[key], expected, rtol=rtol, atol=atol):
                    err = np.max(np.abs(result[key] - expected))
                    problems.append(f"process {k} {mode} {key}: max abs difference {err:.3g}")
    return problems


def largest_difference(results: list[dict[str, dict[str, np.ndarray]]]) -> float:
    """The largest difference of any (process, mode) result from the first, over max(1, the array's magnitude)."""
    reference = results[0][next(iter(results[0]))]
    return max(
        float(np.max(np.abs(result[key] - expected))) / max(1.0, float(np.max(np.abs(expected))))
        for per_mode in results
        for result in per_mode.values()
        for key, expected in reference.items()
    )


def report(
    args: argparse.Namespace,
    results: list[dict[str, dict[str, np.ndarray]]],
    devices: str,
    problems: list[str],
    started: float,
    argv: list[str] | None,
) -> None:
    """Writes ``multihost.md`` to ``args.out``: the setup, every process's and mode's losses, and the verdict."""
    valid = (
        "" if args.valid is None else f", valid examples per block {','.join(map(str, args.valid))}"
    )
    setup = (
        f"{len(results)} process(es), {devices}; global batch {args.batch}{valid}; {args.steps} SGD steps "
        f"(lr {LEARNING_RATE}, momentum {SGD_MOMENTUM}), BatchNorm momentum {BN_MOMENTUM}, seed {args.seed}."
    )
    table = markdown_table(
        ["process", "mode", *(f"loss, step {i + 1}" for i in range(args.steps))],
        [
            [k, mode, *(f"{v:.6f}" for v in result["loss"])]
            for k, per_mode in enumerate(results)
            for mode, result in per_mode.items()
        ],
    )
    first = results[0][args.modes[0]]
    stats = markdown_table(
        ["running statistic", "values"],
        [
            [
                key.removeprefix("batch_stats/"),
                np.array2string(first[key], precision=4, max_line_width=10**6),
            ]
            for key in sorted(first)
            if key.startswith("batch_stats/")
        ],
    )
    verdict = (
        f"Every process and mode ends with the same losses, parameters and running statistics: the largest "
        f"difference from process 0's {args.modes[0]} run is {largest_difference(results):.1e} of the "
        "array's magnitude (at least 1), within float32 rounding (rtol 1e-6)."
        if not problems
        else "The processes or modes DISAGREE beyond rtol 1e-6:\n\n"
        + "\n".join(f"- {p}" for p in problems)
    )
    body = (
        f"{setup}\n\n{table}\n\nRunning statistics after the last step (process 0, {args.modes[0]}):\n\n"
        f"{stats}\n\n**What this shows.** {verdict}\n"
    )
    write_report(
        args.out,
        NAME,
        "Data-parallel BatchNorm on one or several processes",
        body,
        started=started,
        argv=argv,
    )


def strip_options(
    argv: list[str], with_value: tuple[str, ...], flags: tuple[str, ...]
) -> list[str]:
    """``argv`` without the options ``with_value`` (``--opt V`` or ``--opt=V``) and the ``flags``."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in with_value:
            skip = True
        elif a not in flags and not any(a.startswith(f"{o}=") for o in with_value):
            kept.append(a)
    return kept


def main(argv: list[str] | None = None) -> Any:
    """Runs one process (the default) or, with ``--launch N``, N local processes; writes the report of either."""
    started = time.perf_counter()
    args = parse_args(argv)
    if args.launch is None:
        results = run_process(args)
        if not (
            args.auto or args.num_processes > 1
        ):  # a process of a multi-process run leaves process_K.npz
            import jax

            problems = compare([results])
            print("all modes agree" if not problems else "DISAGREE:\n" + "\n".join(problems))
            report(
                args,
                [results],
                f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
                problems,
                started,
                argv,
            )
        return results
    full_argv = list(sys.argv[1:] if argv is None else argv)
    # The children take the same options, less --launch N and where the results go (launch passes --out).
    child_argv = strip_options(full_argv, ("--launch", "--out"), ("--update-committed",))
    cpu_devices = 4
    with tempfile.TemporaryDirectory() as out:
        results = launch(
            args.launch, child_argv, out, cpu_devices=cpu_devices, timeout=args.timeout
        )
        for k in range(args.launch):
            with open(os.path.join(out, f"process_{k}.out")) as f:
                print(f.read(), end="")
    first = results[0][args.modes[0]]
    for key in sorted(first):
        if key.startswith("batch_stats/"):
            print(f"{key}: {np.array2string(first[key], precision=4, max_line_width=120)}")
    problems = compare(results)
    print("all processes and modes agree" if not problems else "DISAGREE:\n" + "\n".join(problems))
    report(args, results, f"{cpu_devices} cpu devices each", problems, started, argv)
    return results


if __name__ == "__main__":
    main()
