"""End-to-end train step of a small ResNet: jaxbn.linen, flax.linen and no norm.

Builds one Flax linen ResNet three ways, differing only in the normalization
after each convolution — ``jaxbn.linen.BatchNorm``, ``flax.linen.BatchNorm``
(default settings) or none (identity; the convolutions then have a bias) —
and times its jitted training step (optax SGD with momentum, softmax
cross-entropy on random labels, ``mutable=['batch_stats']``, the state
donated). The model is a 3x3 stem convolution, three stages of basic residual
blocks (conv3x3-BN-relu-conv3x3-BN plus the skip, which is a strided 1x1
conv+BN projection where the shape changes), a global average pool and a
Dense head.

The three variants run in one process, interleaved round-robin across
repetitions so machine noise hits all alike, after a warm-up that compiles
them; each step waits for its results. Reported: the median, min and max step
time per variant, the BN overhead (step time minus the no-norm step time, from
the medians) of jaxbn and flax, the ratio jaxbn overhead / flax overhead
(lower is better) and the step-time ratio jaxbn / flax. The overhead is a
difference of two noisy times; as a gauge of its noise, the table also gives
the quartiles of the per-repetition differences (each repetition times every
variant once, back to back).

Before timing, a guard for the benchmark itself: in float32, jaxbn and flax
must give the same loss (relative difference at most ``LOSS_RTOL``) on the
first steps from the same initial variables and batch; the second step's loss
depends on the first step's gradients, so this covers the backward pass too.

    python benchmarks/e2e.py [--batch 32] [--image-size 32] [--width 16] [--dtype float32] [--reps 20]
    python benchmarks/e2e.py --quick   # tiny model and batch, 3 reps: a smoke test
    python benchmarks/e2e.py --without-cpu-barriers   # also jaxbn without XLA:CPU's barriers
    python benchmarks/e2e.py --dtype bfloat16 --compute-dtype-barrier-views   # ... on float32 views

It runs with glibc's huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``):
when ``GLIBC_TUNABLES`` is not set it re-executes itself with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jaxbn
import jaxbn.linen
from jaxbn import stats

HUGE_PAGES = "glibc.malloc.hugetlb=1"
NORMS = {"jaxbn": jaxbn.linen.BatchNorm, "flax": nn.BatchNorm, "none": None}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CLASSES = 10
STAGES = 3
LEARNING_RATE = 0.01
SGD_MOMENTUM = 0.9
CHECK_STEPS = 2  # the loss check's steps; the timed variants run these as warm-up
WARMUP_STEPS = 3  # compile + warm-up steps per variant before timing
LOSS_RTOL = 1e-4


class Identity(nn.Module):
    """The no-normalization stand-in for a BatchNorm layer."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns ``x`` unchanged."""
        return x


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm plus the skip, then relu.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (and of the projection).
      conv: a partial of :class:`flax.linen.Conv` with everything but the
        features, kernel size and strides set.
      norm: a callable making one normalization layer.
    """

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC batch."""
        y = nn.relu(self.norm()(self.conv(self.features, (3, 3), self.strides)(x)))
        y = self.norm()(self.conv(self.features, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(self.conv(self.features, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A stem conv, :data:`STAGES` stages of basic blocks, average pool, Dense.

    Stage ``i`` has ``width * 2**i`` channels; every stage after the first
    halves the resolution in its first block.

    Attributes:
      norm: a key of :data:`NORMS`.
      width: channels of the stem and the first stage.
      blocks: basic blocks per stage.
      dtype: dtype of the activations and the computation (parameters are
        float32).
    """

    norm: str
    width: int
    blocks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits of an NHWC batch, in ``dtype``."""
        batch_norm = NORMS[self.norm]
        if batch_norm is None:
            norm = Identity
        else:
            norm = functools.partial(batch_norm, use_running_average=False, dtype=self.dtype)
        conv = functools.partial(nn.Conv, use_bias=batch_norm is None, dtype=self.dtype)
        x = nn.relu(norm()(conv(self.width, (3, 3))(x)))
        for stage in range(STAGES):
            for block in range(self.blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, strides, conv, norm)(x)
        return nn.Dense(CLASSES, dtype=self.dtype)(x.mean(axis=(1, 2)))


@dataclasses.dataclass
class Variant:
    """One variant's jitted train step and its current state, ready to time.

    Attributes:
      step: ``step(state, x, labels) -> (state, loss)``, its state donated.
      state: ``(params, batch_stats, opt_state)``.
      batch: ``(x, labels)``.
      losses: the loss of every step run so far.
    """

    step: Callable[..., Any]
    state: Any
    batch: tuple[jax.Array, jax.Array]
    losses: list[jax.Array] = dataclasses.field(default_factory=list)

    def run(self) -> None:
        """Runs one training step and waits for all its results."""
        self.state, loss = jax.block_until_ready(self.step(self.state, *self.batch))
        self.losses.append(loss)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """The jitted training step of ``model``, donating its state.

    Args:
      model: maps an NHWC batch to logits.
      tx: the optimizer.

    Returns:
      ``step((params, batch_stats, opt_state), x, labels) -> (state, loss)``.
    """

    def loss_fn(params, batch_stats, x, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()
        return loss, updates.get("batch_stats", {})

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return step


def build(norm: str, dtype: str, args: argparse.Namespace) -> tuple[Variant, dict[str, Any]]:
    """Builds one variant from a fixed key and batch; nothing runs yet.

    Args:
      norm: a key of :data:`NORMS`.
      dtype: a key of :data:`DTYPES`.
      args: the parsed command line (sizes).

    Returns:
      The variant and its initial variables (a copy: the step donates the state).
    """
    model = ResNet(norm, args.width, args.blocks, DTYPES[dtype])
    # rbg, not the default threefry: XLA:CPU compiles threefry-based initializers slowly.
    x_key, label_key, init_key = jax.random.split(jax.random.key(0, impl="rbg"), 3)
    x = jax.random.normal(x_key, (args.batch, args.image_size, args.image_size, 3), DTYPES[dtype])
    labels = jax.random.randint(label_key, (args.batch,), 0, CLASSES)
    variables = jax.jit(model.init)(init_key, x)
    tx = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    state = jax.tree.map(jnp.copy, (params, batch_stats, tx.init(params)))
    return Variant(make_train_step(model, tx), state, (x, labels)), variables


NO_BARRIERS = "jaxbn, no barriers"  # the measuring variants' names
WIDE_VIEWS = "jaxbn, wide views"


def compiled_with(variant: Variant, name: str, value: Any) -> Variant:
    """``variant`` with its step compiled while ``jaxbn.stats.<name>`` is ``value``: a measuring
    variant. The caches are cleared around the compilation, so that no other step shares its
    traces (the others compile again at their next call); the attribute is restored.
    """
    original = getattr(stats, name)
    setattr(stats, name, value)
    jax.clear_caches()
    try:
        compiled = variant.step.lower(variant.state, *variant.batch).compile()
    finally:
        setattr(stats, name, original)
        jax.clear_caches()
    return dataclasses.replace(variant, step=compiled)


def compiled_without_cpu_barriers(variant: Variant) -> Variant:
    """``variant`` compiled with ``jaxbn.stats.cpu_barrier`` the identity: what XLA:CPU's per-sum
    barriers cost or buy in this step."""
    return compiled_with(variant, "cpu_barrier", lambda *values: values)


def compiled_with_wide_barrier_views(variant: Variant) -> Variant:
    """``variant`` compiled with XLA:CPU's barriers on the compute-dtype (float32) views of a
    half-precision x and dy (``jaxbn.stats.barrier_views_in_compute_dtype``), not on x and dy
    themselves; the same step in float32."""
    return compiled_with(variant, "barrier_views_in_compute_dtype", True)


class Measuring(NamedTuple):
    """A measuring variant of jaxbn: its name in the tables, how it is compiled, its flag's help."""

    name: str
    compiled: Callable[[Variant], Variant]
    help: str


# the measuring variants, by command-line flag (kernels.py takes the same flags)
MEASURING = {
    "--without-cpu-barriers": Measuring(
        NO_BARRIERS,
        compiled_without_cpu_barriers,
        "also time jaxbn compiled without XLA:CPU's per-sum barriers (a measuring variant)",
    ),
    "--compute-dtype-barrier-views": Measuring(
        WIDE_VIEWS,
        compiled_with_wide_barrier_views,
        "also time jaxbn with XLA:CPU's barriers on the float32 views of bfloat16 x and dy "
        "(a measuring variant)",
    ),
}


def measuring_variants(args: argparse.Namespace) -> dict[str, Variant]:
    """The measuring variants of jaxbn the command line asks for, by name, each built afresh from
    the same initial state as the others."""
    return {
        measuring.name: measuring.compiled(build("jaxbn", args.dtype, args)[0])
        for flag, measuring in MEASURING.items()
        if getattr(args, flag[2:].replace("-", "_"))
    }


def loss_check(variants: dict[str, Variant], initial: dict[str, Any]) -> dict[str, Any]:
    """Runs the first :data:`CHECK_STEPS` steps of jaxbn and flax; compares losses.

    Args:
      variants: float32 ``jaxbn`` and ``flax`` variants that have not run yet.
      initial: their initial variables, by the same keys.

    Returns:
      ``{'jaxbn': [losses], 'flax': [losses], 'rel_diff': worst relative
      difference, 'same_init': bool, 'passed': bool}``; also printed.
    """
    for _ in range(CHECK_STEPS):
        for name in ("jaxbn", "flax"):
            variants[name].run()
    losses = {name: [float(loss) for loss in variants[name].losses] for name in ("jaxbn", "flax")}
    rel_diff = max(abs(a - b) / abs(b) for a, b in zip(losses["jaxbn"], losses["flax"]))
    same = jax.tree.all(
        jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), initial["jaxbn"], initial["flax"])
    )
    passed = bool(same and rel_diff <= LOSS_RTOL)
    print(f"\n## loss check: jaxbn vs flax, float32, first {CHECK_STEPS} steps, same batch")
    print(f"initial variables identical: {'yes' if same else 'NO'}")
    for name, values in losses.items():
        print(f"{name} losses: " + ", ".join(f"{value:.7f}" for value in values))
    print(
        f"worst relative difference {rel_diff:.2e} (limit {LOSS_RTOL:.0e}): {'passed' if passed else 'FAILED'}"
    )
    return {**losses, "rel_diff": rel_diff, "same_init": same, "passed": passed}


def time_round_robin(variants: dict[str, Variant], reps: int) -> dict[str, np.ndarray]:
    """Times ``reps`` training steps of each variant, interleaved.

    Repetition ``r`` steps every variant once, starting with the ``r``-th (in
    rotation), so slow phases of a shared machine hit all variants alike and
    none always runs first.

    Args:
      variants: warmed-up variants.
      reps: steps per variant.

    Returns:
      Seconds per step, ``reps`` of them per variant.
    """
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            start = time.perf_counter()
            variants[name].run()
            seconds[name].append(time.perf_counter() - start)
    return {name: np.array(value) for name, value in seconds.items()}


def summarize(
    times: dict[str, np.ndarray], variants: dict[str, Variant], reps: int
) -> dict[str, Any]:
    """Prints the timing table and the overhead ratios; returns them.

    Args:
      times: seconds per step, by variant.
      variants: the timed variants (for their last loss).
      reps: repetitions per variant.

    Returns:
      ``{'median_s', 'overhead_s', 'overhead_ratio', 'step_ratio'}``; a ratio
      is None where the flax value it divides by is not positive.
    """
    median = {name: float(np.median(value)) for name, value in times.items()}
    overhead = {name: median[name] - median["none"] for name in times if name != "none"}
    print(
        f"\n## train step: ms per step over {reps} interleaved reps; BN overhead = median - none's median; "
        "paired IQR: quartiles of (step - none's step in the same rep), a noise gauge"
    )
    print(
        f"{'norm':<18} {'median':>9} {'min':>9} {'max':>9} {'BN overhead':>12} {'paired IQR':>17} {'last loss':>10}"
    )
    for name, value in times.items():
        extra, spread = "-", "-"
        if name in overhead:
            low, high = np.percentile(value - times["none"], [25, 75]) * 1e3
            extra, spread = f"{overhead[name] * 1e3:.3f}", f"{low:.3f}..{high:.3f}"
        print(
            f"{name:<18} {median[name] * 1e3:>9.3f} {value.min() * 1e3:>9.3f} {value.max() * 1e3:>9.3f} "
            f"{extra:>12} {spread:>17} {float(variants[name].losses[-1]):>10.4f}"
        )

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    ratios = {
        name: (ratio(overhead[name], overhead["flax"]), ratio(median[name], median["flax"]))
        for name in overhead
        if name != "flax"
    }
    for name, (overhead_ratio, step_ratio) in ratios.items():
        for label, value in [
            (f"BN overhead {name} / flax (lower is better)", overhead_ratio),
            (f"step time {name} / flax", step_ratio),
        ]:
            print(
                f"{label}: "
                + (f"{value:.3f}" if value is not None else "n/a (flax value not positive)")
            )
    overhead_ratio, step_ratio = ratios["jaxbn"]
    return {
        "median_s": median,
        "overhead_s": overhead,
        "overhead_ratio": overhead_ratio,
        "step_ratio": step_ratio,
        "ratios": ratios,
    }


def print_header(args: argparse.Namespace, variables: dict[str, Any]) -> None:
    """Prints versions, device, CPUs, allocator, sizes and the command.

    Args:
      args: the parsed command line.
      variables: the jaxbn variant's initial variables (to count layers).
    """
    device = jax.devices()[0]
    bn_layers = len(jax.tree.leaves(variables["batch_stats"])) // 2  # a mean and a var each
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    widths = "/".join(str(args.width * 2**stage) for stage in range(STAGES))
    tunables = os.environ.get("GLIBC_TUNABLES")
    print("# jaxbn end-to-end benchmark: ResNet train step")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"versions: jaxbn {jaxbn.__version__}, jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}"
    )
    print(
        f"device: {device.platform} {device.device_kind} (x{jax.device_count()}), "
        f"CPUs {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})"
    )
    print(f"allocator: GLIBC_TUNABLES={tunables if tunables is not None else '(unset)'}")
    print(
        f"model: stem conv3x3, {STAGES} stages x {args.blocks} basic blocks, widths {widths}, "
        f"{bn_layers} BN layers, {params} parameters (jaxbn variant), avg pool, Dense {CLASSES}"
    )
    print(
        f"batch {args.batch}, images {args.image_size}x{args.image_size}x3, {args.dtype} activations "
        f"(float32 params), random labels; SGD lr {LEARNING_RATE} momentum {SGD_MOMENTUM}; "
        f"{WARMUP_STEPS} warm-up steps, {args.reps} interleaved reps"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line; ``--quick`` fills in tiny sizes not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, help="batch size (default 32; --quick: 4)")
    parser.add_argument(
        "--image-size", type=int, help="image height and width (default 32; --quick: 8)"
    )
    parser.add_argument(
        "--width", type=int, help="channels of the first stage (default 16; --quick: 4)"
    )
    parser.add_argument("--blocks", type=int, help="basic blocks per stage (default 2; --quick: 1)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="activations and compute"
    )
    parser.add_argument(
        "--reps", type=int, help="timed repetitions per variant (default 20; --quick: 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and batch, 3 reps: a smoke test"
    )
    for flag, measuring in MEASURING.items():
        parser.add_argument(flag, action="store_true", help=measuring.help)
    args = parser.parse_args(argv)
    defaults = {
        "batch": (32, 4),
        "image_size": (32, 8),
        "width": (16, 4),
        "blocks": (2, 1),
        "reps": (20, 3),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        elif getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark.

    Args:
      argv: command-line arguments without the program name; None reads
        ``sys.argv``.

    Returns:
      ``{'median_s': {norm: seconds}, 'overhead_s': {'jaxbn', 'flax'},
      'overhead_ratio', 'step_ratio', 'loss_check': see :func:`loss_check`}``.
    """
    args = parse_args(argv)
    built = {norm: build(norm, args.dtype, args) for norm in NORMS}
    variants = {norm: variant for norm, (variant, _) in built.items()}
    print_header(args, built["jaxbn"][1])
    if (
        args.dtype != "float32"
    ):  # the check runs float32 copies; in float32 it is part of the warm-up
        built = {norm: build(norm, "float32", args) for norm in ("jaxbn", "flax")}
    check = loss_check(
        {norm: built[norm][0] for norm in ("jaxbn", "flax")},
        {norm: built[norm][1] for norm in ("jaxbn", "flax")},
    )
    variants = {**variants, **measuring_variants(args)}
    for variant in variants.values():
        while len(variant.losses) < WARMUP_STEPS:
            variant.run()
    times = time_round_robin(variants, args.reps)
    result = summarize(times, variants, args.reps)
    if not check["passed"]:
        print(
            "loss check FAILED: the variants do not compute the same thing; the timings compare unlike work"
        )
    return {**result, "loss_check": check}


def _reexec_with_huge_pages() -> None:
    """glibc reads GLIBC_TUNABLES only at startup: set it and start again."""
    if "GLIBC_TUNABLES" not in os.environ:
        env = dict(os.environ, GLIBC_TUNABLES=HUGE_PAGES)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_huge_pages()
    sys.exit(0 if main()["loss_check"]["passed"] else 1)
