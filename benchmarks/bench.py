"""Batch-norm speed and memory: jaxbn beside flax, equinox, haiku, PyTorch and a copy.

Times, in one process and run, every implementation for three modes — train
forward (y and the updated running statistics), forward+backward (one jitted
step returning y and the gradients of x, scale and bias, with dy an argument
so XLA cannot fold it) and inference — in float32 and bfloat16, NHWC and
NCHW. The implementations are interleaved: each repetition runs every one
once, in a fresh random order, so machine noise hits all alike. Each row
reports the median, min and max, and ratios to flax.linen (same layout), to
PyTorch on a channels_last tensor and to a memory-copy roofline (a jitted
``x * 1.0001``; PyTorch's ``clone``).

For the JAX rows, ``BW/copy`` is the bandwidth achieved, the bytes the
compiled HLO moves divided by the median time, as a fraction of the jitted
copy's (2S over its median): near 1, a row is as close to the memory roofline
as a plain copy gets, and only fewer bytes would make it faster.

Then, per JAX implementation, the static memory traffic of the compiled HLO in
units of S (the bytes of x in its dtype), its number of kernels and the
compiled temporary memory; and the collectives per direction of jaxbn and
flax.linen under pmap, shard_map and jit with sharded inputs (on a mesh of
explicit axes, and of Auto ones) on 8 forced CPU devices (a subprocess, so the
timings run on the normal single device).

In bfloat16 every library gets bf16 activations and float32 parameters and is
asked for a bf16 output where it can be (flax and jaxbn: ``dtype``); the note
column says where the output came out otherwise, and a library that fails
shows its error instead of a time.

    python benchmarks/bench.py [--shape 64 32 32 128] [--reps 20] [--libs jaxbn flax torch copy]
    python benchmarks/bench.py --quick   # tiny shape, few repetitions: a smoke test
    python benchmarks/bench.py --compute-dtype-barrier-views   # jaxbn's measuring variant
    python benchmarks/bench.py --mask positions --libs jaxbn flax nnx   # a masked batch

``--mask`` times the training modes with a mask (an argument of the jitted step, 90% valid, the
same for every library): of ``examples`` (N, 1, 1, 1), of ``positions`` (N, H, W, 1), or of
``elements`` (x's shape); libraries without a mask (equinox, haiku, torch) show a note instead.

``--compute-dtype-barrier-views`` compiles every jaxbn row with XLA:CPU's barriers on the float32
views of a bfloat16 x and dy (``jaxbn.stats.barrier_views_in_compute_dtype``; e2e.py times it
beside the default inside a model); the header says so.

Optional libraries (equinox, dm-haiku, torch) that are not installed are
reported as such. The bench runs with glibc's transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; it re-executes itself to set it),
so page faults on freshly allocated buffers do not dominate the timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import inspect
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
from jaxbn import stats

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.hlo import count_per_execution, memory_traffic  # noqa: E402

HUGE_PAGES = "glibc.malloc.hugetlb=1"
DEVICES = 8
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LAYOUTS = ("NHWC", "NCHW")
FLAX, TORCH, COPY = "flax.linen", "torch BatchNorm2d", "copy: jax x*1.0001"
COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "collective-permute", "all-to-all")
MASKS = ("examples", "positions", "elements")  # what a --mask varies along (NHWC shapes below)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one benchmark row computes.

    Attributes:
      mode: ``train``, ``fwdbwd`` or ``inference`` (see :data:`MODES`).
      dtype: ``float32`` or ``bfloat16``: the activations' dtype.
      layout: ``NHWC`` (features last) or ``NCHW`` (features at axis 1).
      shape: the NHWC shape; NCHW rows use its transpose.
      mask: None, or what the training modes' mask varies along (one of :data:`MASKS`).
    """

    mode: str
    dtype: str
    layout: str
    shape: tuple[int, int, int, int]
    mask: str | None = None

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def axis(self) -> int:
        return -1 if self.layout == "NHWC" else 1

    @property
    def array_shape(self) -> tuple[int, ...]:
        n, h, w, c = self.shape
        return self.shape if self.layout == "NHWC" else (n, c, h, w)

    @property
    def jnp_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def mask_array(self) -> np.ndarray | None:
        """The mask of the training modes (90% valid, seeded), in this row's layout; else None."""
        if self.mask is None or self.mode == "inference":
            return None
        n, h, w, c = self.shape
        shape = {"examples": (n, 1, 1, 1), "positions": (n, h, w, 1)}.get(self.mask, self.shape)
        mask = np.random.default_rng(1).uniform(size=shape) < 0.9
        return mask if self.layout == "NHWC" else np.ascontiguousarray(mask.transpose(0, 3, 1, 2))


