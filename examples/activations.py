"""How a hidden layer's pre-activations move during training, with and without BatchNorm.

Ioffe & Szegedy (2015) motivate batch norm by "internal covariate shift": as
the layers below learn, the distribution of a layer's inputs keeps moving, and
their Figure 1 shows the 15th, 50th and 85th percentiles of one sigmoid's
input drifting without batch norm and staying put with it. This script
repeats that picture on scikit-learn's bundled 8x8 digits (nothing is
downloaded) with an MLP of three hidden layers of 100 units (the paper's
MNIST network), for relu, tanh and sigmoid, each with:

- ``none``: Dense -> activation;
- ``BN before``: Dense -> ``jaxbn.linen.BatchNorm`` -> activation (the paper's placement);
- ``BN after``: Dense -> activation -> BatchNorm.

At checkpoints over training it records the input of the last hidden layer's
activation function (its pre-activations) on a fixed probe batch, the 450 test
images, normalized with the probe's own batch statistics as a training batch is
(running averages would add their own jitter to the picture), and reports:

- the percentiles of one unit (unit 0) over the probe, as bands over time
  (``activations_percentiles.png``, seed 0);
- the drift between consecutive checkpoints, averaged over the 100 units: how
  far each unit's probe mean moves, in units of its probe std, and how much its
  std changes (``|log(std_t+1 / std_t)|``), over the whole run and over its
  second half (``activations_training.png`` shows the drift and the test
  accuracy over time);
- the final test accuracy (running averages), mean ± std over seeds.

Training is plain minibatch SGD with momentum 0.9, batch 64, the same
learning rate for every setting; for a seed, every setting starts from the
same Dense weights. The split is fixed; seeds change the initialization and
the batch order. This measures the shift and the accuracy, not why batch norm
helps: Santurkar et al. (2018) argue the benefit does not come from reducing
this shift.

    python examples/activations.py            # 5 seeds, 3000 steps, about a minute on 2 cores
    python examples/activations.py --quick    # seconds: checks the code, numbers mean little

Each placement is one compilation: the activation is chosen with
``lax.switch`` and ``vmap``-ed over, together with the seeds, and training is
a ``lax.scan`` over checkpoints of a ``lax.scan`` over steps. ``main(argv)``
returns the results as a dict.
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

NAME = "activations"
ACTIVATIONS = ("relu", "tanh", "sigmoid")
PLACEMENTS = ("none", "BN before", "BN after")
LAYERS, WIDTH = 3, 100
PERCENTILES = (15, 50, 85)
UNIT = 0  # the unit whose percentiles are drawn
BATCH_SIZE = 64
MOMENTUM = 0.9


def make_model(placement: str):
    """The MLP; ``__call__(x, activation, train)`` returns the logits and the last hidden layer's pre-activations.

    ``activation`` indexes :data:`ACTIVATIONS` and may be traced (``lax.switch``), so one compiled program
    serves all three.
    """
    import flax.linen as nn
    import jax

    from jaxbn import linen as bn

    functions = [nn.relu, nn.tanh, nn.sigmoid]

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, activation, train: bool):
            for layer in range(LAYERS):
                x = nn.Dense(WIDTH, name=f"dense_{layer}")(
                    x
                )  # the same names: the same initial weights
                if placement == "BN before":
                    x = bn.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
                preactivation = x
                x = jax.lax.switch(activation, functions, x)
                if placement == "BN after":
                    x = bn.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
            return nn.Dense(10, name="head")(x), preactivation

    return MLP()


def initial_variables(seeds: int, n_inputs: int) -> dict[str, Any]:
    """Each placement's variables for each seed, from one compiled init (for a seed, the same Dense weights)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((2, n_inputs), jnp.float32)
    init_all = jax.vmap(
        lambda key: {
            placement: make_model(placement).init(key, x, 0, train=False)
            for placement in PLACEMENTS
        }
    )
    return jax.jit(init_all)(jax.random.split(jax.random.key(0), seeds))


