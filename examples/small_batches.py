"""Batch norm at small batches, against batch renorm, ghost batches, group norm and layer norm.

Batch norm normalizes with the statistics of the batch in training and with
running averages of them at inference. At small batches those statistics are
noisy and the two modes disagree; group norm and layer norm (Wu & He, 2018)
take their statistics per example and do not depend on the batch; batch renorm
(Ioffe, 2017) corrects the batch statistics towards the running ones; ghost
batches (Hoffer et al., 2017) normalize slices of the batch separately. This
script measures those claims on an MLP (64 -> 128 -> 128 -> 10, the
normalization between each hidden Dense and its ReLU) trained on
scikit-learn's bundled 8x8 digits (nothing is downloaded) at batch sizes 2, 4,
8, 32 and 128 with:

- ``batch norm``: ``jaxbn.linen.BatchNorm`` (momentum 0.9, PyTorch's 0.1);
- ``batch renorm``: ``jaxbn.linen.BatchRenorm``, with the paper's clipping
  schedule (plain batch norm for 5k steps, ``d_max`` reaching 5 at 25k and
  ``r_max`` 3 at 40k) shrunk to the run's length as if it were 100k steps;
- ``ghost batches``: BatchNorm with ``ghost_batch_size = max(2, B // 4)``:
  2 at B = 4 and 8, 8 at B = 32, 32 at B = 128. At B = 2 no smaller ghost
  batch exists (one example per feature has variance 0, which jaxbn rejects),
  so that cell repeats batch norm's run;
- ``group norm`` (8 groups of 16 features), ``layer norm`` (over the 128
  features) and ``none``.

In an MLP a batch of 2 gives each feature two values, which batch norm maps to
-1 and +1 whatever they are (up to epsilon): the layer passes on only their
order, and almost no gradient reaches the layers below. A convolutional
network, whose statistics also run over the image positions, suffers less.

Every batch size sees the same number of examples (``--epochs`` passes over
the 1347 training images), not the same number of steps, with the SGD
learning rate scaled linearly with the batch (``--lr`` at B = 128, momentum
0.9), as in the group norm paper: each run gets the same data and the same
ratio of learning rate to batch size, so what differs is the statistics. The
split is fixed; the seeds change the initialization (for a seed, every
normalization starts from the same Dense weights) and the batch order. The
tables give the test accuracy (running averages for the batch-norm kinds, mean
± std over seeds) and the train/inference gap: the test accuracy and loss with
the running averages (what is deployed) minus those with the statistics of
test batches of the training batch size (what training saw), on the same test
images.

    python examples/small_batches.py               # 3 seeds, 30 epochs, 2-4 minutes on 2 cores
    python examples/small_batches.py --seeds 2     # faster
    python examples/small_batches.py --quick       # seconds: checks the code, numbers mean little

The training loop is one ``lax.scan`` over the steps, ``vmap``-ed over the
seeds, so each (normalization, batch size) is one compilation; compiling, not
training, takes most of the time. ``main(argv)`` returns the results as a dict.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    batch_indices,
    check_args,
    differs,
    example_parser,
    load_digits,
    markdown_table,
    mean_and_spread,
    progress,
    pyplot,
    save_figure,
    write_report,
)

NAME = "small_batches"
BATCH_SIZES = (2, 4, 8, 32, 128)
NORMS = ("batch norm", "batch renorm", "ghost batches", "group norm", "layer norm", "none")
BATCH_STATISTICS = (
    "batch norm",
    "batch renorm",
    "ghost batches",
)  # the norms with a train/inference gap
HIDDEN = (128, 128)
GROUPS = 8
MOMENTUM = 0.9


def ghost_batch_size(batch_size: int) -> int:
    """The ghost batch at ``batch_size``: a quarter of it, at least 2 (a ghost batch of 1 has variance 0)."""
    return max(2, batch_size // 4)


def renorm_limits(total_steps: int):
    """``(r_max, d_max)`` callables: Ioffe's 5k/25k/40k-step schedule scaled from 100k steps to ``total_steps``."""
    import jaxbn

    scale = total_steps / 100_000
    schedule = dict(
        warmup_steps=round(5_000 * scale),
        d_max_steps=round(25_000 * scale),
        r_max_steps=round(40_000 * scale),
    )
    return (
        lambda step: jaxbn.renorm_clipping(step, **schedule)[0],
        lambda step: jaxbn.renorm_clipping(step, **schedule)[1],
    )


