"""Batch-norm accuracy at large offsets: jaxbn, flax (both variance modes), PyTorch.

For float32 inputs with per-channel mean ``offset`` and std 1, prints the
relative error of the batch variance and the absolute error of the normalized
output, both against float64 NumPy on the same float32 values, at the first
training step (running mean 0) — the hardest case for jaxbn, whose shift is
then far off.

    python benchmarks/accuracy.py [--shape 64 8 8 32] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import linen as nn

import jaxbn

OFFSETS = (1e2, 1e3, 1e4, 1e5)


def _reference(x):
    x64 = x.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, var = x64.mean(axes), x64.var(axes)
    return var, (x64 - mean) / np.sqrt(var + 1e-5)


def _jaxbn(x):
    params, state = jaxbn.batch_norm_init(x.shape[-1])
    y, new = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True, momentum=0.0))(x)
    return np.asarray(new["var"]), np.asarray(y)


def _flax(x, fast):
    module = nn.BatchNorm(use_running_average=False, momentum=0.0, use_fast_variance=fast)
    variables = module.init(jax.random.key(0), x[:2])
    y, updates = jax.jit(lambda x: module.apply(variables, x, mutable=["batch_stats"]))(x)
    return np.asarray(updates["batch_stats"]["var"]), np.asarray(y)


def _torch(x):
    import torch

    module = torch.nn.BatchNorm2d(x.shape[-1], momentum=1.0).train()
    nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        y = module(nchw).numpy().transpose(0, 2, 3, 1)
    n = x.size // x.shape[-1]
    return module.running_var.numpy() * (n - 1) / n, y  # torch keeps the unbiased variance


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=(64, 8, 8, 32), metavar=("N", "H", "W", "C")
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    implementations = {
        "jaxbn": _jaxbn,
        "flax (fast variance, default)": lambda x: _flax(x, True),
        "flax (two-pass)": lambda x: _flax(x, False),
    }
    try:
        import torch  # noqa: F401

        implementations["torch BatchNorm2d"] = _torch
    except ImportError:
        pass
    rng = np.random.default_rng(args.seed)
    print(f"jax {jax.__version__}, shape {tuple(args.shape)} NHWC float32, first training step")
    print(f"{'implementation':<30} {'offset':>7} {'var rel. error':>15} {'output abs. error':>18}")
    rows = {}
    for offset in OFFSETS:
        x = (rng.normal(size=args.shape) + offset).astype(np.float32)
        var_ref, y_ref = _reference(x)
        for name, run in implementations.items():
            var, y = run(x)
            var_error = float(np.abs(var.astype(np.float64) / var_ref - 1).max())
            out_error = float(np.abs(y.astype(np.float64) - y_ref).max())
            rows[(name, offset)] = (var_error, out_error)
            print(f"{name:<30} {offset:>7.0e} {var_error:>15.2e} {out_error:>18.2e}")
    return rows


if __name__ == "__main__":
    main()
