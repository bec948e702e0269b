"""The GPU suite: one command that measures what a device session must record.

    python benchmarks/gpu_suite.py OUT_DIR            # on the GPU machine, from the repository root
    python benchmarks/gpu_suite.py OUT_DIR --smoke    # the same code on CPU with tiny shapes

It writes ``OUT_DIR/gpu_suite.md`` (also printed) and ``OUT_DIR/gpu_suite.json``, both again
after every group, so that a run cut short keeps the groups it finished:

- the environment: devices, driver (``nvidia-smi``), versions, ``XLA_FLAGS``;
- micro benchmarks (``bench.py``): bfloat16 (256, 56, 56, 64) and float32
  (128, 56, 56, 128) NHWC, train forward, forward+backward and inference,
  for jaxbn, flax.linen (both variance modes), flax.nnx, equinox, PyTorch
  (cuDNN, channels_last) and a device copy, with ratios and bandwidth as a
  fraction of the copy's;
- end-to-end train steps (``e2e.py``, jaxbn vs flax.linen vs no norm): a
  CIFAR-size ResNet-20 (3 stages x 3 basic blocks, width 16, 32x32, batch
  128) and a larger ResNet (2 basic blocks per stage, width 64, 112x112,
  batch 128, bfloat16) standing in for ResNet-50 at 224x224, which would
  not fit the 8-minute budget;
- the statistics design against the one it replaced. The default group times
  jaxbn as shipped: two passes around an element of the batch, with no
  data-dependent control flow (pass two's two sums are one reduction, so
  the statistics read x twice). The ``reshift_loop`` group times the
  replaced design (``benchmarks/_reshift_loop.py``: sums around the running
  mean, re-taken in a ``while`` loop while the shift is poor): fewer bytes,
  one fused read for the statistics, but a data-dependent ``while`` per layer,
  a host round trip on XLA:GPU. The first GPU run decides between them (micro:
  jaxbn and the copy; end to end: both models);
- the statistics' narrow-feature rows (where the feature axis holds at most 32
  features, the sums read ``x`` as rows of at least 128 elements: measured on
  XLA:CPU only) against summing the axis as it is: ``narrow`` and
  ``narrow_rows_off`` (``benchmarks/_feature_rows_off.py``) time one bfloat16
  (256, 32, 32, 16) layer each (jaxbn, flax.linen, the copy), and
  ``narrow_rows_off`` the ResNet-20 (16 to 64 features) beside the default
  group's;
- pass two's two sums (the squared deviations and their scaled copy) in one
  reduction over the two stacked, as shipped (XLA:CPU read ``x`` once per
  reduction: measured there only), against two reductions, which a GPU fuses
  into one read: ``pass_two_apart`` (``benchmarks/_pass_two_apart.py``) times
  the micro shapes (jaxbn and the copy) beside the default group's;
- the per-example norms (``per_example.py``): layer, RMS and group norm of a
  (16, 2048, 1024) activation in bfloat16 and float32, forward and
  forward+backward, jaxbn beside flax.linen (``per_example``);
- the default with XLA:GPU's command buffers asked to capture ``while`` and
  conditional ops (``XLA_FLAGS`` ``--xla_gpu_enable_command_buffer``; the suite
  records whether the flag was accepted and the step times);
- batch norm with a mask (``bench.py --mask``): the bfloat16 micro shape with a
  mask of positions, which the statistics weigh as 0 / 1 after writing ``x``
  once with its masked-out elements 0 (measured on XLA:CPU, where the library
  reductions absorb no select; on a GPU the select may fuse into each pass),
  and with a mask of every element, which selects in each pass (``masked``:
  jaxbn, flax.linen, the copy).

Each group of measurements that needs its own environment runs in its own
process (``--group``); a group that fails is recorded with its error and the
rest still run. A group's ``install`` names a module of ``benchmarks/`` whose
``install()`` its process calls before measuring: a private measuring switch
of this suite (the library reads no environment variable for it), which
swaps what ``jaxbn.stats`` computes in that process only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
COMMAND_BUFFER_FLAG = (
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
)

E2E_MODELS = {
    "resnet20": [
        "--batch",
        "128",
        "--width",
        "16",
        "--blocks",
        "3",
        "--image-size",
        "32",
        "--dtype",
        "bfloat16",
    ],
    "resnet_large": [
        "--batch",
        "128",
        "--width",
        "64",
        "--blocks",
        "2",
        "--image-size",
        "112",
        "--dtype",
        "bfloat16",
    ],
}
MICRO = [  # (shape, dtype)
    ((256, 56, 56, 64), "bfloat16"),
    ((128, 56, 56, 128), "float32"),
]
MICRO_LIBS = ["jaxbn", "flax", "nnx", "equinox", "torch", "copy"]
MICRO_NARROW = ((256, 32, 32, 16), "bfloat16")  # 16 features: the statistics' rows apply
PER_EXAMPLE = [((16, 2048, 1024), "bfloat16"), ((16, 2048, 1024), "float32")]  # (shape, dtype)
NARROW_LIBS = ["jaxbn", "flax", "copy"]
MASKS = ["positions", "elements"]  # bench.py --mask, at MICRO's bfloat16 shape


def _plan(smoke: bool) -> dict[str, dict[str, Any]]:
    """The groups of measurements: each runs in one process with its own environment."""
    e2e_reps = ["--quick", "--reps", "2"] if smoke else ["--reps", "30"]
    models = {"resnet20": E2E_MODELS["resnet20"]} if smoke else E2E_MODELS
    e2e = {name: (args if not smoke else []) + e2e_reps for name, args in models.items()}
    micro = [((8, 4, 4, 8), "float32")] if smoke else MICRO
    groups = {
        "default": {"env": {}, "micro": micro, "e2e": e2e},
        # the replaced statistics design, swapped in by its process (smoke: the install's path through the
        # micro benchmark; the e2e code is the default group's)
        "reshift_loop": {
            "env": {},
            "install": "_reshift_loop",
            "micro": micro,
            "micro_libs": ["jaxbn", "copy"],
            "e2e": {} if smoke else e2e,
        },
    }
    # the narrow-feature rows against the axis summed as it is (smoke: the install's path through
    # the micro benchmark)
    narrow = micro[:1] if smoke else [MICRO_NARROW]
    groups["narrow"] = {"env": {}, "micro": narrow, "micro_libs": NARROW_LIBS, "e2e": {}}
    groups["narrow_rows_off"] = {
        "env": {},
        "install": "_feature_rows_off",
        "micro": narrow,
        "micro_libs": NARROW_LIBS,
        "e2e": {} if smoke else {"resnet20": e2e["resnet20"]},
    }
    # pass two's sums as two reductions against the default's one (smoke: the install's path)
    groups["pass_two_apart"] = {
        "env": {},
        "install": "_pass_two_apart",
        "micro": micro,
        "micro_libs": ["jaxbn", "copy"],
        "e2e": {},
    }
    per_example = [((2, 8, 64), "float32")] if smoke else PER_EXAMPLE
    groups["per_example"] = {"env": {}, "micro": [], "e2e": {}, "per_example": per_example}
    if not smoke:
        groups["command_buffers"] = {
            "env": {"XLA_FLAGS": COMMAND_BUFFER_FLAG},
            "micro": [],
            "e2e": e2e,
        }
    # last: a run cut short by the device's time limit loses the least
    masked = micro[:1] if smoke else [MICRO[0]]
    groups["masked"] = {
        "env": {},
        "micro": masked,
        "micro_libs": NARROW_LIBS,
        "masks": MASKS,
        "e2e": {},
    }
    return groups


def _environment() -> dict[str, Any]:
    import importlib.metadata

    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "equinox", "torch", "jaxbn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    return {
        "python": platform.python_version(),
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform} {d.device_kind}" for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "nvidia_smi": smi,
    }


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # e2e's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _captured(function, *args) -> tuple[Any, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = function(*args)
    return result, buffer.getvalue()


def run_group(name: str, group: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """Runs one group in this process (its environment already set); returns its results."""
    if group.get(
        "install"
    ):  # before anything is traced: jaxbn.stats takes its statistics the installed way
        _load(group["install"]).install()
    from jaxbn import stats

    statistics = f"{stats.batch_statistics.__module__}.{stats.batch_statistics.__name__}"
    if stats.batch_statistics.__module__ == stats.__name__:  # (the default design's rows)
        statistics += f", narrow features in rows of {stats.LANES}" if stats.LANES else ", no rows"
        statistics += ", pass two in two reductions" if stats.pass_two_apart else ""
    result: dict[str, Any] = {
        "environment": _environment(),
        "statistics": statistics,
        "micro": [],
        "e2e": {},
        "per_example": [],
    }
    for shape, dtype in group.get("per_example", []):
        norms = _load("per_example")
        for norm in norms.NORMS:
            measured = norms.measure(norm, dtype, shape, 3 if smoke else 30)
            result["per_example"].append(measured)
    if group["micro"]:
        bench = _load("bench")
        libs = ["jaxbn", "copy"] if smoke else group.get("micro_libs", MICRO_LIBS)
        for (shape, dtype), mask in (
            (micro, mask) for micro in group["micro"] for mask in group.get("masks", [None])
        ):
            argv = [
                "--shape",
                *map(str, shape),
                "--reps",
                "3" if smoke else "20",
                "--dtypes",
                dtype,
                "--layouts",
                "NHWC",
                "--libs",
                *libs,
                *(["--mask", mask] if mask else []),
            ]
            args = bench.parse_args(argv)
            names = [n for n, (library, _) in bench.IMPLEMENTATIONS.items() if library in args.libs]

            def micro(args=args, names=names):
                bench.print_header(args)
                bench.print_traffic(bench.run_timings(args, names))

            _, text = _captured(micro)
            row = {"shape": list(shape), "dtype": dtype, "mask": mask, "output": text}
            result["micro"].append(row)
    e2e = _load("e2e")
    for model, argv in group["e2e"].items():
        start = time.perf_counter()
        summary, text = _captured(e2e.main, argv)
        result["e2e"][model] = {
            "argv": argv,
            "median_ms": {norm: 1e3 * seconds for norm, seconds in summary["median_s"].items()},
            "step_ratio": summary.get("step_ratio"),
            "overhead_ratio": summary.get("overhead_ratio"),
            "loss_check_passed": summary["loss_check"]["passed"],
            "wall_s": time.perf_counter() - start,
            "output": text,
        }
    return result


def _markdown(results: dict[str, Any], smoke: bool) -> str:
    lines = [f"# jaxbn GPU suite{' (smoke, CPU)' if smoke else ''}", ""]
    env = next((g["environment"] for g in results.values() if "environment" in g), {})
    lines += [
        f"- devices: {', '.join(env.get('devices', []))}",
        f"- backend: {env.get('backend')}",
        f"- versions: {env.get('versions')}",
        f"- python: {env.get('python')}",
        f"- nvidia-smi: {env.get('nvidia_smi')}",
        "",
    ]
    lines += [
        "## End-to-end train steps (ms per step, median)",
        "",
        "| group | model | jaxbn | flax | none | jaxbn / flax | BN overhead jaxbn / flax |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group, result in results.items():
        if "error" in result:
            lines.append(f"| {group} | error: {result['error']} | | | | | |")
            continue
        for model, row in result["e2e"].items():
            cells = [
                *(row["median_ms"][norm] for norm in ("jaxbn", "flax", "none")),
                row["step_ratio"],
                row["overhead_ratio"],
            ]  # a ratio is None where flax's value is not positive
            lines.append(
                f"| {group} | {model} | "
                + " | ".join("n/a" if v is None else f"{v:.3f}" for v in cells)
                + " |"
            )
    lines += [
        "",
        "`default`: jaxbn as shipped (two-pass statistics, no data-dependent control flow); "
        "`reshift_loop`: the replaced design (sums around the running mean, a `while` re-shift loop per "
        "layer; benchmarks/_reshift_loop.py); `narrow_rows_off`: the default summing a narrow feature "
        "axis as it is (benchmarks/_feature_rows_off.py); `pass_two_apart`: the default with pass two's "
        "two sums in two reductions, not one over the two stacked (benchmarks/_pass_two_apart.py); "
        "`command_buffers`: the default with XLA asked to capture "
        f"while/conditional ops in command buffers (`{COMMAND_BUFFER_FLAG}`).",
        "",
    ]
    lines += [
        f"- statistics of `{group}`: `{result['statistics']}`"
        for group, result in results.items()
        if "statistics" in result
    ]
    lines += [""]
    per_example = [row for result in results.values() for row in result.get("per_example", [])]
    if per_example:
        lines += [
            "## Per-example norms (ms per call, median; benchmarks/per_example.py)",
            "",
            "| norm | dtype | shape | forward jaxbn / flax | ratio | forward+backward jaxbn / flax "
            "| ratio | agrees with flax |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in per_example:
            cells = [
                f"{row['ms'][f'{mode} jaxbn']:.3f} / {row['ms'][f'{mode} flax']:.3f} | "
                f"{row['ratio'][mode]:.2f}"
                for mode in ("forward", "forward+backward")
            ]
            lines.append(
                f"| {row['norm']} | {row['dtype']} | {tuple(row['shape'])} | "
                + " | ".join(cells)
                + f" | {'yes' if row['agrees'] else 'NO'} |"
            )
        lines += [""]
    for group, result in results.items():
        for micro in result.get("micro", []):
            masked = f", a mask of {micro['mask']}" if micro.get("mask") else ""
            lines += [
                f"## Micro: {micro['dtype']} {tuple(micro['shape'])} NHWC{masked} ({group})",
                "",
                "```",
                micro["output"].rstrip(),
                "```",
                "",
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out_dir", type=pathlib.Path, help="where gpu_suite.md and gpu_suite.json go"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, few repetitions (CPU, CI)"
    )
    parser.add_argument(
        "--group", help=argparse.SUPPRESS
    )  # internal: run one group in this process
    args = parser.parse_args(argv)
    plan = _plan(args.smoke)
    if args.group:
        print("GPU_SUITE_RESULT " + json.dumps(run_group(args.group, plan[args.group], args.smoke)))
        return {}
    results: dict[str, Any] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, group in plan.items():
        env = dict(os.environ, **group["env"])
        if "XLA_FLAGS" in group["env"] and os.environ.get("XLA_FLAGS"):
            env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {group['env']['XLA_FLAGS']}"
        command = [
            sys.executable,
            str(pathlib.Path(__file__).resolve()),
            str(args.out_dir),
            "--group",
            name,
        ]
        command += ["--smoke"] if args.smoke else []
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        marked = [line for line in done.stdout.splitlines() if line.startswith("GPU_SUITE_RESULT ")]
        if done.returncode or not marked:
            results[name] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        else:
            results[name] = json.loads(marked[-1].split(" ", 1)[1])
        # written after every group: a run cut short by the device's time limit keeps what it measured
        markdown = _markdown(results, args.smoke)
        (args.out_dir / "gpu_suite.md").write_text(markdown)
        (args.out_dir / "gpu_suite.json").write_text(json.dumps(results, indent=1))
    print(markdown)
    return results


if __name__ == "__main__":
    main()
