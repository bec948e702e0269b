"""Compile-time and eager cost of jaxbn beside flax: a ResNet-50 train step, and single layers called eagerly.

Compile cost. One ResNet-50-shaped model (a 7x7/2 stem convolution, BatchNorm,
relu and a 3x3/2 max pool; four stages of bottleneck blocks, 3-4-6-3 of them,
each conv1x1-BN-relu-conv3x3-BN-relu-conv1x1-BN plus the skip, a strided 1x1
conv+BN projection where the shape changes; a global average pool and a Dense
head: 53 BatchNorms) is written twice, in flax.linen and in flax.nnx, and each
is built twice: with jaxbn's BatchNorm and with flax's (same fields:
``use_running_average=False``, ``momentum=0.9``). Its training step — softmax
cross-entropy on random labels, SGD (``optax.sgd``, learning rate 0.1), the
running statistics updated (linen: ``mutable=['batch_stats']``; nnx: the
module merged from its split state inside the step, ``nnx.value_and_grad``,
the updated ``BatchStat`` state returned) — is jitted with a fresh
``jax.jit`` of a fresh function in every repetition, after
``jax.clear_caches()``, so nothing is cached. Timed (wall clock, after a
``gc.collect()``): ``jit(step).lower(*args)`` (tracing and lowering to
StableHLO) and ``lowered.compile()`` (XLA). Counted, in the compiled
executable's HLO text: its instructions, those inside ``while`` loops, and
the loops (see :func:`hlo_instructions`). The four variants run in one
process, in each repetition linen then nnx, jaxbn and flax in alternating
order, after an untimed lowering of each (Python-level first-call costs).
Reported: medians per variant and the ratios jaxbn / flax, and where jaxbn's
extra instructions are (by opcode). Beside the compile ratio, two more readings
of the same compilations (not targets: a check on the machine's noise): the
ratio of the process's CPU time (every thread's, read around ``compile()``),
and the median of each repetition's own jaxbn / flax, the two compiled back to
back. A guard for the benchmark itself: the
last compiled steps run once from the same initial variables and batch, and
jaxbn's and flax's losses must agree (relative difference at most
``LOSS_RTOL``).

Eager cost. Un-jitted training calls on x of shape (32, 8, 8, 16): the
functional ``jaxbn.batch_norm(x, params, state, training=True)`` beside
flax's ``nn.BatchNorm(use_running_average=False).apply(...,
mutable=['batch_stats'])``; ``apply`` of ``jaxbn.linen.BatchNorm`` beside
``flax.linen.BatchNorm``; a call of ``jaxbn.nnx.BatchNorm`` beside
``flax.nnx.BatchNorm`` (training mode); ``jaxbn.layer_norm`` beside
``flax.linen.LayerNorm().apply``. Each waits for its results; one warm-up
call each, then ``--eager-calls`` timed calls, jaxbn and flax alternating
which goes first. Reported: the median ms per call, the ratio jaxbn / flax,
and JAX's cache misses (from ``jax_log_compiles``' log records: traces, and
XLA compilations) in the warm-up call and in all timed calls together — in
the steady state there should be none; each one is a trace or a compile
paid on every call.

Then the targets beside the measured ratios: compile <= 1.1x flax, lower <=
1.5x, compiled HLO instructions <= 1.3x, eager <= 3x, each held or not.

    python benchmarks/compile.py [--width-divisor 1] [--blocks 3 4 6 3] [--reps 5] [--eager-calls 100] [--json PATH]
    python benchmarks/compile.py --quick   # widths / 16, blocks 1-1-1-1, 1 rep, 5 eager calls: a smoke test

It runs with glibc's huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``):
when that is not set it re-executes itself with it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.bench import reexec_with_huge_pages  # noqa: E402  (one copy of it)
from tests.hlo import parse_computations  # noqa: E402

NORMS = ("jaxbn", "flax")
FAMILIES = ("linen", "nnx")
LINEN_NORMS = {"jaxbn": jaxbn.linen.BatchNorm, "flax": nn.BatchNorm}
NNX_NORMS = {"jaxbn": jaxbn.nnx.BatchNorm, "flax": nnx.BatchNorm}
WIDTHS = (
    64,
    128,
    256,
    512,
)  # bottleneck widths of the stages; a block outputs EXPANSION times as many
EXPANSION = 4
BLOCKS = (3, 4, 6, 3)
BATCH, IMAGE_SIZE, CLASSES = 8, 32, 10
LEARNING_RATE = 0.1
MOMENTUM = 0.9  # of the BatchNorms' running statistics
LOSS_RTOL = 1e-4
EAGER_SHAPE = (32, 8, 8, 16)
#: ratio jaxbn / flax each measurement should stay at or below.
TARGETS = {"compile": 1.1, "lower": 1.5, "instructions": 1.3, "eager": 3.0}


# ---------------------------------------------------------------------------
# The models: the same ResNet-50 in linen and in nnx.


class LinenBottleneck(nn.Module):
    """conv1x1-norm-relu-conv3x3-norm-relu-conv1x1-norm plus the skip, then relu.

    Attributes:
      features: the bottleneck width; the block outputs ``EXPANSION`` times as many.
      strides: stride of the 3x3 convolution (and of the projection).
      norm: makes one normalization layer.
    """

    features: int
    strides: int
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC batch."""
        conv = functools.partial(nn.Conv, use_bias=False)
        y = nn.relu(self.norm()(conv(self.features, (1, 1))(x)))
        y = nn.relu(self.norm()(conv(self.features, (3, 3), self.strides)(y)))
        y = self.norm()(conv(self.features * EXPANSION, (1, 1))(y))
        if x.shape != y.shape:
            x = self.norm()(conv(self.features * EXPANSION, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class LinenResNet(nn.Module):
    """ResNet-50-shaped (see the module docstring), in flax.linen.

    Attributes:
      norm: a key of :data:`LINEN_NORMS`.
      widths: the bottleneck width of each stage (the stem has the first).
      blocks: bottleneck blocks per stage.
    """

    norm: str
    widths: tuple[int, ...]
    blocks: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits of an NHWC batch."""
        norm = functools.partial(
            LINEN_NORMS[self.norm], use_running_average=False, momentum=MOMENTUM
        )
        x = nn.relu(norm()(nn.Conv(self.widths[0], (7, 7), 2, use_bias=False)(x)))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, (width, blocks) in enumerate(zip(self.widths, self.blocks)):
            for block in range(blocks):
                x = LinenBottleneck(width, 2 if stage > 0 and block == 0 else 1, norm)(x)
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


class NnxBottleneck(nnx.Module):
    """:class:`LinenBottleneck` in nnx."""

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int,
        norm: Callable[..., nnx.Module],
        rngs: nnx.Rngs,
    ):
        conv = functools.partial(nnx.Conv, use_bias=False, rngs=rngs)
        out = features * EXPANSION
        self.conv1, self.norm1 = conv(in_features, features, (1, 1)), norm(features)
        self.conv2, self.norm2 = conv(features, features, (3, 3), strides), norm(features)
        self.conv3, self.norm3 = conv(features, out, (1, 1)), norm(out)
        self.project = strides != 1 or in_features != out
        if self.project:
            self.conv_skip, self.norm_skip = conv(in_features, out, (1, 1), strides), norm(out)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC batch."""
        y = nn.relu(self.norm1(self.conv1(x)))
        y = nn.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        if self.project:
            x = self.norm_skip(self.conv_skip(x))
        return nn.relu(x + y)


class NnxResNet(nnx.Module):
    """:class:`LinenResNet` in nnx; ``norm`` is a key of :data:`NNX_NORMS`."""

    def __init__(self, norm: str, widths: tuple[int, ...], blocks: tuple[int, ...], rngs: nnx.Rngs):
        make_norm = functools.partial(
            NNX_NORMS[norm], use_running_average=False, momentum=MOMENTUM, rngs=rngs
        )
        self.stem_conv = nnx.Conv(3, widths[0], (7, 7), 2, use_bias=False, rngs=rngs)
        self.stem_norm = make_norm(widths[0])
        layers, features = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for block in range(count):
                layers.append(
                    NnxBottleneck(
                        features, width, 2 if stage > 0 and block == 0 else 1, make_norm, rngs
                    )
                )
                features = width * EXPANSION
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(features, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits of an NHWC batch."""
        x = nn.relu(self.stem_norm(self.stem_conv(x)))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------------------
# Train steps: make_step() -> step(params, batch_stats, opt_state, x, labels)
#                               -> (params, batch_stats, opt_state, loss).


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass
class Model:
    """One variant, built and initialized; nothing compiled yet.

    Attributes:
      make_step: returns a new step function (a fresh closure) on every call.
      args: ``(params, batch_stats, opt_state, x, labels)``.
      batch_norms: the number of BatchNorm layers (from the running statistics).
      parameters: the number of parameters.
    """

    make_step: Callable[[], Callable]
    args: tuple
    batch_norms: int
    parameters: int


def _data() -> tuple[jax.Array, jax.Array, jax.Array]:
    # rbg, not the default threefry: XLA:CPU compiles threefry-based initializers slowly.
    x_key, label_key, init_key = jax.random.split(jax.random.key(0, impl="rbg"), 3)
    x = jax.random.normal(x_key, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))
    return x, jax.random.randint(label_key, (BATCH,), 0, CLASSES), init_key


def _model(
    make_step: Callable, params: Any, batch_stats: Any, tx: optax.GradientTransformation
) -> Model:
    x, labels, _ = _data()
    return Model(
        make_step,
        (params, batch_stats, tx.init(params), x, labels),
        len(jax.tree.leaves(batch_stats)) // 2,  # a mean and a var each
        sum(leaf.size for leaf in jax.tree.leaves(params)),
    )


def build_linen(norm: str, widths: tuple[int, ...], blocks: tuple[int, ...]) -> Model:
    """The linen ResNet with ``norm``'s BatchNorm, its variables and batch."""
    model = LinenResNet(norm, widths, blocks)
    x, _, init_key = _data()
    variables = jax.jit(model.init)(init_key, x)
    tx = optax.sgd(LEARNING_RATE)

    def make_step():
        def step(params, batch_stats, opt_state, x, labels):
            def loss_fn(params):
                variables = {"params": params, "batch_stats": batch_stats}
                logits, updates = model.apply(variables, x, mutable=["batch_stats"])
                return _cross_entropy(logits, labels), updates["batch_stats"]

            (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_batch_stats, opt_state, loss

        return step

    return _model(make_step, variables["params"], variables["batch_stats"], tx)


def build_nnx(norm: str, widths: tuple[int, ...], blocks: tuple[int, ...]) -> Model:
    """The nnx ResNet with ``norm``'s BatchNorm, split into graph, parameters and statistics.

    The step merges the module from its state, takes ``nnx.value_and_grad``
    with respect to its ``Param`` state, and returns the updated ``BatchStat``
    state: ``nnx.jit``'s split and merge, written out, so that the same fresh
    ``jax.jit`` measures it. (Merging inside ``jax.value_and_grad`` instead
    fails: neither BatchNorm may update a statistic merged from an outer
    trace.)
    """
    _, _, init_key = _data()

    def create():
        return NnxResNet(norm, widths, blocks, nnx.Rngs(params=init_key))

    graphdef = nnx.split(nnx.eval_shape(create))[0]
    params, batch_stats = jax.jit(lambda: nnx.split(create(), nnx.Param, nnx.BatchStat)[1:])()
    tx = optax.sgd(LEARNING_RATE)

    def make_step():
        def step(params, batch_stats, opt_state, x, labels):
            module = nnx.merge(graphdef, params, batch_stats)
            loss, grads = nnx.value_and_grad(lambda module: _cross_entropy(module(x), labels))(
                module
            )  # wrt Param
            updates, opt_state = tx.update(grads, opt_state, params)
            return (
                optax.apply_updates(params, updates),
                nnx.state(module, nnx.BatchStat),
                opt_state,
                loss,
            )

        return step

    return _model(make_step, params, batch_stats, tx)


BUILDERS = {"linen": build_linen, "nnx": build_nnx}


# ---------------------------------------------------------------------------
# Compile cost.


def hlo_instructions(hlo_text: str) -> collections.Counter:
    """The instructions of compiled HLO text, counted by opcode.

    Compiled HLO text (``compiled.as_text()``) is a list of computations — the
    ENTRY one, and those it calls: fusion bodies, reducers, ``while`` bodies
    and conditions, ``conditional`` branches — each a block of instruction
    lines ``[ROOT] [%]name = type opcode(operands), attributes``. Every such
    line of every computation counts once (a static count: a loop body counts
    once, whatever its trip count); headers, braces and metadata lines do not.
    Parsing is :func:`tests.hlo.parse_computations`.

    Returns:
      ``{opcode: count}``; its total is the instruction count,
      ``['while']`` the number of loops.
    """
    _, computations = parse_computations(hlo_text)
    return collections.Counter(
        opcode or "?" for body in computations.values() for opcode, _ in body
    )


_CALLEES = re.compile(
    r"\b(?:calls|to_apply|condition|body|called_computations|branch_computations|"
    r"true_computation|false_computation)=(%?[\w.\-]+|\{[^}]*\})"
)


def loop_instructions(hlo_text: str) -> int:
    """How many of :func:`hlo_instructions`' instructions belong to ``while`` loops.

    Those of every computation a ``while`` instruction names (``condition=``,
    ``body=``) and of every computation these call in turn, each counted once.
    """
    _, computations = parse_computations(hlo_text)

    def callees(rest: str) -> list[str]:
        return [
            name.strip().lstrip("%")
            for group in _CALLEES.findall(rest)
            for name in group.strip("{}").split(",")
            if name.strip()
        ]

    stack = [
        name
        for body in computations.values()
        for opcode, rest in body
        if opcode == "while"
        for name in callees(rest)
    ]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name not in seen and name in computations:
            seen.add(name)
            stack.extend(callee for _, rest in computations[name] for callee in callees(rest))
    return sum(len(computations[name]) for name in seen)


def measure_compile(model: Model) -> tuple[float, float, float, Any]:
    """Lowers and compiles a fresh jit of a fresh step, after clearing JAX's caches.

    Returns:
      ``(lower seconds, compile seconds, compile CPU seconds, the compiled executable)``: the
      CPU seconds are this process's, every thread's (XLA:CPU compiles its kernels on a pool).
    """
    jax.clear_caches()
    fn = jax.jit(model.make_step())
    gc.collect()
    start = time.perf_counter()
    lowered = fn.lower(*model.args)
    lowered_at, cpu_at = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - lowered_at, time.process_time() - cpu_at
    return lowered_at - start, compile_s, compile_cpu_s, compiled


def _order(rep: int) -> tuple[str, ...]:
    return NORMS if rep % 2 == 0 else NORMS[::-1]


def run_compile(models: dict[tuple[str, str], Model], reps: int) -> tuple[dict, dict]:
    """Times lowering and compiling every variant ``reps`` times, alternating jaxbn and flax.

    Returns:
      ``({(family, norm): {'lower_s': [...], 'compile_s': [...], 'compile_cpu_s': [...],
      'opcodes': Counter, 'in_loops': int}},
      {(family, norm): the last compiled executable})``.
    """
    for model in models.values():  # untimed: first-call costs of Python code (imports, caches)
        jax.jit(model.make_step()).lower(*model.args)
    results = {key: {"lower_s": [], "compile_s": [], "compile_cpu_s": []} for key in models}
    executables = {}
    for rep in range(reps):
        for family in FAMILIES:
            for norm in _order(rep):
                key = (family, norm)
                lower_s, compile_s, compile_cpu_s, compiled = measure_compile(models[key])
                results[key]["lower_s"].append(lower_s)
                results[key]["compile_s"].append(compile_s)
                results[key]["compile_cpu_s"].append(compile_cpu_s)
                executables[key] = compiled
                print(
                    f"  rep {rep + 1}/{reps} {family} {norm}: lower {lower_s:.3f} s, "
                    f"compile {compile_s:.3f} s ({compile_cpu_s:.3f} s CPU)",
                    flush=True,
                )
    for key, compiled in executables.items():
        text = compiled.as_text()
        results[key]["opcodes"], results[key]["in_loops"] = (
            hlo_instructions(text),
            loop_instructions(text),
        )
    return results, executables


def loss_check(models: dict[tuple[str, str], Model], executables: dict) -> dict[str, Any]:
    """Runs each compiled step once; compares jaxbn's loss with flax's, per family.

    Returns:
      ``{family: {'jaxbn': loss, 'flax': loss, 'rel_diff', 'same_init', 'passed'}}``.
    """
    check = {}
    for family in FAMILIES:
        losses = {
            norm: float(executables[family, norm](*models[family, norm].args)[-1]) for norm in NORMS
        }
        same = jax.tree.all(
            jax.tree.map(
                lambda a, b: bool(np.array_equal(a, b)),
                jax.tree.leaves(models[family, "jaxbn"].args[:2]),
                jax.tree.leaves(models[family, "flax"].args[:2]),
            )
        )
        rel_diff = abs(losses["jaxbn"] - losses["flax"]) / abs(losses["flax"])
        check[family] = {
            **losses,
            "rel_diff": rel_diff,
            "same_init": bool(same),
            "passed": bool(same and rel_diff <= LOSS_RTOL),
        }
    return check


def summarize_compile(results: dict, check: dict, reps: int) -> dict[str, Any]:
    """Prints the compile table and the opcode differences; returns the numbers.

    Returns:
      ``{family: {norm: {'lower_s', 'compile_s', 'compile_cpu_s' (medians), 'lower_s_all',
      'compile_s_all', 'compile_cpu_s_all', 'instructions', 'in_loops', 'whiles',
      'conditionals', 'opcodes'}, 'ratios': {'lower', 'compile', 'instructions'},
      'compile_readings': {'cpu', 'paired'}, 'loss_check': ...}}``. The ratios are those the
      targets judge (wall time, medians); ``compile_readings`` reads the same compilations two
      more ways, as a check on the machine's noise: the ratio of the CPU-time medians, and the
      median over repetitions of each repetition's jaxbn / flax (the two ran back to back).
    """
    summary: dict[str, Any] = {}
    rows = []
    for family in FAMILIES:
        summary[family] = {}
        for norm in NORMS:
            result = results[family, norm]
            opcodes = result["opcodes"]
            summary[family][norm] = {
                "lower_s": statistics.median(result["lower_s"]),
                "compile_s": statistics.median(result["compile_s"]),
                "compile_cpu_s": statistics.median(result["compile_cpu_s"]),
                "lower_s_all": result["lower_s"],
                "compile_s_all": result["compile_s"],
                "compile_cpu_s_all": result["compile_cpu_s"],
                "instructions": sum(opcodes.values()),
                "in_loops": result["in_loops"],
                "whiles": opcodes["while"],
                "conditionals": opcodes["conditional"],
                "opcodes": dict(opcodes),
            }
        jb, fx = summary[family]["jaxbn"], summary[family]["flax"]
        summary[family]["ratios"] = {
            "lower": jb["lower_s"] / fx["lower_s"],
            "compile": jb["compile_s"] / fx["compile_s"],
            "instructions": jb["instructions"] / fx["instructions"],
        }
        pairs = zip(jb["compile_s_all"], fx["compile_s_all"])
        summary[family]["compile_readings"] = {
            "cpu": jb["compile_cpu_s"] / fx["compile_cpu_s"],
            "paired": statistics.median(mine / theirs for mine, theirs in pairs),
        }
        summary[family]["loss_check"] = check[family]
        for norm in NORMS:
            row = summary[family][norm]
            rows.append(
                [
                    family,
                    norm,
                    f"{row['lower_s']:.3f}",
                    f"{min(row['lower_s_all']):.3f}",
                    f"{row['compile_s']:.3f}",
                    f"{min(row['compile_s_all']):.3f}",
                    "",
                    f"{row['compile_cpu_s']:.3f}",
                    row["instructions"],
                    row["in_loops"],
                    row["whiles"],
                    row["conditionals"],
                    f"{check[family][norm]:.6f}",
                ]
            )
        ratios, readings = summary[family]["ratios"], summary[family]["compile_readings"]
        rows.append(
            [
                family,
                "jaxbn / flax",
                f"{ratios['lower']:.2f}",
                "",
                f"{ratios['compile']:.2f}",
                "",
                f"{readings['paired']:.2f}",
                f"{readings['cpu']:.2f}",
                f"{ratios['instructions']:.2f}",
                "",
                "",
                "",
                f"rel. diff {check[family]['rel_diff']:.1e}",
            ]
        )
    print_table(
        f"train step: lower and compile wall time (s, median and min of {reps}), compile CPU "
        "time (median), compiled HLO; jaxbn / flax: ratios of the medians, and the median of "
        "the repetitions' own ratios",
        [
            "family",
            "norm",
            "lower",
            "lower min",
            "compile",
            "compile min",
            "compile paired",
            "compile CPU",
            "HLO instructions",
            "in loops",
            "while",
            "conditional",
            "loss (1 step)",
        ],
        rows,
    )

    for family in FAMILIES:
        jb, fx = (collections.Counter(summary[family][norm]["opcodes"]) for norm in NORMS)
        layers = results[family, "jaxbn"]["batch_norms"]
        diff = {op: jb[op] - fx[op] for op in set(jb) | set(fx) if jb[op] != fx[op]}
        top = sorted(diff, key=lambda op: (-abs(diff[op]), op))[:12]
        total = sum(jb.values()) - sum(fx.values())
        print_table(
            f"{family}: where the instruction counts differ (top opcodes by |jaxbn - flax|); "
            f"in all {total:+d}, {total / layers:+.1f} per BatchNorm ({layers})",
            ["opcode", "jaxbn", "flax", "jaxbn - flax", "per BatchNorm"],
            [[op, jb[op], fx[op], f"{diff[op]:+d}", f"{diff[op] / layers:+.2f}"] for op in top],
        )
    for family, result in check.items():
        print(
            f"loss check {family}: initial variables identical: {'yes' if result['same_init'] else 'NO'}; "
            f"relative difference {result['rel_diff']:.1e} (limit {LOSS_RTOL:.0e}): "
            f"{'passed' if result['passed'] else 'FAILED'}"
        )
    return summary


# ---------------------------------------------------------------------------
# Eager cost.


class CompileLog(logging.Handler):
    """Counts JAX's ``jax_log_compiles`` records: traces and XLA compilations.

    While active (a context manager), ``jax_log_compiles`` is on and the
    records stop at the ``jax`` logger (they are counted, not printed).
    """

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.traces = self.compiles = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.traces += message.startswith("Finished tracing")
        self.compiles += message.startswith("Compiling ")

    def counts(self) -> tuple[int, int]:
        return self.traces, self.compiles

    def __enter__(self) -> CompileLog:
        logger = logging.getLogger("jax")
        self._saved = logger.propagate, logger.level, jax.config.jax_log_compiles
        logger.addHandler(self)
        logger.propagate = False
        logger.setLevel(
            logging.DEBUG
        )  # the records' own level is WARNING; this only lets them through
        jax.config.update("jax_log_compiles", True)
        return self

    def __exit__(self, *exc: Any) -> None:
        logger = logging.getLogger("jax")
        logger.removeHandler(self)
        logger.propagate, level, log_compiles = self._saved
        logger.setLevel(level)
        jax.config.update("jax_log_compiles", log_compiles)


def eager_pairs() -> dict[str, dict[str, Callable[[], Any]]]:
    """The eager calls: ``{row: {'jaxbn': call, 'flax': call}}``, each call computing once and waiting."""
    x = jax.random.normal(jax.random.key(1), EAGER_SHAPE) + 1.0
    features = EAGER_SHAPE[-1]
    params, state = jaxbn.batch_norm_init(features)
    flax_bn = nn.BatchNorm(use_running_average=False)
    flax_bn_vars = flax_bn.init(jax.random.key(0), x)
    linen = {
        norm: cls(use_running_average=False, momentum=MOMENTUM) for norm, cls in LINEN_NORMS.items()
    }
    linen_vars = {norm: module.init(jax.random.key(0), x) for norm, module in linen.items()}
    modules = {
        norm: cls(features, use_running_average=False, momentum=MOMENTUM, rngs=nnx.Rngs(0))
        for norm, cls in NNX_NORMS.items()
    }
    layer_norm = nn.LayerNorm()
    ln_vars = layer_norm.init(jax.random.key(0), x)

    def waits(fn: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: jax.block_until_ready(fn())

    return {
        "functional batch_norm vs flax.linen BatchNorm apply": {
            "jaxbn": waits(lambda: jaxbn.batch_norm(x, params, state, training=True)),
            "flax": waits(lambda: flax_bn.apply(flax_bn_vars, x, mutable=["batch_stats"])),
        },
        "linen BatchNorm apply": {
            norm: waits(
                functools.partial(module.apply, linen_vars[norm], x, mutable=["batch_stats"])
            )
            for norm, module in linen.items()
        },
        "nnx BatchNorm call": {
            norm: waits(functools.partial(module, x)) for norm, module in modules.items()
        },
        "layer_norm vs flax.linen LayerNorm apply": {
            "jaxbn": waits(lambda: jaxbn.layer_norm(x, ln_vars["params"])),
            "flax": waits(lambda: layer_norm.apply(ln_vars, x)),
        },
    }


def run_eager(calls: int) -> dict[str, Any]:
    """Times the eager calls; counts JAX's cache misses in the warm-up and in the timed calls.

    Returns:
      ``{row: {norm: {'ms', 'ms_min', 'warmup_traces', 'warmup_compiles',
      'traces', 'compiles'}, 'ratio': jaxbn ms / flax ms}}``.
    """
    pairs = eager_pairs()
    results: dict[str, Any] = {}
    with CompileLog() as log:
        for row, pair in pairs.items():
            misses: dict[str, list[int]] = {}
            for norm in NORMS:
                before = log.counts()
                pair[norm]()
                misses[norm] = [a - b for a, b in zip(log.counts(), before)] + [0, 0]
            times: dict[str, list[float]] = {norm: [] for norm in NORMS}
            for call in range(calls):
                for norm in _order(call):
                    before = log.counts()
                    start = time.perf_counter()
                    pair[norm]()
                    times[norm].append(time.perf_counter() - start)
                    after = log.counts()
                    misses[norm][2] += after[0] - before[0]
                    misses[norm][3] += after[1] - before[1]
            results[row] = {
                norm: {
                    "ms": statistics.median(times[norm]) * 1e3,
                    "ms_min": min(times[norm]) * 1e3,
                    **dict(
                        zip(
                            ("warmup_traces", "warmup_compiles", "traces", "compiles"), misses[norm]
                        )
                    ),
                }
                for norm in NORMS
            }
            results[row]["ratio"] = results[row]["jaxbn"]["ms"] / results[row]["flax"]["ms"]
    rows = [
        [
            row,
            norm,
            f"{r[norm]['ms']:.3f}",
            f"{r[norm]['ms_min']:.3f}",
            f"{r['ratio']:.2f}" if norm == "jaxbn" else "",
            f"{r[norm]['warmup_traces']} / {r[norm]['warmup_compiles']}",
            f"{r[norm]['traces']} / {r[norm]['compiles']}",
        ]
        for row, r in results.items()
        for norm in NORMS
    ]
    print_table(
        f"eager training calls, x {EAGER_SHAPE} float32: ms per call (median and min of {calls}, "
        "after 1 warm-up); JAX cache misses (traces / XLA compiles)",
        [
            "call",
            "norm",
            "median",
            "min",
            "jaxbn / flax",
            "warm-up misses",
            f"misses in {calls} calls",
        ],
        rows,
    )
    return results


# ---------------------------------------------------------------------------
# Targets, printing, command line.


def targets(compile_summary: dict, eager: dict) -> list[dict[str, Any]]:
    """The measured ratios beside their targets; prints them."""
    checks = []
    for family in FAMILIES:
        for metric in ("compile", "lower", "instructions"):
            checks.append(
                {
                    "measurement": f"{family} train step {metric}",
                    "metric": metric,
                    "ratio": compile_summary[family]["ratios"][metric],
                }
            )
    for row, result in eager.items():
        checks.append({"measurement": f"eager {row}", "metric": "eager", "ratio": result["ratio"]})
    for check in checks:
        check["target"] = TARGETS[check["metric"]]
        check["held"] = bool(check["ratio"] <= check["target"])
    print_table(
        "targets: ratio jaxbn / flax",
        ["measurement", "ratio", "target", "held"],
        [
            [
                c["measurement"],
                f"{c['ratio']:.2f}",
                f"<= {c['target']}",
                "yes" if c["held"] else "NO",
            ]
            for c in checks
        ],
    )
    return checks


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """Prints a titled markdown table, its columns padded to line up; numbers right-aligned."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = [
        i > 0
        and all(
            row[i].lstrip("+-").replace(".", "", 1).isdigit() or not row[i] for row in cells[1:]
        )
        for i in range(len(headers))
    ]
    print(f"\n## {title}\n")
    for index, row in enumerate(cells):
        line = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)]
        print("| " + " | ".join(line) + " |")
        if index == 0:
            print(
                "|"
                + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right))
                + "|"
            )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """The versions, device, machine and command; also printed."""
    device = jax.devices()[0]
    env = {
        "command": shlex.join(sys.orig_argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in ("jaxbn", "jax", "jaxlib", "flax", "optax")},
        "backend": jax.default_backend(),
        "device": f"{device.platform} {device.device_kind} (x{jax.device_count()})",
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }
    print("# jaxbn compile-time and eager benchmark")
    print(f"command: {env['command']}")
    print(f"date: {env['date']}")
    print(
        "versions: " + ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    )
    print(
        f"backend: {env['backend']}, device: {env['device']}, CPUs {env['cpus']} (usable {env['usable_cpus']}), "
        "load average " + " ".join(f"{load:.2f}" for load in env["load_average"])
    )
    print(
        f"GLIBC_TUNABLES={env['glibc_tunables'] or '(unset)'}, XLA_FLAGS={env['xla_flags'] or '(unset)'}, "
        f"persistent compilation cache: {env['compilation_cache_dir'] or 'off'}"
    )
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line; ``--quick`` fills in small values not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--width-divisor",
        type=int,
        help="divide the ResNet-50 widths (64..2048) by this (default 1; --quick: 16)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        nargs=4,
        metavar=("B1", "B2", "B3", "B4"),
        help="bottleneck blocks per stage (default 3 4 6 3: ResNet-50; --quick: 1 1 1 1)",
    )
    parser.add_argument(
        "--reps", type=int, help="lower+compile repetitions per variant (default 5; --quick: 1)"
    )
    parser.add_argument(
        "--eager-calls",
        type=int,
        help="timed eager calls per implementation (default 100; --quick: 5)",
    )
    parser.add_argument(
        "--json", type=pathlib.Path, help="also write the results to this JSON file"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="widths / 16, one block per stage, 1 rep, 5 eager calls: a smoke test",
    )
    args = parser.parse_args(argv)
    defaults = {"width_divisor": (1, 16), "reps": (5, 1), "eager_calls": (100, 5)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        elif getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.blocks is None:
        args.blocks = (1, 1, 1, 1) if args.quick else BLOCKS
    elif min(args.blocks) < 1:
        parser.error("--blocks must be >= 1")
    args.blocks = tuple(args.blocks)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark.

    Args:
      argv: command-line arguments without the program name; None reads ``sys.argv``.

    Returns:
      ``{'environment', 'model', 'compile': {family: {norm: {...}, 'ratios',
      'loss_check'}}, 'eager': {row: {norm: {...}, 'ratio'}}, 'targets':
      [{'measurement', 'metric', 'ratio', 'target', 'held'}]}`` (see
      :func:`summarize_compile`, :func:`run_eager`, :func:`targets`).
    """
    args = parse_args(argv)
    env = environment(args)
    widths = tuple(max(1, width // args.width_divisor) for width in WIDTHS)
    start = time.perf_counter()
    models = {
        (family, norm): BUILDERS[family](norm, widths, args.blocks)
        for family in FAMILIES
        for norm in NORMS
    }
    example = models["linen", "jaxbn"]
    model = {
        "widths": widths,
        "outputs": tuple(w * EXPANSION for w in widths),
        "blocks": args.blocks,
        "batch_norms": example.batch_norms,
        "parameters": example.parameters,
        "batch": BATCH,
        "image_size": IMAGE_SIZE,
        "classes": CLASSES,
    }
    print(
        f"model: ResNet-50-shaped, bottleneck blocks {'-'.join(map(str, args.blocks))}, widths "
        f"{'/'.join(map(str, widths))} (outputs {'/'.join(map(str, model['outputs']))}; width divisor "
        f"{args.width_divisor}), {example.batch_norms} BatchNorms, {example.parameters} parameters; "
        f"batch {BATCH}x{IMAGE_SIZE}x{IMAGE_SIZE}x3, {CLASSES} classes; SGD lr {LEARNING_RATE}, "
        f"BatchNorm momentum {MOMENTUM}, training mode"
    )
    print(
        f"compile: {args.reps} reps, each a fresh jax.jit after jax.clear_caches(); "
        f"eager: {args.eager_calls} calls; the four variants built and initialized in "
        f"{time.perf_counter() - start:.1f} s\n",
        flush=True,
    )
    for key, built in models.items():
        if built.batch_norms != example.batch_norms:
            raise RuntimeError(
                f"{key} has {built.batch_norms} BatchNorms, linen jaxbn {example.batch_norms}"
            )
    compile_results, executables = run_compile(models, args.reps)
    for key, built in models.items():
        compile_results[key]["batch_norms"] = built.batch_norms
    check = loss_check(models, executables)
    del executables
    compile_summary = summarize_compile(compile_results, check, args.reps)
    eager = run_eager(args.eager_calls)
    results = {
        "environment": env,
        "model": model,
        "compile": compile_summary,
        "eager": eager,
        "targets": targets(compile_summary, eager),
    }
    if not all(check[family]["passed"] for family in FAMILIES):
        print(
            "loss check FAILED: jaxbn and flax do not compute the same step; the compile costs compare unlike work"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    reexec_with_huge_pages()
    result = main()
    sys.exit(
        0 if all(result["compile"][family]["loss_check"]["passed"] for family in FAMILIES) else 1
    )
