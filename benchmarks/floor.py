"""The compile-time floor of exact batch statistics: compile.py's ResNet-50 train step with
guard-free reference BatchNorms, beside jaxbn's and flax's.

Each reference is a linen BatchNorm (``use_running_average=False``, ``momentum``;
``scale`` and ``bias`` parameters, ``mean`` and ``var`` running statistics
averaged in with the momentum) whose statistics take the sums named below over
every axis but the last. Their backward has jaxbn's shape: ``Σ dy`` and
``Σ dy x̂``, then one pass for ``dx`` (written as a ``jax.custom_vjp``, or, in
the forward-mode form, JAX's transpose of the tangent). On XLA:CPU each
statistics sum, and each sum of the ``custom_vjp`` backward, reads its own view
of its operands through jaxbn's ``stats.cpu_barrier``, as in jaxbn, so that each
is a library reduction.

- ``two passes``: the batch mean, then the centred squares: the textbook exact
  two-pass algorithm (no shift, no scaling).
- ``three sums``: jaxbn's sums and nothing else: around the batch's first element
  ``K``, ``Σ(x - K)``, then ``Σ(x - K - o)²`` and ``Σ((x - K - o) s)²`` with
  ``o`` the mean minus ``K`` and ``s`` a power of two, the scaled sum taken where
  the other overflows (``docs/internals.md``).
- ``three sums, forward-mode form``: the same as a ``jax.custom_jvp`` whose
  tangent JAX transposes for reverse mode, the form jaxbn's step has.

What the references leave out and jaxbn keeps: a non-finite first element,
values near the dtype's maximum (pass one's power-of-two scale), an infinite or NaN sum,
a variance beyond the dtype (forward and backward), masks, devices, ghost
batches and the running statistics' guards (a non-finite batch leaves them,
a non-finite old statistic is replaced). So the ratios bound from below what
exact statistics cost in this step; jaxbn's excess over them is its guards.

Measured for each variant, in one process (a fresh ``jax.jit`` of a fresh step
after ``jax.clear_caches()``, the variants in alternating order): lower and
compile wall time (median of ``--reps``) and the compiled HLO's instructions
and fusions, with ratios to flax's; and, a guard for the benchmark itself, each
compiled step's loss from the same variables and batch, which must agree with
flax's (the exit status is 1 where one does not).

    python benchmarks/floor.py [--reps 5] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import compile as compile_bench  # noqa: E402
from benchmarks.bench import reexec_with_huge_pages  # noqa: E402
from jaxbn import stats  # noqa: E402

EPSILON = 1e-5


def _count(x: jax.Array, axes: tuple[int, ...]) -> int:
    """The number of elements each statistic is taken over."""
    return int(np.prod([x.shape[i] for i in axes]))


def two_passes(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(mean, var)``: the mean, then the mean of the centred squares."""
    count = _count(x, axes)
    (first,) = stats.cpu_barrier(x)
    mean = jnp.sum(first, axes) / count
    (second,) = stats.cpu_barrier(first)
    return mean, jnp.sum(jnp.square(second - mean), axes) / count


