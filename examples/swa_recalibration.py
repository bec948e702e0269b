"""Stochastic weight averaging needs new BatchNorm statistics: jaxbn.recalibrate provides them.

SWA (Izmailov et al., 2018) averages the weights of the last epochs. The
averaged network's activations differ from those of any network seen in
training, so the running statistics kept during training no longer describe
them. This script trains the CNN of ``train_digits.py`` on scikit-learn's
bundled digits (nothing downloaded), averages its weights over the last
epochs, and prints the test accuracy of:

- the final network, with its own running statistics;
- the SWA weights with those (stale) running statistics;
- the SWA weights after ``jaxbn.recalibrate`` re-estimated the statistics
  from the training set (PyTorch's ``update_bn`` step),

with the test loss and how far each BatchNorm's running statistics are from
the statistics of its inputs on the test set (``jaxbn.inspect_batch_norms``'s
drift, the largest over the layers), at two learning rates over several
seeds. It writes ``swa_recalibration.png`` (the drift per layer) and
``swa_recalibration.md`` to ``--out`` (default: a folder of the system's
temporary directory; it prints which); the measured results are in
``examples/README.md``.

    python examples/swa_recalibration.py            # 12 epochs, SWA over the last 6, 3 seeds
    python examples/swa_recalibration.py --quick    # a few seconds
    python examples/swa_recalibration.py --update-committed   # rewrites examples/figures/swa_recalibration.*
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    check_args,
    example_parser,
    markdown_table,
    mean_and_spread,
    progress,
    pyplot,
    save_figure,
    write_report,
)
from train_digits import load_data, make_model  # noqa: E402  (the same data and CNN)

VARIANTS = ("final network", "SWA, stale statistics", "SWA, recalibrated")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], "swa_recalibration", seeds=3)
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument(
        "--swa-epochs", type=int, default=6, help="average the weights of the last N epochs"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[0.05, 0.5],
        help="SGD learning rates (momentum 0.9)",
    )
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.epochs, args.swa_epochs, args.seeds, args.lrs = 3, 2, 1, args.lrs[:1]
    if not 1 <= args.swa_epochs <= args.epochs:
        parser.error(f"--swa-epochs must lie in [1, --epochs={args.epochs}], got {args.swa_epochs}")
    return args


def train_and_average(args: argparse.Namespace, lr: float, seed: int) -> dict[str, dict]:
    """Trains the digits CNN once; returns each variant's test accuracy, loss and per-layer drift."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxbn

    x_train, y_train, x_test, y_test = load_data(seed)
    model = make_model("jaxbn")
    variables = model.init(jax.random.key(seed), x_train[:2], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.sgd(lr, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates[
                "batch_stats"
            ]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def evaluate(variables, x, y):
        logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jnp.mean(jnp.argmax(logits, -1) == y), loss

    rng = np.random.default_rng(seed)
    steps = len(x_train) // args.batch_size
    swa, averaged = None, 0
    for epoch in progress(
        range(args.epochs), desc=f"lr {lr} seed {seed}", enabled=not args.no_progress
    ):
        order = rng.permutation(len(x_train))
        for step in range(steps):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            params, batch_stats, opt_state, _ = train_step(
                params, batch_stats, opt_state, x_train[index], y_train[index]
            )
        if (
            epoch >= args.epochs - args.swa_epochs
        ):  # the running mean of the weights at each epoch's end
            averaged += 1
            swa = (
                params
                if swa is None
                else jax.tree.map(lambda a, p: a + (p - a) / averaged, swa, params)
            )

    final = {"params": params, "batch_stats": batch_stats}
    stale = {"params": swa, "batch_stats": batch_stats}
    train_batches = [
        x_train[i : i + args.batch_size] for i in range(0, len(x_train), args.batch_size)
    ]
    recalibrated = jaxbn.recalibrate(model, stale, train_batches, train=False, progress=False)
    results = {}
    for name, variables in zip(VARIANTS, (final, stale, recalibrated)):
        accuracy, loss = evaluate(variables, x_test, y_test)
        reports = jaxbn.inspect_batch_norms(model, variables, x_test, train=False)
        results[name] = {
            "test_accuracy": float(accuracy),
            "test_loss": float(loss),
            "drift": {"/".join(map(str, r.path)): r.drift for r in reports},
        }
    return results


def main(argv: list[str] | None = None) -> dict[float, dict[str, dict[str, list]]]:
    """Runs the example; returns ``{lr: {variant: {'test_accuracy', 'test_loss', 'drift'}: one value per seed}}``.

    ``drift`` is the largest BatchNorm drift of the network on the test set.
    """
    started = time.perf_counter()
    args = parse_args(argv)
    runs = {
        lr: [train_and_average(args, lr, seed) for seed in range(args.seeds)] for lr in args.lrs
    }
    results = {
        lr: {
            name: {
                "test_accuracy": [run[name]["test_accuracy"] for run in seeds],
                "test_loss": [run[name]["test_loss"] for run in seeds],
                "drift": [max(run[name]["drift"].values()) for run in seeds],
            }
            for name in VARIANTS
        }
        for lr, seeds in runs.items()
    }
    table = markdown_table(
        [
            "lr",
            "weights and statistics",
            "test accuracy",
            "test loss",
            "BN drift (max over layers)",
        ],
        [
            [
                lr,
                name,
                *(mean_and_spread(row[key]) for key in ("test_accuracy", "test_loss", "drift")),
            ]
            for lr, rows in results.items()
            for name, row in rows.items()
        ],
    )
    print(
        f"\nSWA over the last {args.swa_epochs} of {args.epochs} epochs, {args.seeds} seed(s), mean ± std"
    )
    print(table)

    plt = pyplot()
    figure, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.5), squeeze=False)
    for axis, (lr, seeds) in zip(axes[0], runs.items()):
        layers = list(seeds[0][VARIANTS[0]]["drift"])
        for offset, name in enumerate(VARIANTS):
            drift = np.array([[run[name]["drift"][layer] for layer in layers] for run in seeds])
            axis.bar(
                np.arange(len(layers)) + (offset - 1) * 0.27,
                drift.mean(0),
                width=0.27,
                yerr=drift.std(0) if len(seeds) > 1 else None,
                label=name,
            )
        axis.set(
            xticks=np.arange(len(layers)),
            xticklabels=layers,
            ylabel="drift (test batch vs running stats)",
            title=f"lr {lr}",
        )
    axes[0][0].legend(fontsize="small")
    plot = save_figure(figure, args.out, "swa_recalibration.png")

    def mean(lr, name, key):
        return float(np.mean(results[lr][name][key]))

    n_test = len(load_data(0).y_test)
    findings = []
    for lr in results:
        stale, recalibrated = (mean(lr, name, "drift") for name in VARIANTS[1:])
        gain = mean(lr, VARIANTS[2], "test_accuracy") - mean(lr, VARIANTS[1], "test_accuracy")
        findings.append(
            f"At lr {lr}, recalibration took the drift from {stale:.3f} to {recalibrated:.3f} and changed "
            f"the test accuracy by {gain:+.4f} ({gain * n_test:+.1f} of {n_test} images, averaged over seeds)."
        )
    body = (
        f"{table}\n\n![drift per layer]({plot.name})\n\n**What this shows.** "
        + " ".join(findings)
        + "\n"
    )
    write_report(
        args.out,
        "swa_recalibration",
        "SWA needs re-estimated BatchNorm statistics",
        body,
        started=started,
        argv=argv,
    )
    return results


if __name__ == "__main__":
    main()