def make_model(norm: str, batch_size: int = 2, total_steps: int = 1):
    """The MLP with ``norm`` after each hidden Dense; ``batch_size`` sets the ghost batch, ``total_steps`` renorm's
    schedule (neither changes the variables)."""
    import flax.linen as nn

    from jaxbn import linen as bn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            for layer, features in enumerate(HIDDEN):
                x = nn.Dense(features, name=f"dense_{layer}")(
                    x
                )  # the same names: the same initial weights
                if norm == "batch norm":
                    x = bn.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
                elif norm == "batch renorm":
                    r_max, d_max = renorm_limits(total_steps)
                    x = bn.BatchRenorm(
                        use_running_average=not train, momentum=MOMENTUM, r_max=r_max, d_max=d_max
                    )(x)
                elif norm == "ghost batches":
                    x = bn.BatchNorm(
                        use_running_average=not train,
                        momentum=MOMENTUM,
                        ghost_batch_size=ghost_batch_size(batch_size),
                    )(x)
                elif norm == "group norm":
                    x = bn.GroupNorm(num_groups=GROUPS)(x)
                elif norm == "layer norm":
                    x = bn.LayerNorm()(x)
                elif norm != "none":
                    raise ValueError(f"unknown normalization {norm!r}")
                x = nn.relu(x)
            return nn.Dense(10, name="head")(x)

    return MLP()