@dataclasses.dataclass
class Case:
    """One implementation, compiled and warmed up, ready to time.

    Attributes:
      run: computes the row once and waits for the result; None when it failed.
      compiled: the JAX executable (for the traffic section), else None.
      note: why there is no time (an error, a missing library) or what differs.
      traffic: the bytes its compiled HLO moves, in units of S (JAX rows only).
    """

    run: Callable[[], Any] | None
    compiled: Any = None
    note: str = ""
    traffic: float | None = None  # compiled HLO traffic in units of S (JAX rows)


# ---------------------------------------------------------------------------
# Steps: each returns (activations, small), so shard_map and pmap can shard
# the first along the batch and replicate the second.


def _train_step(apply: Callable) -> Callable:
    def step(x, params, state, *mask):
        y, new_state = apply(x, params, state, True, *mask)
        return (y,), new_state

    return step


def _fwdbwd_step(apply: Callable) -> Callable:
    def step(x, params, state, dy, *mask):
        # state goes through vjp (its cotangent is dropped) so that modules
        # which check trace levels (flax.nnx) may update it; dy takes y's
        # dtype for libraries whose bf16 output comes out float32.
        y, vjp, new_state = jax.vjp(
            lambda *a: apply(*a, True, *mask), x, params, state, has_aux=True
        )
        dx, dparams, _ = vjp(dy.astype(y.dtype))
        return (y, dx), (dparams, new_state)

    return step


def _inference_step(apply: Callable) -> Callable:
    def step(x, params, state):
        return (apply(x, params, state, False)[0],), ()

    return step


class Mode(NamedTuple):
    title: str  # of its timing table
    label: str  # in the traffic section
    step: Callable[[Callable], Callable]  # apply -> step


MODES = {
    "train": Mode("train forward (y + new running stats)", "train", _train_step),
    "fwdbwd": Mode(
        "forward+backward (y, dx, dscale, dbias; dy an argument)", "fwd+bwd", _fwdbwd_step
    ),
    "inference": Mode("inference", "infer", _inference_step),
}


# ---------------------------------------------------------------------------
# JAX models: builder(spec, axis_name) -> (apply, params, state) with
# apply(x, params, state, training, mask=None) -> (y, new_state); a builder whose
# library takes no mask has no mask parameter.


def _jaxbn_model(spec: Spec, axis_name: str | None = None):
    def apply(x, params, state, training, mask=None):
        return jaxbn.batch_norm(
            x,
            params,
            state,
            training=training,
            axis=spec.axis,
            axis_name=axis_name,
            dtype=spec.jnp_dtype,
            mask=mask,
        )

    return (apply, *jaxbn.batch_norm_init(spec.channels))


def _linen_model(module_class: type, spec: Spec, axis_name: str | None = None, **fields):
    module = module_class(axis=spec.axis, dtype=spec.jnp_dtype, axis_name=axis_name, **fields)
    variables = module.init(
        jax.random.key(0), jnp.zeros(spec.array_shape), use_running_average=True
    )

    def apply(x, params, state, training, mask=None):
        y, updates = module.apply(
            {"params": params, "batch_stats": state},
            x,
            use_running_average=not training,
            mask=mask,
            mutable=["batch_stats"],
        )
        return y, updates["batch_stats"]

    return apply, variables["params"], variables["batch_stats"]


