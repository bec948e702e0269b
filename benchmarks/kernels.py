"""Where the time goes on XLA:CPU: jaxbn's and flax's compiled kernels, each timed by JAX's profiler.

Runs each variant's compiled step ``--calls`` times under ``jax.profiler.trace`` (a Perfetto
trace), reads the trace back, and attributes its kernel events (XLA:CPU's thunks: fusions,
library reductions ``ynn_fusion``, convolutions, copies) to the compiled HLO: each kernel's fused
operations and the operation it was made from (``op_name``, which names the module, e.g.
``BasicBlock_0/BatchNorm_1``, and ``transpose(...)`` for the backward).

Two workloads, and a compilation:

- a layer (default): one batch norm's forward+backward as ``benchmarks/bench.py`` times it
  (``jax.vjp`` with a given ``dy``), jaxbn beside flax.linen, at ``--shape`` (NHWC) and ``--dtype``;
- ``--e2e``: the training step of ``benchmarks/e2e.py``'s ResNet (its default sizes; with
  ``--quick`` its quick ones) with jaxbn.linen, flax.linen and no norm;
  ``--without-cpu-barriers`` and ``--compute-dtype-barrier-views`` add e2e.py's measuring
  variants of jaxbn;
- ``--compile``: one XLA compilation of ``benchmarks/compile.py``'s ResNet-50-shaped linen train
  step, jaxbn beside flax: the profiler's events (HLO passes, kernel code generation) by name.

Printed per variant: the median wall time per call while profiled, the kernels that ran, the
sum of their durations per call (more than the wall time where kernels run concurrently: XLA:CPU
runs independent thunks side by side, and each one's duration then includes the sharing), the
time and count per kind of kernel (its name without the numeric suffix) side by side for all
variants (with ``--e2e`` also per module and direction), and the ``--top`` kernels of each.
Durations come from the profiler and include its overhead; compare variants of one run, not runs.

    python benchmarks/kernels.py [--shape 64 32 32 128] [--dtype float32] [--calls 20] [--top 12]
    python benchmarks/kernels.py --e2e --dtype bfloat16 [--without-cpu-barriers] [--compute-dtype-barrier-views]
    python benchmarks/kernels.py --compile [--top 30]   # --quick: a smaller ResNet

It runs with glibc's huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), as bench.py does.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import bench, e2e  # noqa: E402
from tests.hlo import named_instructions  # noqa: E402

_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PLUMBING = {"parameter", "constant", "broadcast", "bitcast", "slice", "tuple", "get-tuple-element"}


class Kernel(NamedTuple):
    """One kernel of a compiled program: its output type, fused operations and source op."""

    shape: str
    ops: str  # the fused computation's operations, without parameters and broadcasts
    op_name: str  # the JAX operation it was made from (its module path, its transform)


class Profile(NamedTuple):
    """A variant's profile."""

    wall_ms: float  # wall time per call while profiled (median)
    us_per_call: dict[str, float]  # kernel name -> its durations summed, per call (mean)
    kernels: dict[str, Kernel]  # kernel name -> what it computes


def kernels_of(hlo_text: str) -> dict[str, Kernel]:
    """The ENTRY instructions of compiled HLO text that XLA:CPU runs as kernels, by name."""
    entry, computations = named_instructions(hlo_text)
    out = {}
    for name, opcode, rest in computations[entry]:
        if opcode in _PLUMBING:
            continue
        called = _CALLS.search(rest)
        body = computations.get(called.group(1), []) if called else []
        ops = " ".join(op for _, op, _ in body if op and op not in _PLUMBING)
        op_name = _OP_NAME.search(rest)
        out[name] = Kernel(rest.split()[0], ops, op_name.group(1) if op_name else "")
    return out


