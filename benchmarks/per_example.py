"""Per-example norms: jaxbn's layer, RMS and group norm beside flax.linen's, in one run.

For each norm and dtype, on one channels-last activation (by default a transformer's ``(batch,
length, features)``, or an image's ``--shape N H W C``; layer and RMS norm over the last axis, group
norm in 32 groups of the last axis, over each group and all axes but the first): the jitted
forward and forward+backward (``jax.vjp`` with ``dy`` an argument), timed interleaved
(``bench.time_interleaved``: every variant once per repetition, in a fresh random order), with
the median in ms, the ratio to flax and each compiled program's HLO traffic in units of S (the
bytes of ``x``). Parameters are in the activation's dtype, so outputs are too. With ``--masked``,
both libraries take the same full-size mask (each element valid with probability 0.9).

A guard for the benchmark itself: jaxbn's output must agree with flax's (to 1e-4 of the output's
scale in float32, 4e-2 in bfloat16); the exit status is 1 where one does not.

    python benchmarks/per_example.py [--shape 8 512 768] [--dtypes float32 bfloat16] [--reps 50]
                                     [--norms ...] [--masked] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import jaxbn  # noqa: E402
from benchmarks.bench import print_table, reexec_with_huge_pages, time_interleaved  # noqa: E402
from tests.hlo import memory_traffic  # noqa: E402

GROUPS = 32
#: ``(jaxbn's call, flax's module, its parameters)`` per norm; group norm's groups divide features
NORMS: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "layer_norm": (jaxbn.layer_norm, nn.LayerNorm, ("scale", "bias")),
    "rms_norm": (jaxbn.rms_norm, nn.RMSNorm, ("scale",)),
    "group_norm": (
        lambda x, p, mask=None: jaxbn.group_norm(x, p, num_groups=GROUPS, mask=mask),
        lambda **kw: nn.GroupNorm(num_groups=GROUPS, **kw),
        ("scale", "bias"),
    ),
}
TOLERANCE = {"float32": 1e-4, "bfloat16": 4e-2}


def _programs(norm: str, dtype: Any, x: jax.Array, mask: Any) -> dict[str, tuple[Callable, tuple]]:
    """``{implementation: (forward, its arguments)}``; ``forward(x, params)`` returns ``y``."""
    ours, module_class, names = NORMS[norm]
    module = module_class(dtype=dtype, param_dtype=dtype)
    variables = module.init(jax.random.key(0), x)
    rng = np.random.default_rng(1)
    params = {
        key: jnp.asarray(1 + 0.1 * rng.normal(size=x.shape[-1]), dtype)
        if key == "scale"
        else jnp.asarray(0.1 * rng.normal(size=x.shape[-1]), dtype)
        for key in names
    }
    variables = {"params": {key: params[key] for key in variables["params"]}}
    return {
        "jaxbn": (lambda x, p: ours(x, p, mask=mask), params),
        "flax": (lambda x, v: module.apply(v, x, mask=mask), variables),
    }


def _with_backward(forward: Callable) -> Callable:
    def run(x, p, dy):
        y, vjp = jax.vjp(forward, x, p)
        return y, vjp(dy)

    return run


def measure(
    norm: str, dtype_name: str, shape: tuple[int, ...], reps: int, masked: bool = False
) -> dict[str, Any]:
    """Times, traffic and the agreement of jaxbn's output with flax's for one norm and dtype."""
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + rng.normal(size=shape), dtype)
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    size = x.size * dtype.itemsize
    runs, traffic, outputs = {}, {}, {}
    mask = jnp.asarray(rng.random(shape) < 0.9) if masked else None
    for name, (forward, params) in _programs(norm, dtype, x, mask).items():
        for mode, fn, args in (
            ("forward", forward, (x, params)),
            ("forward+backward", _with_backward(forward), (x, params, dy)),
        ):
            compiled = jax.jit(fn).lower(*args).compile()
            traffic[mode, name] = memory_traffic(compiled.as_text())[0] / size
            jax.block_until_ready(compiled(*args))  # warm
            runs[mode, name] = lambda compiled=compiled, args=args: jax.block_until_ready(
                compiled(*args)
            )
        outputs[name] = np.asarray(jax.jit(forward)(x, params), np.float64)
    times = time_interleaved(runs, reps)
    medians = {key: float(np.median(value)) for key, value in times.items()}
    error = float(np.max(np.abs(outputs["jaxbn"] - outputs["flax"])))
    scale = float(np.max(np.abs(outputs["flax"])))
    return {
        "norm": norm,
        "dtype": dtype_name,
        "shape": list(shape),
        "masked": masked,
        "ms": {f"{mode} {name}": value * 1e3 for (mode, name), value in medians.items()},
        "ratio": {
            mode: medians[mode, "jaxbn"] / medians[mode, "flax"]
            for mode in ("forward", "forward+backward")
        },
        "traffic_S": {f"{mode} {name}": value for (mode, name), value in traffic.items()},
        "max_abs_difference": error,
        "agrees": error <= TOLERANCE[dtype_name] * max(scale, 1.0),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", help="channels last, at least 2 axes")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(TOLERANCE))
    parser.add_argument("--norms", nargs="+", choices=sorted(NORMS))
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 50; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="shape 2 8 64, 3 reps: a smoke test")
    parser.add_argument("--masked", action="store_true", help="a full-size mask, 90%% valid")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.shape = tuple(args.shape or ((2, 8, 64) if args.quick else (8, 512, 768)))
    args.reps = args.reps or (3 if args.quick else 50)
    args.dtypes = args.dtypes or ["float32", "bfloat16"]
    args.norms = args.norms or list(NORMS)
    if len(args.shape) < 2:
        parser.error(f"--shape: at least 2 axes (a batch and the channels), got {args.shape}")
    if args.shape[-1] % GROUPS:
        parser.error(f"--shape: the features ({args.shape[-1]}) must divide into {GROUPS} groups")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs and prints the benchmark; returns one result per (norm, dtype)."""
    args = parse_args(argv)
    print("# jaxbn per-example norms beside flax.linen")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(
        f"versions: jax {jax.__version__}, jaxbn {jaxbn.__version__}, backend {jax.default_backend()}"
    )
    masked = ", a full-size mask (90% valid)" if args.masked else ""
    print(f"shape {args.shape}{masked}, {args.reps} interleaved reps; ms per call, medians")
    results = [
        measure(norm, dtype, args.shape, args.reps, args.masked)
        for norm in args.norms
        for dtype in args.dtypes
    ]
    rows = [
        [
            r["norm"],
            r["dtype"],
            *(
                cell
                for mode in ("forward", "forward+backward")
                for cell in (
                    f"{r['ms'][f'{mode} jaxbn']:.3f}",
                    f"{r['ms'][f'{mode} flax']:.3f}",
                    f"{r['ratio'][mode]:.2f}",
                    f"{r['traffic_S'][f'{mode} jaxbn']:.1f}S / {r['traffic_S'][f'{mode} flax']:.1f}S",
                )
            ),
            "yes" if r["agrees"] else f"NO ({r['max_abs_difference']:.2e})",
        ]
        for r in results
    ]
    headers = ["norm", "dtype", "fwd jaxbn", "fwd flax", "ratio", "traffic jaxbn / flax"]
    headers += ["fwd+bwd jaxbn", "fwd+bwd flax", "ratio", "traffic jaxbn / flax", "agrees"]
    print_table("per-example norms, jaxbn / flax.linen", headers, rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    reexec_with_huge_pages()
    sys.exit(0 if all(result["agrees"] for result in main()) else 1)