def _nnx_model(spec: Spec, axis_name: str | None = None):
    from flax import nnx

    module = nnx.BatchNorm(
        spec.channels, axis=spec.axis, dtype=spec.jnp_dtype, axis_name=axis_name, rngs=nnx.Rngs(0)
    )
    graphdef, params, state = nnx.split(module, nnx.Param, nnx.BatchStat)

    def apply(x, params, state, training, mask=None):
        module = nnx.merge(graphdef, params, state)
        y = module(x, use_running_average=not training, mask=mask)
        return y, nnx.state(module, nnx.BatchStat)

    return apply, params, state


def _equinox_model(spec: Spec, axis_name: str | None = None):
    """equinox normalizes one example of shape (C, ...) under vmap: NCHW maps the
    batch; NHWC maps N, H and W (an example is then one C-vector)."""
    import equinox as eqx

    names = ("batch",) if spec.layout == "NCHW" else ("n", "h", "w")
    module, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        spec.channels, axis_name=names, mode="batch", momentum=0.99, eps=1e-5
    )
    params, static = eqx.partition(module, eqx.is_array)

    def apply(x, params, state, training):
        fn = functools.partial(eqx.combine(params, static), inference=not training)
        for name in reversed(names):
            fn = jax.vmap(fn, in_axes=(0, None), out_axes=(0, None), axis_name=name)
        return fn(x, state)

    return apply, params, state


def _haiku_model(spec: Spec, axis_name: str | None = None):
    """haiku creates its parameters in the input's dtype: they are created in
    float32 here and the bf16 rows pass them as such."""
    import haiku as hk

    data_format = "channels_last" if spec.layout == "NHWC" else "channels_first"
    model = hk.transform_with_state(
        lambda x, training: hk.BatchNorm(
            True,
            True,
            decay_rate=0.99,
            eps=1e-5,
            data_format=data_format,
            cross_replica_axis=axis_name,
        )(x, training)
    )
    params, state = model.init(jax.random.key(0), jnp.zeros(spec.array_shape), True)

    def apply(x, params, state, training):
        return model.apply(params, state, None, x, training)

    return apply, params, state


# ---------------------------------------------------------------------------
# Cases: builder(spec) -> Case.


@functools.lru_cache(maxsize=2)
def _data(shape: tuple[int, ...], layout: str) -> tuple[np.ndarray, np.ndarray]:
    """x and dy in float32, the same values in both layouts."""
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    if layout == "NCHW":
        x, dy = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for a in (x, dy))
    return x + 1.0, dy


def _jax_case(fn: Callable, args: tuple) -> Case:
    compiled = jax.jit(fn).lower(*args).compile()
    return Case(lambda: jax.block_until_ready(compiled(*args)), compiled)


def _bn_case(model: Callable, spec: Spec) -> Case:
    apply, params, state = model(spec)
    if spec.mask_array is not None and "mask" not in inspect.signature(apply).parameters:
        return Case(None, note="takes no mask")
    x, dy = (jnp.asarray(a, spec.jnp_dtype) for a in _data(spec.shape, spec.layout))
    args = (x, params, state, dy) if spec.mode == "fwdbwd" else (x, params, state)
    mask = () if spec.mask_array is None else (jnp.asarray(spec.mask_array),)
    return _jax_case(MODES[spec.mode].step(apply), args + mask)


def _copy_case(spec: Spec) -> Case:
    x = jnp.asarray(_data(spec.shape, spec.layout)[0], spec.jnp_dtype)
    return _jax_case(lambda x: ((x * 1.0001,), ()), (x,))


def _torch_tensors(spec: Spec):
    """torch, its device and sync, and x and dy as NCHW tensors (channels_last
    memory for the NHWC layout) on the device JAX uses, if torch has it."""
    import torch

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    x, dy = (
        torch.from_numpy(a).to(device, getattr(torch, spec.dtype))
        for a in _data(spec.shape, spec.layout)
    )
    if spec.layout == "NHWC":  # a permuted NHWC buffer is a channels_last NCHW tensor
        x, dy = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    return torch, device, sync, x, dy