def three_sums(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(mean, var)`` from jaxbn's three sums around the first element, without guards."""
    count = _count(x, axes)
    half = (jnp.finfo(x.dtype).maxexp - 1) // 2  # half the greatest exponent (float32: 63)
    shift = x[(0,) * len(axes)]
    (first,) = stats.cpu_barrier(x)
    offset = jnp.sum(first - shift, axes) / count
    (second,) = stats.cpu_barrier(first)
    squares = jnp.sum(jnp.square(second - shift - offset), axes)
    (scaled,) = stats.cpu_barrier(second)
    scaled = jnp.sum(jnp.square((scaled - shift - offset) * 2.0 ** -(half + 3)), axes)
    overflow = squares == jnp.inf
    squares = jnp.where(overflow, scaled, squares)
    unscale = jnp.where(overflow, 2.0 ** (half + 3), 1.0)
    return shift + offset, squares / count * unscale * unscale


def normalize(statistics_of, x, scale, bias) -> tuple:
    """``((y, mean, var), residuals)``: ``x`` (features last) normalized with
    ``statistics_of(x, axes)``, times ``scale`` plus ``bias``."""
    axes = tuple(range(x.ndim - 1))
    mean, var = statistics_of(x, axes)
    inv_std = lax.rsqrt(var + EPSILON)
    return ((x - mean) * (inv_std * scale) + bias, mean, var), (x, mean, inv_std, scale)


def normalize_backward(residuals, dy) -> tuple:
    """``(dx, dscale, dbias)`` of the normalization: two sums, then one pass."""
    x, mean, inv_std, scale = residuals
    axes = tuple(range(x.ndim - 1))
    count = _count(x, axes)
    (dy_first,) = stats.cpu_barrier(dy)
    sum_dy = jnp.sum(dy_first, axes)
    dy_second, x_view = stats.cpu_barrier(dy_first, x)
    sum_dy_xhat = jnp.sum(dy_second * (x_view - mean) * inv_std, axes)
    x_hat = (x - mean) * inv_std
    dx = (scale * inv_std) * (dy - sum_dy / count - x_hat * (sum_dy_xhat / count))
    return dx, sum_dy_xhat, sum_dy


def reverse_mode_form(statistics_of):
    """``f(x, scale, bias) -> (y, mean, var)`` as a ``jax.custom_vjp`` (statistics: no gradient)."""

    @jax.custom_vjp
    def normalized(x, scale, bias):
        return normalize(statistics_of, x, scale, bias)[0]

    def forward(x, scale, bias):
        return normalize(statistics_of, x, scale, bias)

    def backward(residuals, cotangents):
        return normalize_backward(residuals, cotangents[0])

    normalized.defvjp(forward, backward)
    return normalized


def forward_mode_form(statistics_of):
    """The same as a ``jax.custom_jvp``: ``dy = g dx - g mean(dx) - x̂ g mean(x̂ dx) + x̂ dγ + dβ``."""

    @jax.custom_jvp
    def normalized(x, scale, bias):
        return normalize(statistics_of, x, scale, bias)[0]

    @normalized.defjvp
    def tangent(primals, tangents):
        x, scale, bias = primals
        dx, dscale, dbias = tangents
        (y, mean, var), (_, _, inv_std, _) = normalize(statistics_of, x, scale, bias)
        axes = tuple(range(x.ndim - 1))
        count = _count(x, axes)
        x_hat = (x - mean) * inv_std
        gain = scale * inv_std
        sum_dx, sum_dx_xhat = jnp.sum(dx, axes), jnp.sum(x_hat * dx, axes)
        dy = gain * (dx - sum_dx / count - x_hat * (sum_dx_xhat / count)) + x_hat * dscale + dbias
        return (y, mean, var), (dy, jnp.zeros_like(mean), jnp.zeros_like(var))

    return normalized


def reference_batch_norm(normalized) -> type[nn.Module]:
    """A linen BatchNorm (flax's fields and variables) that normalizes with ``normalized``."""

    class ReferenceBatchNorm(nn.Module):
        use_running_average: bool = False
        momentum: float = 0.99

        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            features = x.shape[-1]
            scale = self.param("scale", nn.initializers.ones, (features,))
            bias = self.param("bias", nn.initializers.zeros, (features,))
            mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
            var = self.variable("batch_stats", "var", jnp.ones, (features,))
            y, batch_mean, batch_var = normalized(x, scale, bias)
            if not self.is_initializing():
                for running, batch in ((mean, batch_mean), (var, batch_var)):
                    update = lax.stop_gradient(batch)
                    running.value = self.momentum * running.value + (1 - self.momentum) * update
            return y

    return ReferenceBatchNorm


#: the reference BatchNorms, by the name the tables print.
REFERENCES = {
    "two passes": reference_batch_norm(reverse_mode_form(two_passes)),
    "three sums": reference_batch_norm(reverse_mode_form(three_sums)),
    "three sums, forward-mode form": reference_batch_norm(forward_mode_form(three_sums)),
}
VARIANTS = ("flax", *REFERENCES, "jaxbn")


def run(widths: tuple[int, ...], blocks: tuple[int, ...], reps: int) -> dict[str, dict[str, Any]]:
    """Lowers and compiles every variant's step ``reps`` times; returns medians, counts, ratios."""
    compile_bench.LINEN_NORMS.update(REFERENCES)  # (compile.py's model picks its norm by name)
    models = {name: compile_bench.build_linen(name, widths, blocks) for name in VARIANTS}
    for model in models.values():  # untimed: first-call costs of Python code
        jax.jit(model.make_step()).lower(*model.args)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    counts, executables = {}, {}
    for rep in range(reps):
        for name in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            lower_s, compile_s, _, compiled = compile_bench.measure_compile(models[name])
            times[name].append((lower_s, compile_s))
            counts[name] = compile_bench.hlo_instructions(compiled.as_text())
            executables[name] = compiled
            print(
                f"  rep {rep + 1}/{reps} {name}: lower {lower_s:.3f} s, compile {compile_s:.3f} s"
            )
    results = {}
    for name in VARIANTS:
        results[name] = {
            "lower_s": statistics.median(lower for lower, _ in times[name]),
            "compile_s": statistics.median(compile_s for _, compile_s in times[name]),
            "instructions": sum(counts[name].values()),
            "fusions": counts[name]["fusion"],
            "loss": float(executables[name](*models[name].args)[-1]),  # one step, same start
        }
    for row in results.values():  # a guard for the benchmark: every variant computes flax's step
        loss = results["flax"]["loss"]
        row["loss_agrees"] = abs(row["loss"] - loss) <= compile_bench.LOSS_RTOL * abs(loss)
        keys = ("lower_s", "compile_s", "instructions", "fusions")
        row["ratios"] = {key: row[key] / results["flax"][key] for key in keys}
    compile_bench.print_table(
        f"train step (linen, {models['flax'].batch_norms} BatchNorms): lower and compile "
        f"(median s of {reps}), compiled HLO; ratios to flax",
        ["norm", "lower", "compile", "HLO instructions", "fusions", "loss (1 step)"],
        [
            [name]
            + [f"{row[key]:.3f} ({row['ratios'][key]:.2f}x)" for key in ("lower_s", "compile_s")]
            + [f"{row[key]} ({row['ratios'][key]:.2f}x)" for key in ("instructions", "fusions")]
            + [f"{row['loss']:.6f}" + ("" if row["loss_agrees"] else " (DIFFERS from flax's)")]
            for name, row in results.items()
        ],
    )
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the comparison; ``argv`` as the command line (None: ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 5; --quick: 1)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results to this file")
    parser.add_argument(
        "--quick", action="store_true", help="compile.py --quick's model (17 BatchNorms), 1 rep"
    )
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    if reps < 1:
        parser.error("--reps must be >= 1")
    divisor, blocks = (16, (1, 1, 1, 1)) if args.quick else (1, compile_bench.BLOCKS)
    widths = tuple(max(1, width // divisor) for width in compile_bench.WIDTHS)
    results = run(widths, blocks, reps)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    reexec_with_huge_pages()
    sys.exit(0 if all(row["loss_agrees"] for row in main().values()) else 1)