def traced(run: Callable[[], Any], calls: int) -> tuple[list[float], dict[str, float]]:
    """Runs ``run`` ``calls`` times under JAX's profiler: the wall time of each call (s), and the
    duration of the trace's complete events summed by name (µs, all calls together)."""
    walls = []
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(calls):
                start = time.perf_counter()
                run()
                walls.append(time.perf_counter() - start)
        (trace,) = pathlib.Path(directory).rglob("*.trace.json.gz")
        with gzip.open(trace) as stream:
            events = json.load(stream)["traceEvents"]
    summed: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X":
            summed[event["name"]] += event["dur"]
    return walls, dict(summed)


def profile(run: Callable[[], Any], hlo_text: str, calls: int) -> Profile:
    """Times ``calls`` calls of ``run`` under JAX's profiler; sums each kernel's events per call."""
    kernels = kernels_of(hlo_text)
    walls, summed = traced(run, calls)
    per_call = {name: us / calls for name, us in summed.items() if name in kernels}
    return Profile(1e3 * statistics.median(walls), per_call, kernels)


def compile_phases(top: int, quick: bool) -> None:
    """compile.py's ResNet-50-shaped linen train step, jaxbn beside flax (``quick``: its widths
    / 16, one block per stage): one XLA compilation of each under the profiler, its events
    (passes, kernel codegen) summed by name, the ``top`` longest of jaxbn's beside flax's (ms;
    nested events overlap their parents)."""
    from benchmarks import compile as resnet

    widths = tuple(width // 16 for width in resnet.WIDTHS) if quick else resnet.WIDTHS
    blocks = (1, 1, 1, 1) if quick else resnet.BLOCKS
    phases, seconds = {}, {}
    for norm in ("jaxbn", "flax"):
        model = resnet.build_linen(norm, widths, blocks)
        jax.clear_caches()
        lowered = jax.jit(model.make_step()).lower(*model.args)
        walls, phases[norm] = traced(lowered.compile, 1)
        seconds[norm] = walls[0]
    print(f"compile, s: jaxbn {seconds['jaxbn']:.2f}, flax {seconds['flax']:.2f}\n")
    print("| event | jaxbn ms | flax ms | difference |")
    print("| --- | --- | --- | --- |")
    jaxbn, flax = phases["jaxbn"], phases["flax"]
    for name in sorted(jaxbn, key=lambda n: -jaxbn[n])[:top]:
        ours, theirs = jaxbn[name] / 1e3, flax.get(name, 0.0) / 1e3
        print(f"| {name[:70]} | {ours:.1f} | {theirs:.1f} | {ours - theirs:+.1f} |")


def kind(name: str) -> str:
    """A kernel's kind: its name without XLA's numeric suffix (``ynn_fusion.12`` -> ``ynn_fusion``)."""
    return re.sub(r"(\.\d+)+$", "", name)


def layer_variants(args: argparse.Namespace) -> dict[str, tuple[Callable[[], Any], str]]:
    """bench.py's forward+backward rows of jaxbn and flax.linen: ``{name: (run, hlo text)}``."""
    spec = bench.Spec("fwdbwd", args.dtype, "NHWC", tuple(args.shape))
    out = {}
    for name in ("jaxbn", bench.FLAX):
        case = bench.build(name, spec)
        if case.run is None:
            raise SystemExit(f"{name}: {case.note}")
        out[name] = (case.run, case.compiled.as_text())
    return out


def e2e_variants(args: argparse.Namespace) -> dict[str, tuple[Callable[[], Any], str]]:
    """e2e.py's train steps (its default sizes): ``{name: (run, hlo text)}``."""
    flags = [flag for flag in e2e.MEASURING if getattr(args, flag[2:].replace("-", "_"))]
    sizes = e2e.parse_args(["--dtype", args.dtype, *(["--quick"] if args.quick else []), *flags])
    out = {norm: e2e.build(norm, args.dtype, sizes)[0] for norm in e2e.NORMS}
    out.update(e2e.measuring_variants(sizes))
    runs = {}
    for name, variant in out.items():
        step = variant.step
        compiled = (
            step
            if hasattr(step, "as_text")
            else step.lower(variant.state, *variant.batch).compile()
        )
        for _ in range(e2e.WARMUP_STEPS):
            variant.run()
        runs[name] = (variant.run, compiled.as_text())
    return runs


_MODULE = re.compile(r"((?:\w+_\d+/)*(?:BatchNorm|Conv|Dense)_\d+)")


def source(kernel: Kernel) -> str:
    """Which module and direction a kernel belongs to, from its ``op_name``: e.g.
    ``BasicBlock_0/BatchNorm_1 backward``; ``other`` where the name has no module."""
    match = _MODULE.search(kernel.op_name)
    direction = "backward" if "transpose(" in kernel.op_name else "forward"
    return f"{match.group(1)} {direction}" if match else "other"


def side_by_side(
    profiles: dict[str, Profile], key: Callable[[str, Kernel], str], title: str
) -> None:
    """One table: the kernel time per call (and kernel count) of every ``key`` group, by variant."""
    names = list(profiles)
    groups: dict[str, dict[str, list[float]]] = collections.defaultdict(dict)
    for name, prof in profiles.items():
        for kernel, us in prof.us_per_call.items():
            cell = groups[key(kernel, prof.kernels[kernel])].setdefault(name, [0.0, 0])
            cell[0] += us
            cell[1] += 1
    print(f"\nus per call (kernels) by {title}:\n")
    print(f"| {title} | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for group in sorted(groups, key=lambda g: -max(v[0] for v in groups[g].values())):
        cells = [groups[group].get(name, [0.0, 0]) for name in names]
        print(f"| {group} | " + " | ".join(f"{us:.0f} ({n})" for us, n in cells) + " |")


def print_profiles(profiles: dict[str, Profile], top: int, by_module: bool) -> None:
    """The per-variant totals, the time per kind of kernel (and per module) side by side, and the
    top kernels of each variant."""
    print("| variant | wall ms per call (median) | kernels run | kernel time ms per call |")
    print("| --- | --- | --- | --- |")
    for name, prof in profiles.items():
        total = sum(prof.us_per_call.values()) / 1e3
        print(f"| {name} | {prof.wall_ms:.2f} | {len(prof.us_per_call)} | {total:.2f} |")
    side_by_side(profiles, lambda name, _: kind(name), "kind")
    if by_module:
        side_by_side(profiles, lambda _, kernel: source(kernel), "module")
    for name, prof in profiles.items():
        print(f"\n{name}: the {top} longest kernels (us per call, output, fused ops, source op)\n")
        ranked = sorted(prof.us_per_call.items(), key=lambda item: -item[1])[:top]
        for kernel, us in ranked:
            info = prof.kernels[kernel]
            print(
                f"  {us:8.0f}  {kernel[:28]:28s} {info.shape[:30]:30s} {info.ops[:60]:60s} {info.op_name[-70:]}"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--e2e", action="store_true", help="profile e2e.py's train step")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="profile the XLA compilation of compile.py's ResNet-50 step (jaxbn, flax)",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=[64, 32, 32, 128],
        metavar=("N", "H", "W", "C"),
        help="the layer's NHWC shape (default 64 32 32 128)",
    )
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES), default="float32")
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per variant")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    for flag, measuring in e2e.MEASURING.items():
        parser.add_argument(flag, action="store_true", help=f"--e2e: {measuring.help}")
    parser.add_argument(
        "--quick", action="store_true", help="shape 8 8 8 16, 3 calls: a smoke test"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.calls = [8, 8, 8, 16], 3
    return args


def main(argv: list[str] | None = None) -> dict[str, Profile]:
    """Profiles the variants and prints the tables; returns the profiles by variant."""
    args = parse_args(argv)
    print(f"# jaxbn kernels on {jax.default_backend()}: {' '.join(sys.orig_argv[1:])}")
    if args.compile:
        compile_phases(args.top, args.quick)
        return {}
    variants = e2e_variants(args) if args.e2e else layer_variants(args)
    profiles = {name: profile(run, text, args.calls) for name, (run, text) in variants.items()}
    print_profiles(profiles, args.top, by_module=args.e2e)
    return profiles


if __name__ == "__main__":
    bench.reexec_with_huge_pages()
    main()