def _torch_case(spec: Spec) -> Case:
    if spec.mask_array is not None:
        return Case(None, note="takes no mask")
    torch, device, sync, x, dy = _torch_tensors(spec)
    bn = torch.nn.BatchNorm2d(spec.channels, eps=1e-5, momentum=0.01, device=device)
    bn.train(spec.mode != "inference")
    if spec.mode == "fwdbwd":
        x.requires_grad_(True)

        def compute():
            y = bn(x)
            return (y, *torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)), ()
    else:

        @torch.no_grad()
        def compute():
            return (bn(x),), ()

    return _torch_run(compute, sync)


def _torch_copy_case(spec: Spec) -> Case:
    _, _, sync, x, _ = _torch_tensors(spec)
    return _torch_run(lambda: ((x.clone(),), ()), sync)


def _torch_run(compute: Callable, sync: Callable) -> Case:
    def run():
        out = compute()
        sync()
        return out

    return Case(run)


# JAX batch norms: name -> (library for --libs, model builder).
MODELS: dict[str, tuple[str, Callable]] = {
    "jaxbn": ("jaxbn", _jaxbn_model),
    "jaxbn.linen": ("jaxbn", functools.partial(_linen_model, jaxbn.linen.BatchNorm)),
    FLAX: ("flax", functools.partial(_linen_model, nn.BatchNorm)),
    "flax.linen two-pass": (
        "flax",
        functools.partial(_linen_model, nn.BatchNorm, use_fast_variance=False),
    ),
    "flax.nnx": ("nnx", _nnx_model),
    "equinox": ("equinox", _equinox_model),
    "haiku": ("haiku", _haiku_model),
}
# Every row: name -> (library for --libs, case builder), in the order printed.
IMPLEMENTATIONS: dict[str, tuple[str, Callable[[Spec], Case]]] = {
    **{
        name: (library, functools.partial(_bn_case, model))
        for name, (library, model) in MODELS.items()
    },
    TORCH: ("torch", _torch_case),
    COPY: ("copy", _copy_case),
    "copy: torch clone": ("copy", _torch_copy_case),
}
LIBRARIES = sorted({library for library, _ in IMPLEMENTATIONS.values()})
COLLECTIVE_MODELS = ("jaxbn", FLAX, "flax.linen two-pass")
JIT_MAPPINGS = ("jit-sharded", "jit-auto")  # plain jit (no axis name) over explicit / Auto axes


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:90]


def build(name: str, spec: Spec) -> Case:
    """Builds, compiles and warms up one implementation; failures become a note.

    Args:
      name: a key of :data:`IMPLEMENTATIONS`.
      spec: what to compute.

    Returns:
      The case; its ``run`` is None (and ``note`` says why) when it cannot run.
    """
    try:
        case = IMPLEMENTATIONS[name][1](spec)
        if case.run is None:  # (what it cannot compute: its note says why)
            return case
        for _ in range(2):
            y = case.run()[0][0]
    except ModuleNotFoundError as error:
        return Case(None, note=f"{error.name} not installed")
    except Exception as error:  # a library that breaks is a result, not a crash
        return Case(None, note="error: " + _short(error))
    out = str(y.dtype).removeprefix("torch.")
    if out != spec.dtype:
        case.note = f"output {out}"
    if name.startswith("torch"):
        case.note = ("channels_last " if spec.layout == "NHWC" else "contiguous ") + case.note
    return case


# ---------------------------------------------------------------------------
# Timing and printing.