def initial_variables(seeds: int, n_inputs: int) -> dict[str, Any]:
    """Every normalization's variables for each seed, from one compiled init (one compilation, not six): for a
    seed, all start from the same Dense weights (the layers have the same names)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((2, n_inputs), jnp.float32)
    init_all = jax.vmap(
        lambda key: {norm: make_model(norm).init(key, x, train=False) for norm in NORMS}
    )
    return jax.jit(init_all)(jax.random.split(jax.random.key(0), seeds))


def train_and_evaluate(
    norm: str, batch_size: int, steps: int, lr: float, variables, data, seeds: int
) -> dict[str, np.ndarray]:
    """Trains ``seeds`` networks at once (vmap) for ``steps`` steps (one scan); returns per-seed test metrics."""
    import jax
    import jax.numpy as jnp
    import optax

    model = make_model(norm, batch_size, steps)
    optimizer = optax.sgd(lr, momentum=0.9)
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    covered = len(x_test) // batch_size * batch_size  # the test images that fill whole batches

    def loss_and_accuracy(logits, labels):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    def one_seed(variables, order):
        params, state = variables["params"], variables.get("batch_stats", {})

        def step(carry, index):
            params, state, opt_state = carry

            def loss_fn(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": state},
                    x_train[index],
                    train=True,
                    mutable=["batch_stats"],
                )
                return loss_and_accuracy(logits, y_train[index])[0], updates.get("batch_stats", {})

            (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), state, opt_state), loss

        (params, state, _), losses = jax.lax.scan(
            step, (params, state, optimizer.init(params)), order
        )
        variables = {"params": params, "batch_stats": state}
        running_logits = model.apply(variables, x_test, train=False)
        loss, accuracy = loss_and_accuracy(running_logits, y_test)
        results = {
            "test_accuracy": accuracy,
            "test_loss": loss,
            "final_train_loss": losses[-len(losses) // 10 :].mean(),
        }
        if (
            norm in BATCH_STATISTICS
        ):  # the others compute the same either way (and compile faster without this)
            batches = x_test[:covered].reshape((-1, batch_size) + x_test.shape[1:])
            logits = jax.vmap(
                lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
            )(batches)
            batch_loss, batch_accuracy = loss_and_accuracy(
                logits.reshape(covered, -1), y_test[:covered]
            )
            covered_loss, covered_accuracy = loss_and_accuracy(
                running_logits[:covered], y_test[:covered]
            )
            results.update(
                accuracy_gap=covered_accuracy - batch_accuracy, loss_gap=covered_loss - batch_loss
            )
        return results

    orders = np.stack(
        [
            batch_indices(np.random.default_rng(seed), len(x_train), batch_size, steps)
            for seed in range(seeds)
        ]
    )
    results = jax.jit(jax.vmap(one_seed))(variables, orders)
    return {name: np.asarray(value, np.float64) for name, value in results.items()}


def plot(results: dict, batch_sizes: tuple[int, ...], seeds: int, out) -> Any:
    """Test accuracy against batch size (log axis), and the train/inference accuracy gap of the batch-norm kinds."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for norm in NORMS:
        accuracy = np.array([results[norm][b]["test_accuracy"] for b in batch_sizes])
        label = "ghost batches of max(2, B/4)" if norm == "ghost batches" else norm
        left.errorbar(
            batch_sizes, accuracy.mean(1), yerr=accuracy.std(1), marker="o", capsize=3, label=label
        )
        if norm in BATCH_STATISTICS:
            gap = np.array([results[norm][b]["accuracy_gap"] for b in batch_sizes])
            right.errorbar(
                batch_sizes, gap.mean(1), yerr=gap.std(1), marker="o", capsize=3, label=label
            )
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        axes.set_xlabel("batch size (log scale)")
        axes.grid(alpha=0.3)
        axes.legend()
    left.set_ylabel("test accuracy (running averages)")
    left.set_title(f"Same examples seen at every batch size (mean ± std, {seeds} seed(s))")
    right.axhline(0, color="black", lw=0.8)
    right.set_ylabel("accuracy: running averages − batch statistics")
    right.set_title("Train/inference gap on test batches of the training size")
    return save_figure(figure, out, f"{NAME}.png")


