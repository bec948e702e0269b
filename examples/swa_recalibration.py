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
drift, the largest over the layers). Measured on 2026-12-01 (seed 0, 12
epochs): recalibration brings the drift from 0.030 to 0.009 (lr 0.05) and
from 0.106 to 0.009 (lr 0.5), and the test loss from 0.0611 to 0.0567 at lr
0.5 (0.0316 to 0.0319 at lr 0.05), but the test accuracy of this small, easy
problem is the same with the stale statistics (within one of 360 images): the
claim that SWA *needs* the re-estimation does not show here, where the
weights of the last epochs stay close together.

    python examples/swa_recalibration.py            # 12 epochs, SWA over the last 6
    python examples/swa_recalibration.py --quick    # a few seconds

``main(argv)`` returns the accuracies as a dict.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import load_data, make_model  # noqa: E402  (the same data and CNN)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--swa-epochs", type=int, default=6, help="average the weights of the last N epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs, SWA over the last 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.swa_epochs = 3, 2
    if not 1 <= args.swa_epochs <= args.epochs:
        parser.error(f"--swa-epochs must lie in [1, --epochs={args.epochs}], got {args.swa_epochs}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxbn

    args = parse_args(argv)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = make_model("jaxbn")
    variables = model.init(jax.random.key(args.seed), x_train[:2], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.sgd(args.lr, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def evaluate(variables, x, y):
        logits = model.apply(variables, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jnp.mean(jnp.argmax(logits, -1) == y), loss

    rng = np.random.default_rng(args.seed)
    steps = len(x_train) // args.batch_size
    swa, averaged = None, 0
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        for step in range(steps):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x_train[index],
                                                              y_train[index])
        if epoch >= args.epochs - args.swa_epochs:  # the running mean of the weights at each epoch's end
            averaged += 1
            swa = params if swa is None else jax.tree.map(lambda a, p: a + (p - a) / averaged, swa, params)
        print(f"epoch {epoch + 1:2d}  loss {float(loss):.4f}")

    final = {"params": params, "batch_stats": batch_stats}
    stale = {"params": swa, "batch_stats": batch_stats}
    train_batches = [x_train[i:i + args.batch_size] for i in range(0, len(x_train), args.batch_size)]
    recalibrated = jaxbn.recalibrate(model, stale, train_batches, train=False)
    results = {}
    for name, variables in (("final network", final), ("SWA, stale statistics", stale),
                            ("SWA, recalibrated", recalibrated)):
        accuracy, loss = evaluate(variables, x_test, y_test)
        drift = max(report.drift for report in jaxbn.inspect_batch_norms(model, variables, x_test, train=False))
        results[name] = {"test_accuracy": float(accuracy), "test_loss": float(loss), "drift": drift}
    print(f"\nSWA over the last {args.swa_epochs} of {args.epochs} epochs, lr {args.lr}, {len(x_test)} test images")
    print("| weights and statistics | test accuracy | test loss | BN drift (max) |\n| --- | --- | --- | --- |")
    for name, row in results.items():
        print(f"| {name} | {row['test_accuracy']:.4f} | {row['test_loss']:.4f} | {row['drift']:.3f} |")
    return results


if __name__ == "__main__":
    main()