def time_interleaved(runs: dict[Any, Callable[[], Any]], reps: int) -> dict[Any, np.ndarray]:
    """Times each callable ``reps`` times, interleaved.

    Each repetition (round) calls every callable once, in a fresh random order
    (seeded): drifts in machine load spread over all of them, and no callable
    always follows the same one (a call right after PyTorch's runs while its
    OpenMP threads still spin, and the other way round).

    Args:
      runs: callables that compute and wait for their result.
      reps: repetitions.

    Returns:
      Seconds per call, ``reps`` of them per key.
    """
    keys = list(runs)
    times: dict[Any, list[float]] = {key: [] for key in keys}
    rng = np.random.default_rng(0)
    for _ in range(reps):
        for index in rng.permutation(len(keys)):
            start = time.perf_counter()
            runs[keys[index]]()
            times[keys[index]].append(time.perf_counter() - start)
    return {key: np.asarray(value) for key, value in times.items()}


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """Prints a titled table, columns separated by at least two spaces.

    The first column and a last ``note`` column are left-aligned, the others
    right-aligned.
    """
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    left = {0, len(headers) - 1} if headers[-1] == "note" else {0}
    print(f"\n## {title}")
    for row in cells:
        line = [
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        print("  ".join(line).rstrip())


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def _bandwidth(case: Case, median: float, copy: Case | None, copy_median: float | None) -> str:
    """Bytes per second (HLO traffic / median time) as a fraction of the jitted copy's."""
    if case.traffic is None or copy is None or copy.traffic is None or not copy_median:
        return "-"
    return f"{(case.traffic / median) / (copy.traffic / copy_median):.2f}"


def _timing_rows(cases: dict[tuple[str, str], Case], times: dict) -> list[list[Any]]:
    medians = {key: float(np.median(value)) for key, value in times.items()}
    rows = []
    for (name, layout), case in cases.items():
        if case.run is None:
            rows.append([name, layout, "-", "-", "-", "-", "-", "-", "-", case.note])
            continue
        median, ms = medians[name, layout], times[name, layout] * 1e3
        copy_median = medians.get((COPY, layout))
        rows.append(
            [
                name,
                layout,
                f"{median * 1e3:.3f}",
                f"{ms.min():.3f}",
                f"{ms.max():.3f}",
                _ratio(median, medians.get((FLAX, layout))),
                _ratio(median, medians.get((TORCH, "NHWC"))),
                _ratio(median, copy_median),
                _bandwidth(case, median, cases.get((COPY, layout)), copy_median),
                case.note,
            ]
        )
    return rows


def _traffic(compiled: Any, spec: Spec) -> tuple[float, list[str]]:
    """The traffic of a compiled executable in units of S, and its ``traffic kernels temp`` cells."""
    size = np.prod(spec.shape) * jnp.dtype(spec.jnp_dtype).itemsize
    traffic, kernels = memory_traffic(compiled.as_text())
    temp = compiled.memory_analysis().temp_size_in_bytes
    return traffic / size, [f"{traffic / size:.2f}S", str(kernels), f"{temp / size:.2f}S"]


def run_timings(args: argparse.Namespace, names: list[str]) -> dict:
    """Builds, times and prints one table per (mode, dtype); returns the traffic cells.

    Returns:
      ``{(name, dtype, layout): {mode: [traffic, kernels, temp]}}`` for the JAX rows.
    """
    traffic: dict[tuple[str, str, str], dict[str, list[str]]] = {}
    for mode, (title, _, _) in MODES.items():
        for dtype in args.dtypes:
            cases = {}
            for layout in args.layouts:
                spec = Spec(mode, dtype, layout, tuple(args.shape), args.mask)
                for name in names:
                    case = cases[name, layout] = build(name, spec)
                    if case.compiled is not None:
                        case.traffic, cells = _traffic(case.compiled, spec)
                        traffic.setdefault((name, dtype, layout), {})[mode] = cells
                        case.compiled = None
            times = time_interleaved(
                {key: case.run for key, case in cases.items() if case.run}, args.reps
            )
            print_table(
                f"{title}, {dtype}: ms per call over {args.reps} interleaved reps",
                [
                    "implementation",
                    "layout",
                    "median",
                    "min",
                    "max",
                    f"/{FLAX}",
                    "/torch CL",
                    "/copy",
                    "BW/copy",
                    "note",
                ],
                _timing_rows(cases, times),
            )
    return traffic


def print_traffic(traffic: dict) -> None:
    """Prints the HLO traffic section from :func:`run_timings`' cells."""
    headers = ["implementation", "dtype", "layout"]
    for label in (mode.label for mode in MODES.values()):
        headers += [f"{label} traffic", f"{label} kernels", f"{label} temp"]
    rows = [
        [name, dtype, layout] + [cell for mode in MODES for cell in cells.get(mode, ["-"] * 3)]
        for (name, dtype, layout), cells in traffic.items()
    ]
    print_table(
        "HLO traffic per call in S (bytes of x in its dtype: operands + outputs of each kernel; conditionals at their cheapest branch, loops at zero trips), "
        "kernels, compiled temp memory in S",
        headers,
        rows,
    )


# ---------------------------------------------------------------------------
# Collectives (the --collectives-only subprocess, on 8 forced CPU devices).


def _mapped(mapping: str, model: Callable, spec: Spec):
    """The step of ``spec.mode`` under ``mapping``, and abstract arguments for it."""
    n = len(jax.devices())
    # jit over a mesh of explicit axes (jax.make_mesh's default: sharding in types) or Auto ones
    auto = (jax.sharding.AxisType.Auto,) if mapping == "jit-auto" else None
    mesh = jax.make_mesh((n,), ("batch",), axis_types=auto)
    apply, params, state = model(spec, axis_name=None if mapping in JIT_MAPPINGS else "batch")
    step = MODES[spec.mode].step(apply)
    with_dy = spec.mode == "fwdbwd"
    shape = spec.array_shape
    if mapping == "pmap":
        x = jax.ShapeDtypeStruct((n, shape[0] // n, *shape[1:]), spec.jnp_dtype)
        in_axes = (0, None, None, 0)[: 3 + with_dy]
        return jax.pmap(step, axis_name="batch", in_axes=in_axes), (x, params, state, x)[
            : 3 + with_dy
        ]
    sharding = NamedSharding(mesh, P("batch"))
    x = jax.ShapeDtypeStruct(shape, spec.jnp_dtype, sharding=sharding)
    params, state = jax.device_put((params, state), NamedSharding(mesh, P()))
    args = (x, params, state, x)[: 3 + with_dy]
    if mapping == "shard_map":
        step = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P("batch"), P(), P(), P("batch"))[: 3 + with_dy],
            out_specs=(P("batch"), P()),
        )
    return jax.jit(step), args


def _collectives(name: str, mapping: str, mode: str, shape: tuple[int, ...]) -> dict[str, int]:
    """The collectives one execution of the compiled step runs, by opcode (those it runs).

    A conditional counts at its cheapest branch and a loop at zero trips: the steady state skips the
    re-shift, and XLA may sink a collective into both branches of a test.
    """
    fn, args = _mapped(mapping, MODELS[name][1], Spec(mode, "float32", "NHWC", shape))
    text = fn.lower(*args).compile().as_text()
    counts = {op: count_per_execution(text, op) for op in ("all-reduce", *COLLECTIVE_OPS)}
    return {op: count for op, count in counts.items() if count}


def print_collectives(shape: tuple[int, ...]) -> None:
    """Prints the collectives per direction of jaxbn and flax.linen on all devices."""
    n = len(jax.devices())
    shape = (-(-shape[0] // n) * n, *shape[1:])  # a batch that splits evenly
    rows, errors = [], []
    for name in COLLECTIVE_MODELS:
        for mapping in ("pmap", "shard_map", *JIT_MAPPINGS):
            try:
                fwd, both = (
                    _collectives(name, mapping, mode, shape) for mode in ("train", "fwdbwd")
                )
                kinds = ", ".join(f"{count} {op}" for op, count in both.items()) or "none"
                total = sum(fwd.values()), sum(both.values())
                rows.append([name, mapping, total[0], total[1], total[1] - total[0], kinds])
            except Exception as error:  # a mapping a library cannot take is a result
                rows.append([name, mapping, "error", "-", "-", "-"])
                errors.append(f"{name} under {mapping}: {_short(error)}")
    print_table(
        f"collectives per direction on {n} {jax.devices()[0].platform} devices, float32 NHWC "
        f"{shape} (compiled HLO, per execution: conditionals at their cheapest branch, loops at "
        "zero trips; jit-sharded: a mesh of explicit axes, jit-auto: of Auto axes)",
        ["implementation", "mapping", "train fwd", "fwd+bwd", "bwd", "which (fwd+bwd)"],
        rows,
    )
    for line in errors:
        print("  " + line)


def run_collectives_subprocess(shape: tuple[int, ...]) -> int:
    """Runs :func:`print_collectives` in a child with 8 forced host devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
    )
    command = [sys.executable, __file__, "--collectives-only", "--shape", *map(str, shape)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode:
        print(f"collectives subprocess failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.returncode


# ---------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_header(args: argparse.Namespace) -> None:
    """Prints versions, device, CPUs, shape, allocator settings and the command."""
    versions = ", ".join(
        f"{name} {_version(dist)}"
        for name, dist in [
            ("jaxbn", "jaxbn"),
            ("jax", "jax"),
            ("jaxlib", "jaxlib"),
            ("flax", "flax"),
            ("equinox", "equinox"),
            ("haiku", "dm-haiku"),
            ("torch", "torch"),
        ]
    )
    device = jax.devices()[0]
    try:
        import torch

        torch_threads = f", torch threads {torch.get_num_threads()}"
    except ModuleNotFoundError:
        torch_threads = ""
    try:
        thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    n, h, w, c = args.shape
    print("# jaxbn benchmark")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"versions: {versions}")
    print(
        f"device: {device.platform} {device.device_kind} (x{jax.device_count()}), "
        f"CPUs {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}){torch_threads}"
    )
    print(
        f"shape: NHWC {tuple(args.shape)} / NCHW {(n, c, h, w)}, S = {n * h * w * c * 4 / 2**20:.2f} MiB "
        f"float32, {n * h * w * c * 2 / 2**20:.2f} MiB bfloat16; reps {args.reps}"
    )
    print(
        f"allocator: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')} (huge pages; the bench sets it), "
        f"transparent_hugepage {thp}"
    )
    print(
        f"{TORCH} NHWC = a channels_last tensor; /torch CL: ratio to it. bf16: bf16 activations, "
        "float32 params, bf16 output requested"
    )
    if args.mask:
        print(f"mask (training modes): of {args.mask}, 90% valid, an argument of each jitted step")
    if args.compute_dtype_barrier_views:
        print("jaxbn: measuring variant, XLA:CPU's barriers on float32 views of bfloat16 x and dy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=None,
        metavar=("N", "H", "W", "C"),
        help="NHWC shape (default 64 32 32 128; --quick: 8 8 8 16)",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions (default 20; --quick: 3)"
    )
    parser.add_argument(
        "--libs", nargs="+", choices=LIBRARIES, default=LIBRARIES, help="libraries to time"
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="dtypes to time"
    )
    parser.add_argument(
        "--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="layouts to time"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shape and few reps: a smoke test"
    )
    parser.add_argument(
        "--compute-dtype-barrier-views",
        action="store_true",
        help="jaxbn's measuring variant: XLA:CPU's barriers on float32 views of bfloat16 x and dy",
    )
    parser.add_argument(
        "--mask",
        choices=MASKS,
        default=None,
        help="time the training modes with a mask of examples (N, 1, 1, 1), of positions "
        "(N, H, W, 1) or of elements (x's shape)",
    )
    parser.add_argument(
        "--collectives-only",
        action="store_true",
        help="only the collectives section (run with forced host devices)",
    )
    args = parser.parse_args(argv)
    args.shape = tuple(args.shape or ((8, 8, 8, 16) if args.quick else (64, 32, 32, 128)))
    args.reps = args.reps or (3 if args.quick else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (non-zero if a section failed)."""
    args = parse_args(argv)
    if args.collectives_only:
        print_collectives(args.shape)
        return 0
    stats.barrier_views_in_compute_dtype = args.compute_dtype_barrier_views
    print_header(args)
    names = [name for name, (library, _) in IMPLEMENTATIONS.items() if library in args.libs]
    print_traffic(run_timings(args, names))
    return run_collectives_subprocess(args.shape)


def reexec_with_huge_pages() -> None:
    """glibc reads GLIBC_TUNABLES at startup: set it and start this script again."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{HUGE_PAGES}".lstrip(":"))
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    reexec_with_huge_pages()
    sys.exit(main())