def train(placement: str, variables, orders: np.ndarray, lr: float, data) -> dict[str, np.ndarray]:
    """Trains every activation x seed of ``placement`` at once.

    Args:
      placement: one of :data:`PLACEMENTS`.
      variables: the initial variables, with a leading seed axis.
      orders: ``(seeds, checkpoints, steps per checkpoint, batch)`` training-example indices.
      lr: the SGD learning rate.
      data: the digits split.

    Returns:
      Arrays with leading axes ``(activation, seed, checkpoint)``, checkpoint 0 at initialization:
      ``percentiles`` (of unit :data:`UNIT` on the probe), ``mean`` and ``std`` (per unit, over the probe)
      and ``test_accuracy`` (running averages).
    """
    import jax
    import jax.numpy as jnp
    import optax

    model = make_model(placement)
    optimizer = optax.sgd(lr, momentum=0.9)
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)

    def measure(params, state, activation):
        """The probe's pre-activations with its own batch statistics (nothing updated) and the test accuracy with
        the running ones."""
        variables = {"params": params, "batch_stats": state}
        (_, probe), _ = model.apply(
            variables, x_test, activation, train=True, mutable=["batch_stats"]
        )
        logits, _ = model.apply(variables, x_test, activation, train=False)
        return {
            "percentiles": jnp.percentile(probe[:, UNIT], jnp.array(PERCENTILES)),
            "mean": probe.mean(0),
            "std": probe.std(0),
            "test_accuracy": jnp.mean(jnp.argmax(logits, -1) == y_test),
        }

    def run(activation, variables, order):
        def step(carry, index):
            params, state, opt_state = carry

            def loss_fn(params):
                (logits, _), updates = model.apply(
                    {"params": params, "batch_stats": state},
                    x_train[index],
                    activation,
                    train=True,
                    mutable=["batch_stats"],
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(
                    logits, y_train[index]
                ).mean()
                return loss, updates.get("batch_stats", {})

            (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), state, opt_state), None

        def measure_then_train(carry, indices):
            measured = measure(carry[0], carry[1], activation)
            return jax.lax.scan(step, carry, indices)[0], measured

        # One extra interval, whose training is discarded, makes the last measurement the end of training
        # (and keeps measure() at one place in the compiled program).
        order = jnp.concatenate([order, order[:1]])
        params, state = variables["params"], variables.get("batch_stats", {})
        return jax.lax.scan(measure_then_train, (params, state, optimizer.init(params)), order)[1]

    over_seeds = jax.vmap(run, in_axes=(None, 0, 0))
    over_activations = jax.vmap(over_seeds, in_axes=(0, None, None))
    results = jax.jit(over_activations)(jnp.arange(len(ACTIVATIONS)), variables, orders)
    return {name: np.asarray(value, np.float64) for name, value in results.items()}