def findings(results: dict, batch_sizes: tuple[int, ...], n_test: int) -> str:
    """'What this shows', worded from the measured numbers."""

    def mean(norm, b, key="test_accuracy"):
        return float(np.mean(results[norm][b][key]))

    def beyond_spread(norm_a, b_a, norm_b, b_b):
        return differs(
            results[norm_a][b_a]["test_accuracy"], results[norm_b][b_b]["test_accuracy"], 1 / n_test
        )

    def series(norm, key="test_accuracy", sign=""):
        return ", ".join(f"{mean(norm, b, key):{sign}.3f}" for b in batch_sizes)

    small, large = batch_sizes[0], batch_sizes[-1]
    best = max(batch_sizes, key=lambda b: mean("batch norm", b))
    lines = [
        f"Batch norm: test accuracy {series('batch norm')} at B = {', '.join(map(str, batch_sizes))} (train "
        f"loss at the end {series('batch norm', 'final_train_loss')})."
    ]
    lost = [
        b
        for b in batch_sizes
        if mean("batch norm", b) < mean("batch norm", best)
        and beyond_spread("batch norm", b, "batch norm", best)
    ]
    lines.append(
        f"It loses accuracy beyond the seed spread, against its best batch size ({best}), at "
        f"B = {', '.join(map(str, lost))}."
        if lost
        else "It loses no accuracy beyond the seed spread at any batch size here."
    )
    lines.append(
        f"Its train/inference gap (running averages minus batch statistics) is "
        f"{series('batch norm', 'accuracy_gap', '+')} in accuracy and "
        f"{series('batch norm', 'loss_gap', '+')} in test loss: "
        + (
            "the running averages do better than the batch statistics of small test batches, not worse"
            if mean("batch norm", small, "accuracy_gap") > 0
            else "the running averages do worse than the batch statistics at the small batch"
        )
        + (
            ", and the gap grows as the batch shrinks."
            if len(batch_sizes) > 1
            and all(
                abs(mean("batch norm", b, "accuracy_gap"))
                >= abs(mean("batch norm", c, "accuracy_gap"))
                for b, c in zip(batch_sizes, batch_sizes[1:])
            )
            else "."
        )
    )
    per_example = max(("group norm", "layer norm"), key=lambda n: mean(n, small))
    spans = {
        n: max(mean(n, b) for b in batch_sizes) - min(mean(n, b) for b in batch_sizes)
        for n in ("group norm", "layer norm", "none", "batch norm")
    }
    verdict = (
        "beats"
        if mean(per_example, small) > mean("batch norm", small)
        and beyond_spread(per_example, small, "batch norm", small)
        else "does not beat"
    )
    lines.append(
        f"At B = {small}, {per_example} ({mean(per_example, small):.3f}) {verdict} batch norm "
        f"({mean('batch norm', small):.3f}) beyond the seed spread. Across batch sizes the mean accuracy "
        "varies by " + ", ".join(f"{spans[n]:.3f} ({n})" for n in spans) + "."
    )
    others = ("group norm", "layer norm", "none")
    ahead = [b for b in batch_sizes if mean("batch norm", b) >= max(mean(n, b) for n in others)]
    lines.append(
        f"Batch norm matches or beats group norm, layer norm and no normalization at B = "
        f"{', '.join(map(str, ahead))}"
        if ahead
        else "Batch norm is below group norm, layer norm or no normalization at every batch size"
    )
    lines[-1] += (
        f" (no normalization: {np.mean([mean('none', b) for b in batch_sizes]):.3f} on average over the "
        "batch sizes)."
    )
    change = mean("batch renorm", small) - mean("batch norm", small)
    target = mean("batch norm", best) - mean("batch norm", small)
    if not beyond_spread("batch renorm", small, "batch norm", small):
        closed = "no change beyond the seed spread"
    elif change > 0:
        closed = (
            f"it closes {change / target:.0%} of the gap to batch norm's best"
            if target > 0
            else "it helps"
        )
    else:
        closed = "it widens the gap"
    lines.append(
        f"Batch renorm at B = {small}: {mean('batch renorm', small):.3f} ({change:+.3f}): {closed}; "
        f"its train/inference gap is {mean('batch renorm', small, 'accuracy_gap'):+.3f}."
    )
    compared = [
        b for b in batch_sizes if ghost_batch_size(b) < b and ghost_batch_size(b) in batch_sizes
    ]
    if compared:
        lines.append(
            "Ghost batches against batch norm at the same batch and at the ghost size: "
            + "; ".join(
                f"{ghost_batch_size(b)} at B = {b}: {mean('ghost batches', b):.3f} against {mean('batch norm', b):.3f} "
                f"and {mean('batch norm', ghost_batch_size(b)):.3f}"
                for b in compared
            )
            + "."
        )
        closer = [
            b
            for b in compared
            if beyond_spread("batch norm", b, "batch norm", ghost_batch_size(b))
            and abs(mean("ghost batches", b) - mean("batch norm", ghost_batch_size(b)))
            < abs(mean("ghost batches", b) - mean("batch norm", b))
        ]
        if closer:
            lines.append(
                f"At B = {', '.join(map(str, closer))}, ghost batches do as batch norm at the ghost size "
                "rather than at the batch size: the number of examples in a statistic is what counts."
            )
    if ghost_batch_size(large) < large:
        change = mean("ghost batches", large) - mean("batch norm", large)
        if not beyond_spread("ghost batches", large, "batch norm", large):
            verdict = "within the seed spread: no regularizing benefit shows here"
        else:
            verdict = (
                "a benefit beyond the seed spread"
                if change > 0
                else "a loss beyond the seed spread"
            )
        lines.append(
            f"At B = {large}, ghost batches of {ghost_batch_size(large)} give {change:+.3f} against batch "
            f"norm over the whole batch: {verdict}."
        )
    if len(results["batch norm"][small]["test_accuracy"]) == 1:
        lines.append(
            "With one seed there is no spread: the comparisons above only ask for one test image."
        )
    return " ".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    started = time.perf_counter()
    parser = example_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument(
        "--epochs", type=float, default=30, help="passes over the training set at every batch size"
    )
    parser.add_argument(
        "--lr", type=float, default=0.1, help="SGD learning rate at batch 128, scaled linearly"
    )
    args = check_args(parser, parser.parse_args(argv))
    if args.epochs <= 0:
        parser.error(f"--epochs must be > 0, got {args.epochs}")
    batch_sizes = BATCH_SIZES
    if (
        args.quick
    ):  # one batch size: each (normalization, batch size) costs a compilation of a few seconds
        args.epochs, args.seeds, batch_sizes = 0.1, 1, (4,)

    data = load_digits(0)
    n_train = len(data.x_train)
    variables = initial_variables(args.seeds, data.x_train.shape[1])
    results: dict[str, dict[int, dict[str, np.ndarray]]] = {norm: {} for norm in NORMS}
    runs = [(norm, b) for norm in NORMS for b in batch_sizes]
    for norm, b in progress(runs, desc="normalization x batch size", enabled=not args.no_progress):
        steps = max(1, round(args.epochs * n_train / b))
        if (
            norm == "ghost batches" and ghost_batch_size(b) == b
        ):  # no smaller ghost batch: batch norm's run
            results[norm][b] = results["batch norm"][b]
            continue
        results[norm][b] = train_and_evaluate(
            norm, b, steps, args.lr * b / 128, variables[norm], data, args.seeds
        )

    header = ["normalization", *[f"B={b}" for b in batch_sizes]]
    accuracy_table = markdown_table(
        header,
        [
            [norm, *[mean_and_spread(results[norm][b]["test_accuracy"]) for b in batch_sizes]]
            for norm in NORMS
        ],
    )
    gap_table = markdown_table(
        ["normalization", "gap in", *header[1:]],
        [
            [norm, label, *[mean_and_spread(results[norm][b][key]) for b in batch_sizes]]
            for norm in BATCH_STATISTICS
            for label, key in (("accuracy", "accuracy_gap"), ("loss", "loss_gap"))
        ],
    )
    figure = plot(results, batch_sizes, args.seeds, args.out)
    setup = (
        f"MLP, {args.epochs:g} epochs of {n_train} images at every batch size, SGD (momentum 0.9) at lr "
        f"{args.lr:g} x B/128, {args.seeds} seed(s), {len(data.x_test)} test images; ghost batches of "
        + ", ".join(f"{ghost_batch_size(b)} at B={b}" for b in batch_sizes)
        + "."
    )
    text = findings(results, batch_sizes, len(data.x_test))
    body = (
        f"{setup}\n\nTest accuracy (running averages for the batch-norm kinds), mean ± std over seeds:\n\n"
        f"{accuracy_table}\n\nTrain/inference gap: test accuracy and loss with the running averages minus with "
        f"the statistics of test batches of the training size, on the test images that fill whole batches (a "
        f"positive accuracy gap, or a negative loss gap, means the running averages do better):\n\n"
        f"{gap_table}\n\n![accuracy and train/inference gap against batch size]({figure.name})\n\n"
        f"### What this shows\n\n{text}\n"
    )
    print(f"{setup}\n\n{accuracy_table}\n\n{gap_table}\n\n{text}")
    write_report(args.out, NAME, "Batch norm at small batches", body, started=started, argv=argv)
    return results


if __name__ == "__main__":
    main()