def drift(mean: np.ndarray, std: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per seed: the mean over units and checkpoint intervals from ``start`` of ``|Δmean| / std`` and
    ``|Δ log std|``, with ``mean`` and ``std`` shaped ``(seed, checkpoint, unit)``."""
    mean, std = mean[:, start:], np.maximum(std[:, start:], 1e-6)
    shift = np.abs(np.diff(mean, axis=1)) / std[:, :-1]
    scale = np.abs(np.diff(np.log(std), axis=1))
    return shift.mean((1, 2)), scale.mean((1, 2))


def plot_percentiles(results: dict, steps: np.ndarray, out) -> Any:
    """Percentile bands of unit :data:`UNIT`'s pre-activation over training, seed 0: activation x placement."""
    plt = pyplot()
    figure, grid = plt.subplots(
        len(ACTIVATIONS), len(PLACEMENTS), figsize=(12, 8.5), sharex=True, sharey="row"
    )
    for row, activation in enumerate(ACTIVATIONS):
        for column, placement in enumerate(PLACEMENTS):
            axes = grid[row, column]
            low, median, high = results[placement]["percentiles"][row, 0].T
            axes.fill_between(
                steps,
                low,
                high,
                alpha=0.3,
                label=f"{PERCENTILES[0]}th-{PERCENTILES[2]}th percentile",
            )
            axes.plot(steps, median, label="median")
            axes.set_title(f"{activation}, {placement}")
            axes.grid(alpha=0.3)
            if row == len(ACTIVATIONS) - 1:
                axes.set_xlabel("training step")
            if column == 0:
                axes.set_ylabel(f"unit {UNIT}'s input to {activation}")
    grid[0, 0].legend(loc="best", fontsize="small")
    figure.suptitle(
        "Pre-activation of one unit of the last hidden layer on a fixed probe batch (seed 0)"
    )
    figure.tight_layout()
    return save_figure(figure, out, f"{NAME}_percentiles.png")


def plot_training(results: dict, steps: np.ndarray, n_test: int, out) -> Any:
    """Test error and per-interval mean shift over training (mean over seeds): one column per activation."""
    plt = pyplot()
    figure, grid = plt.subplots(2, len(ACTIVATIONS), figsize=(13, 7), sharex=True)
    for column, activation in enumerate(ACTIVATIONS):
        for placement in PLACEMENTS:
            run = results[placement]
            error = np.maximum(1 - run["test_accuracy"][column].mean(0), 1 / n_test)
            grid[0, column].plot(steps, error, label=placement)
            shift = np.abs(np.diff(run["mean"][column], axis=1)) / np.maximum(
                run["std"][column][:, :-1], 1e-6
            )
            grid[1, column].plot(steps[1:], shift.mean((0, 2)), label=placement)
        grid[0, column].set_title(f"{activation}: test error (running averages)")
        grid[0, column].set_yscale("log")
        grid[1, column].set_title(f"{activation}: mean shift between checkpoints")
        grid[1, column].set_yscale("log")
        grid[1, column].set_xlabel("training step")
        for axes in grid[:, column]:
            axes.grid(alpha=0.3)
            axes.legend(fontsize="small")
    grid[0, 0].set_ylabel("1 - test accuracy (log scale)")
    grid[1, 0].set_ylabel("|Δ probe mean| / probe std (mean over units)")
    figure.tight_layout()
    return save_figure(figure, out, f"{NAME}_training.png")


def findings(rows: dict, n_test: int) -> str:
    """'What this shows', worded from the measured numbers; ``rows[(activation, placement)]`` holds per-seed
    arrays."""

    def mean(activation, placement, key):
        return float(np.mean(rows[activation, placement][key]))

    def listed(names):
        return ", ".join(names) if names else "none of them"

    lines = []
    for activation in ACTIVATIONS:
        numbers = {
            key: ", ".join(f"{mean(activation, p, key):.3f}" for p in PLACEMENTS)
            for key in ("shift", "late_shift", "scale", "test_accuracy")
        }
        lines.append(
            f"- {activation} (none, BN before, BN after): a unit's probe mean moves {numbers['shift']} std "
            f"per checkpoint interval ({numbers['late_shift']} over the second half), its log std "
            f"{numbers['scale']}; test accuracy {numbers['test_accuracy']}."
        )
    steadier = [a for a in ACTIVATIONS if mean(a, "BN before", "shift") < mean(a, "none", "shift")]
    late = [
        a for a in ACTIVATIONS if mean(a, "BN before", "late_shift") < mean(a, "none", "late_shift")
    ]
    ratio = min(
        mean(a, "none", "shift") / max(mean(a, "BN before", "shift"), 1e-12) for a in ACTIVATIONS
    )
    lines.append(
        f"\nThe claim that batch norm before the activation steadies the pre-activations holds over the whole run "
        f"for {listed(steadier)} (the mean drifts at least {ratio:.0f} times less with it), and over the second "
        f"half for {listed(late)}. Part of this holds by construction: with batch norm before the activation, the "
        "probe's mean and std are the learned bias and scale (the probe is normalized with its own statistics), "
        "so only their learning moves them; the percentile bands show the rest of the distribution."
    )
    after_scale = np.mean([mean(a, "BN after", "scale") for a in ACTIVATIONS])
    before_scale = np.mean([mean(a, "BN before", "scale") for a in ACTIVATIONS])
    none_scale = np.mean([mean(a, "none", "scale") for a in ACTIVATIONS])
    lines.append(
        f"With batch norm after the activation (the next Dense sees normalized inputs), the log std of the "
        f"pre-activations changes by {after_scale:.3f} per interval on average over the activations: "
        f"{after_scale / max(before_scale, 1e-12):.1f} times as much as with batch norm before, "
        f"{after_scale / max(none_scale, 1e-12):.2f} times as much as without."
    )
    resolution = 1 / n_test
    helped = [
        a
        for a in ACTIVATIONS
        if mean(a, "BN before", "test_accuracy") > mean(a, "none", "test_accuracy")
        and differs(
            rows[a, "BN before"]["test_accuracy"], rows[a, "none"]["test_accuracy"], resolution
        )
    ]
    lines.append(
        f"Batch norm before the activation raises the test accuracy beyond the seed spread for "
        f"{listed(helped)}."
    )
    placement = [
        f"{a} {mean(a, 'BN before', 'test_accuracy') - mean(a, 'BN after', 'test_accuracy'):+.3f}"
        for a in ACTIVATIONS
    ]
    matters = [
        a
        for a in ACTIVATIONS
        if differs(
            rows[a, "BN before"]["test_accuracy"], rows[a, "BN after"]["test_accuracy"], resolution
        )
    ]
    only = "" if len(matters) == len(ACTIVATIONS) else " only"
    lines.append(
        f"BN before minus BN after, test accuracy: {', '.join(placement)}; "
        + (
            f"the difference exceeds the seed spread (sum of the two stds, at least one test image) for "
            f"{listed(matters)}{only}."
            if matters
            else "within the seed spread for every activation: the placement does not matter here."
        )
    )
    if len(rows[ACTIVATIONS[0], "none"]["test_accuracy"]) == 1:
        lines.append(
            "With one seed there is no spread: the comparisons above only ask for one test image."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    started = time.perf_counter()
    parser = example_parser(__doc__.split("\n\n")[0], NAME, seeds=5)
    parser.add_argument("--steps", type=int, default=3000, help="training steps (batch 64)")
    parser.add_argument(
        "--checkpoints", type=int, default=60, help="measurements over training (after init)"
    )
    parser.add_argument(
        "--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9), every setting"
    )
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.steps, args.checkpoints, args.seeds = 40, 4, 1
    if args.checkpoints < 2 or args.steps % args.checkpoints:
        parser.error(
            f"--checkpoints must be >= 2 and divide --steps={args.steps}, got {args.checkpoints}"
        )

    data = load_digits(0)
    variables = initial_variables(args.seeds, data.x_train.shape[1])
    per_checkpoint = args.steps // args.checkpoints
    orders = np.stack(
        [
            batch_indices(np.random.default_rng(seed), len(data.x_train), BATCH_SIZE, args.steps)
            for seed in range(args.seeds)
        ]
    ).reshape(args.seeds, args.checkpoints, per_checkpoint, -1)
    results = {
        placement: train(placement, variables[placement], orders, args.lr, data)
        for placement in progress(PLACEMENTS, desc="placements", enabled=not args.no_progress)
    }
    steps = np.arange(args.checkpoints + 1) * per_checkpoint

    rows = {}
    for a, activation in enumerate(ACTIVATIONS):
        for placement in PLACEMENTS:
            run = {key: value[a] for key, value in results[placement].items()}
            shift, scale = drift(run["mean"], run["std"])
            late_shift, late_scale = drift(run["mean"], run["std"], start=args.checkpoints // 2)
            rows[activation, placement] = {
                "test_accuracy": run["test_accuracy"][:, -1],
                "shift": shift,
                "scale": scale,
                "late_shift": late_shift,
                "late_scale": late_scale,
                "percentiles": run["percentiles"],
            }
    header = [
        "activation",
        "placement",
        "test accuracy",
        "mean shift / interval",
        "log-std change / interval",
        "mean shift, 2nd half",
        "log-std change, 2nd half",
    ]
    table = markdown_table(
        header,
        [
            [
                activation,
                placement,
                *(
                    mean_and_spread(row[key])
                    for key in ("test_accuracy", "shift", "scale", "late_shift", "late_scale")
                ),
            ]
            for (activation, placement), row in rows.items()
        ],
    )
    figures = [
        plot_percentiles(results, steps, args.out),
        plot_training(results, steps, len(data.x_test), args.out),
    ]
    setup = (
        f"{args.steps} steps of SGD (lr {args.lr:g}, momentum 0.9, batch {BATCH_SIZE}), {args.seeds} seed(s), "
        f"{args.checkpoints} checkpoint intervals of {per_checkpoint} steps; probe: the {len(data.x_test)} "
        f"test images; pre-activations of the last of {LAYERS} hidden layers of {WIDTH} units."
    )
    text = findings(rows, len(data.x_test))
    images = " ".join(f"![{figure.stem}]({figure.name})" for figure in figures)
    body = (
        f"{setup}\n\nMean ± std over seeds; the shifts are per checkpoint interval, averaged over the units "
        f"(how far the probe mean moved, in probe std; the absolute change of the log std):\n\n{table}\n\n"
        f"{images}\n\n### What this shows\n\n{text}\n"
    )
    print(f"{setup}\n\n{table}\n\n{text}")
    write_report(
        args.out,
        NAME,
        "Pre-activation drift with and without BatchNorm",
        body,
        started=started,
        argv=argv,
    )
    return rows


if __name__ == "__main__":
    main()
