"""Does BatchNorm make training converge faster and tolerate higher learning rates? Measured on digits.

Two claims from the BatchNorm paper (Ioffe & Szegedy, 2015) are put to the
test: a network with BatchNorm reaches a given accuracy in fewer steps, and it
trains at learning rates where the same network without BatchNorm diverges.
The network is an MLP on scikit-learn's bundled 8x8 digits (nothing is
downloaded): 64 inputs, three hidden ReLU layers, 10 outputs, He-normal
initialization. With BatchNorm, each hidden ``Dense`` (without bias) is
followed by ``jaxbn.batch_norm`` (running-average momentum 0.9); without, the
``Dense`` has a bias. Both train with plain SGD (``--momentum 0`` by default)
at each learning rate of a sweep, from the same initial weights and the same
batches for a given seed, over several seeds.

For each learning rate and each network the script reports:

- the steps until the test accuracy (with the running averages, as a deployed
  model would use them) first reaches ``--target``;
- the final test accuracy and training loss;
- how many seeds diverged: a non-finite loss at any step, or a final training
  loss above the loss at initialization (ln 10, chance level).

It writes ``convergence_and_learning_rate_curves.png`` (test accuracy and
training loss against step, one column per learning rate) and
``convergence_and_learning_rate_summary.png`` (final accuracy and steps to
the target against the learning rate), prints the table and writes
``OUT/convergence_and_learning_rate.md``, whose "What this shows" is worded
from the measured numbers.

Measured on 2026-12-06 (3 seeds, 2000 steps, plain SGD, batch 64): both
claims hold here. With BatchNorm the test accuracy reached 0.95 in fewer
steps at every learning rate where both networks reached it (e.g. 93 vs 173
steps at lr 0.1), and 30 steps at its best lr (1) against 130 at the best lr
without (0.3). Without BatchNorm training failed from lr 1 on; with it, from
lr 10 on. The best final test accuracies differ little (0.982 vs 0.979).

Every seed and learning rate trains at once: the steps run under
``jax.lax.scan`` and ``jax.vmap`` maps over seeds and learning rates, so the
whole sweep is two compiled programs (with and without BatchNorm), called a
chunk of steps at a time for the progress bar.

    python examples/convergence_and_learning_rate.py            # 8 learning rates (0.01 to 30), 3 seeds
    python examples/convergence_and_learning_rate.py --lrs 0.1 1 10 --momentum 0.9
    python examples/convergence_and_learning_rate.py --quick    # a few seconds; numbers mean little

``main(argv)`` returns the measurements as a dict (see its docstring).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    batch_indices,
    check_args,
    example_parser,
    load_digits,
    markdown_table,
    mean_and_spread,
    progress,
    pyplot,
    save_figure,
    write_report,
)

NAME = "convergence_and_learning_rate"
SETTINGS = ("BatchNorm", "no BatchNorm")
BN_MOMENTUM = 0.9  # running averages settle within ~20 steps, so early evaluations are meaningful


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        help="the learning rates of the sweep",
    )
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (0: plain SGD)")
    parser.add_argument("--steps", type=int, default=2000, help="SGD steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="units per hidden layer")
    parser.add_argument("--hidden-layers", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95, help="the test accuracy to reach")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between test evaluations")
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.lrs, args.steps, args.width, args.eval_every, args.target = (
            [0.5, 30.0],
            60,
            32,
            20,
            0.8,
        )
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
        parser.error(
            f"--steps ({args.steps}) must be a positive multiple of --eval-every ({args.eval_every})"
        )
    if min(args.lrs) <= 0:
        parser.error(f"--lrs must be positive, got {args.lrs}")
    return args


def make_network(args: argparse.Namespace, use_bn: bool):
    """Returns ``init(seed) -> (params, state)`` and ``apply(params, state, x, training) -> (logits, state)``."""
    import jax

    import jaxbn

    sizes = [64] + [args.width] * args.hidden_layers + [10]

    def init(seed):  # numpy: nothing to compile
        rng = np.random.default_rng(seed)
        params, state = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            hidden = i < len(sizes) - 2
            std = math.sqrt(
                (2.0 if hidden else 1.0) / fan_in
            )  # He for ReLU layers, LeCun for the head
            layer = {"w": std * rng.standard_normal((fan_in, fan_out), np.float32)}
            if hidden and use_bn:
                layer["bn"], bn_state = jax.tree.map(np.asarray, jaxbn.batch_norm_init(fan_out))
                state.append(bn_state)
            else:
                layer["b"] = np.zeros(fan_out, np.float32)
            params.append(layer)
        return params, state

    def apply(params, state, x, training):
        new_state = []
        for layer in params[:-1]:
            x = x @ layer["w"]
            if use_bn:
                x, layer_state = jaxbn.batch_norm(
                    x, layer["bn"], state[len(new_state)], training=training, momentum=BN_MOMENTUM
                )
                new_state.append(layer_state)
            else:
                x = x + layer["b"]
            x = jax.nn.relu(x)
        return x @ params[-1]["w"] + params[-1]["b"], new_state

    return init, apply


def make_trainer(args: argparse.Namespace, apply, data):
    """Returns ``chunk(params, state, velocity, lrs, indices)``: jitted, over seeds x learning rates.

    ``indices`` is ``(seeds, evaluations, eval_every, batch)``; each evaluation
    runs ``eval_every`` SGD steps, then measures the test accuracy. Returns the
    new ``(params, state, velocity)`` and per-step training losses and
    per-evaluation test accuracies, each ``(seeds, lrs, ...)``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)

    def loss_fn(params, state, x, y):
        logits, state = apply(params, state, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    def test_accuracy(params, state):
        logits, _ = apply(params, state, x_test, False)
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    def one_run(params, state, velocity, lr, indices):
        def step(carry, index):
            params, state, velocity = carry
            (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, x_train[index], y_train[index]
            )
            velocity = jax.tree.map(lambda v, g: args.momentum * v + g, velocity, grads)
            params = jax.tree.map(lambda p, v: p - lr * v, params, velocity)
            return (params, state, velocity), loss

        def evaluation(carry, chunk_indices):
            carry, losses = jax.lax.scan(step, carry, chunk_indices)
            return carry, (losses, test_accuracy(carry[0], carry[1]))

        (params, state, velocity), (losses, accuracies) = jax.lax.scan(
            evaluation, (params, state, velocity), indices
        )
        return params, state, velocity, losses.reshape(-1), accuracies

    over_lrs = jax.vmap(
        one_run, in_axes=(0, 0, 0, 0, None)
    )  # each lr has its own copy of the weights
    over_seeds = jax.vmap(over_lrs, in_axes=(0, 0, 0, None, 0))
    return jax.jit(over_seeds)


def train_all(
    args: argparse.Namespace, data, indices: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """Trains every setting; returns per setting ``losses`` (seeds, lrs, steps) and ``accuracies``
    (seeds, lrs, evaluations), the first after ``eval_every`` steps."""
    import jax
    import jax.numpy as jnp

    seeds, n_lrs, evaluations = args.seeds, len(args.lrs), indices.shape[1]
    lrs = jnp.asarray(args.lrs, jnp.float32)
    per_call = max(1, evaluations // 10)  # evaluations per compiled call: ~10 calls per setting
    calls = [(setting, start) for setting in SETTINGS for start in range(0, evaluations, per_call)]
    results = {}
    for setting, start in progress(calls, desc="training", enabled=not args.no_progress):
        if start == 0:
            init, apply = make_network(args, setting == "BatchNorm")
            chunk = make_trainer(args, apply, data)
            # The same initial weights for every learning rate of a seed.
            params, state = jax.tree.map(
                lambda *a: jnp.asarray(np.repeat(np.stack(a)[:, None], n_lrs, axis=1)),
                *[init(seed) for seed in range(seeds)],
            )
            velocity = jax.tree.map(jnp.zeros_like, params)
            losses, accuracies = [], []
            results[setting] = {"losses": losses, "accuracies": accuracies}
        params, state, velocity, chunk_losses, chunk_accuracies = chunk(
            params, state, velocity, lrs, indices[:, start : start + per_call]
        )
        losses.append(np.asarray(chunk_losses))
        accuracies.append(np.asarray(chunk_accuracies))
    return {
        setting: {key: np.concatenate(parts, -1) for key, parts in run.items()}
        for setting, run in results.items()
    }


def summarize(args: argparse.Namespace, runs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per setting and learning rate: steps to the target, final accuracy and loss, divergence, per seed."""
    steps_of_evaluation = (
        np.arange(runs[SETTINGS[0]]["accuracies"].shape[-1]) + 1
    ) * args.eval_every
    chance = math.log(10.0)
    summary: dict[str, Any] = {}
    for setting, run in runs.items():
        losses, accuracies = run["losses"], run["accuracies"]
        final_loss = losses[..., -args.eval_every :].mean(
            -1
        )  # the mean over the last evaluation's steps
        diverged = ~np.isfinite(losses).all(-1) | ~(final_loss <= chance)
        reached = accuracies >= args.target
        steps = np.where(reached.any(-1), steps_of_evaluation[reached.argmax(-1)], -1)
        summary[setting] = {}
        for j, lr in enumerate(args.lrs):
            summary[setting][lr] = {
                "steps_to_target": [int(s) if s >= 0 else None for s in steps[:, j]],
                "final_accuracy": accuracies[:, j, -1].astype(float).tolist(),
                "final_loss": final_loss[:, j].astype(float).tolist(),
                "diverged": diverged[:, j].tolist(),
            }
    return summary


def steps_cell(steps: list[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    if not reached:
        return f"not reached (0/{len(steps)})"
    spread = f" ± {np.std(reached):.0f}" if len(reached) > 1 else ""
    return f"{np.mean(reached):.0f}{spread} ({len(reached)}/{len(steps)})"


def loss_cell(losses: list[float]) -> str:
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < len(losses):
        return f"non-finite ({len(losses) - len(finite)}/{len(losses)})"
    return mean_and_spread(finite) if max(finite) < 1e3 else f"{np.mean(finite):.2e}"


def plot_curves(args: argparse.Namespace, runs, path_name: str):
    plt = pyplot()
    n = len(args.lrs)
    figure, axes = plt.subplots(2, n, figsize=(2.6 * n, 6.0), squeeze=False, sharey="row")
    colors = {"BatchNorm": "tab:blue", "no BatchNorm": "tab:orange"}
    for setting, run in runs.items():
        accuracies, losses = run["accuracies"], run["losses"]
        eval_steps = (np.arange(accuracies.shape[-1]) + 1) * args.eval_every
        # The training loss averaged over each evaluation interval, to smooth the per-batch noise.
        interval_losses = losses.reshape(*losses.shape[:2], -1, args.eval_every).mean(-1)
        loss_steps = (np.arange(interval_losses.shape[-1]) + 1) * args.eval_every
        for j, lr in enumerate(args.lrs):
            for row, (x, y) in enumerate(
                ((eval_steps, accuracies[:, j]), (loss_steps, interval_losses[:, j]))
            ):
                ax = axes[row, j]
                with np.errstate(invalid="ignore"):
                    ax.plot(x, np.mean(y, 0), color=colors[setting], label=f"{setting} (mean)")
                    if len(y) > 1:
                        ax.fill_between(
                            x,
                            np.min(y, 0),
                            np.max(y, 0),
                            color=colors[setting],
                            alpha=0.2,
                            label=f"{setting} (min-max over seeds)",
                        )
    for j, lr in enumerate(args.lrs):
        axes[0, j].set_title(f"lr {lr:g}")
        axes[0, j].axhline(
            args.target,
            color="gray",
            linestyle="--",
            linewidth=0.8,
            label=f"target {args.target:g}",
        )
        axes[0, j].set_ylim(0, 1)
        axes[1, j].set_yscale("log")
        axes[1, j].set_ylim(1e-3, 1e2)
        axes[1, j].set_xlabel("SGD step")
    axes[0, 0].set_ylabel("test accuracy\n(running averages)")
    axes[1, 0].set_ylabel(
        "training loss\n(mean over 20 steps; gaps: NaN)".replace("20", str(args.eval_every))
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="lower center",
        ncol=len(labels),
        fontsize=8,
        bbox_to_anchor=(0.5, -0.04),
    )
    optimizer = "plain SGD" if args.momentum == 0 else f"SGD, momentum {args.momentum:g}"
    figure.suptitle(
        f"MLP on digits with and without BatchNorm: {optimizer}, batch {args.batch_size}, "
        f"{args.seeds} seed(s)"
    )
    return save_figure(figure, args.out, path_name)


def plot_summary(args: argparse.Namespace, summary, path_name: str):
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"BatchNorm": "tab:blue", "no BatchNorm": "tab:orange"}
    for offset, (setting, rows) in zip((-0.04, 0.04), summary.items()):
        lrs = np.asarray(args.lrs) * 10**offset  # side by side on the log axis
        accuracy = [np.mean(rows[lr]["final_accuracy"]) for lr in args.lrs]
        accuracy_std = [np.std(rows[lr]["final_accuracy"]) for lr in args.lrs]
        left.errorbar(
            lrs,
            accuracy,
            yerr=accuracy_std,
            marker="o",
            capsize=3,
            color=colors[setting],
            label=setting,
        )
        diverged = [
            (x, a) for lr, x, a in zip(args.lrs, lrs, accuracy) if any(rows[lr]["diverged"])
        ]
        if diverged:
            left.scatter(
                *zip(*diverged),
                marker="x",
                s=90,
                color=colors[setting],
                zorder=3,
                label=f"{setting}: a seed diverged",
            )
        steps = [[s for s in rows[lr]["steps_to_target"] if s is not None] for lr in args.lrs]
        shown = [(x, np.mean(s), np.std(s)) for x, s in zip(lrs, steps) if s]
        if shown:
            x, mean, std = zip(*shown)
            right.errorbar(
                x, mean, yerr=std, marker="o", capsize=3, color=colors[setting], label=setting
            )
    left.axhline(
        args.target, color="gray", linestyle="--", linewidth=0.8, label=f"target {args.target:g}"
    )
    left.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="final test accuracy",
        ylim=(0, 1.02),
        title="Final test accuracy (mean ± std over seeds)",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel=f"SGD steps to test accuracy {args.target:g}",
        title="Steps to the target (seeds that reached it)",
    )
    left.legend(fontsize=8, loc="lower left")
    if right.lines:
        right.legend(fontsize=8)
    else:
        right.text(
            0.5, 0.5, "no learning rate reached the target", ha="center", transform=right.transAxes
        )
    return save_figure(figure, args.out, path_name)


def findings(args: argparse.Namespace, summary) -> str:
    """The "What this shows" paragraph, worded from the numbers."""
    bn, plain = (summary[s] for s in SETTINGS)

    def all_reached(rows, lr):
        return all(s is not None for s in rows[lr]["steps_to_target"]) and not any(
            rows[lr]["diverged"]
        )

    def mean_steps(rows, lr):
        return float(np.mean(rows[lr]["steps_to_target"]))

    def fastest(rows):
        usable = [lr for lr in args.lrs if all_reached(rows, lr)]
        return min(usable, key=lambda lr: mean_steps(rows, lr)) if usable else None

    lines = []
    target = f"test accuracy {args.target:g}"
    bn_lr, plain_lr = fastest(bn), fastest(plain)
    if bn_lr is None and plain_lr is None:
        lines.append(
            f"Neither network reached {target} in every seed at any learning rate within {args.steps} "
            "steps, so the speed claim is not tested here."
        )
    elif plain_lr is None or bn_lr is None:
        winner, loser = ("with", "without") if plain_lr is None else ("without", "with")
        lr = bn_lr if plain_lr is None else plain_lr
        rows = bn if plain_lr is None else plain
        lines.append(
            f"Only the network {winner} BatchNorm reached {target} in every seed (at best in "
            f"{mean_steps(rows, lr):.0f} steps, lr {lr:g}); {loser} it, no learning rate got there "
            f"within {args.steps} steps."
        )
    else:
        ratio = mean_steps(plain, plain_lr) / mean_steps(bn, bn_lr)
        verdict = (
            f"BatchNorm got there {ratio:.1f}x faster"
            if ratio > 1
            else "BatchNorm was NOT faster"
            + (" (the same number of steps)" if ratio == 1 else f" ({1 / ratio:.1f}x slower)")
        )
        lines.append(
            f"At its best learning rate each network reached {target} in: with BatchNorm "
            f"{mean_steps(bn, bn_lr):.0f} steps (lr {bn_lr:g}), without {mean_steps(plain, plain_lr):.0f} "
            f"steps (lr {plain_lr:g}): {verdict}."
        )
    both = [lr for lr in args.lrs if all_reached(bn, lr) and all_reached(plain, lr)]
    faster = [lr for lr in both if mean_steps(bn, lr) < mean_steps(plain, lr)]
    only_bn = [lr for lr in args.lrs if all_reached(bn, lr) and not all_reached(plain, lr)]
    only_plain = [lr for lr in args.lrs if all_reached(plain, lr) and not all_reached(bn, lr)]
    same_lr = (
        [
            f"at the same learning rate, BatchNorm needed fewer steps at {len(faster)} of the {len(both)} "
            "learning rates where both reached the target"
        ]
        if both
        else []
    )
    if only_bn:
        same_lr.append("only BatchNorm reached it at lr " + ", ".join(f"{lr:g}" for lr in only_bn))
    if only_plain:
        same_lr.append(
            "only the network without BatchNorm reached it at lr "
            + ", ".join(f"{lr:g}" for lr in only_plain)
        )
    if same_lr:
        joined = "; ".join(same_lr)
        lines.append(joined[0].upper() + joined[1:] + ".")

    def largest_stable(rows):
        stable = [lr for lr in args.lrs if not any(rows[lr]["diverged"])]
        return max(stable) if stable else None

    bn_top, plain_top = largest_stable(bn), largest_stable(plain)
    diverged_somewhere = {
        s: [lr for lr in args.lrs if any(summary[s][lr]["diverged"])] for s in SETTINGS
    }

    def describe(top, setting):
        if top is None:
            return f"{setting} diverged at every learning rate"
        bad = diverged_somewhere[setting]
        return f"{setting} trained without divergence up to lr {top:g}" + (
            " (diverged at " + ", ".join(f"{lr:g}" for lr in bad) + ")"
            if bad
            else " (never diverged)"
        )

    sentence = f"{describe(bn_top, 'BatchNorm')}; {describe(plain_top, 'no BatchNorm')}: "
    if bn_top is not None and (plain_top is None or bn_top > plain_top):
        sentence += "BatchNorm tolerated higher learning rates, as claimed."
    elif bn_top == plain_top:
        sentence += (
            "the claim that BatchNorm tolerates higher learning rates does NOT show in this sweep "
            f"(both were stable up to the largest lr tried, {max(args.lrs):g})"
            if bn_top == max(args.lrs)
            else "the claim that BatchNorm tolerates higher learning rates "
            "does NOT show in this sweep (both have the same largest stable lr)."
        )
        if not sentence.endswith("."):
            sentence += "."
    else:
        sentence += "the claim that BatchNorm tolerates higher learning rates does NOT hold here."
    lines.append(sentence)

    def best_accuracy(rows):
        lr = max(args.lrs, key=lambda lr: np.mean(rows[lr]["final_accuracy"]))
        return lr, np.mean(rows[lr]["final_accuracy"]), np.std(rows[lr]["final_accuracy"])

    (bn_acc_lr, bn_acc, bn_std), (plain_acc_lr, plain_acc, plain_std) = (
        best_accuracy(bn),
        best_accuracy(plain),
    )
    gap = bn_acc - plain_acc
    if abs(gap) <= max(bn_std, plain_std, 1 / 450):  # 1/450: one test image of the 450
        comparison = "the same within the spread over seeds"
    else:
        comparison = f"{'higher' if gap > 0 else 'lower'} with BatchNorm by {abs(gap):.3f}"
    lines.append(
        f"The best final test accuracy was {mean_and_spread(bn[bn_acc_lr]['final_accuracy'])} with "
        f"BatchNorm (lr {bn_acc_lr:g}) and {mean_and_spread(plain[plain_acc_lr]['final_accuracy'])} without "
        f"(lr {plain_acc_lr:g}): {comparison}."
    )
    return " ".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the sweep; returns ``{setting: {lr: {...}}}`` for ``setting`` in ("BatchNorm", "no BatchNorm"),
    each with per-seed lists ``steps_to_target`` (None: not reached), ``final_accuracy``, ``final_loss`` and
    ``diverged``, plus ``"figures"`` (the PNG paths) and ``"report"`` (the markdown path)."""
    started = time.perf_counter()
    args = parse_args(argv)
    data = load_digits(0)
    evaluations = args.steps // args.eval_every
    indices = np.stack(
        [
            batch_indices(
                np.random.default_rng(seed), len(data.y_train), args.batch_size, args.steps
            ).reshape(evaluations, args.eval_every, args.batch_size)
            for seed in range(args.seeds)
        ]
    )
    runs = train_all(args, data, indices)
    summary = summarize(args, runs)

    header = [
        "lr",
        "network",
        f"steps to {args.target:g} (seeds reached)",
        "final test accuracy",
        "final training loss",
        "diverged seeds",
    ]
    rows = [
        [
            f"{lr:g}",
            setting,
            steps_cell(summary[setting][lr]["steps_to_target"]),
            mean_and_spread(summary[setting][lr]["final_accuracy"]),
            loss_cell(summary[setting][lr]["final_loss"]),
            f"{sum(summary[setting][lr]['diverged'])}/{args.seeds}",
        ]
        for lr in args.lrs
        for setting in SETTINGS
    ]
    table = markdown_table(header, rows)
    optimizer = "plain SGD" if args.momentum == 0 else f"SGD with momentum {args.momentum:g}"
    setup = (
        f"MLP 64-{'-'.join([str(args.width)] * args.hidden_layers)}-10 (ReLU, He init) on digits "
        f"({len(data.y_train)} train / {len(data.y_test)} test images), {optimizer}, batch {args.batch_size}, "
        f"{args.steps} steps, {args.seeds} seed(s); test accuracy every {args.eval_every} steps with the "
        f"running averages (momentum {BN_MOMENTUM}); mean ± std over seeds. A run diverged when its loss "
        "turned non-finite or its final training loss (the mean over the last evaluation interval) stayed "
        "above the loss at initialization, ln 10."
    )
    print(setup + "\n\n" + table)
    curves = plot_curves(args, runs, f"{NAME}_curves.png")
    summary_png = plot_summary(args, summary, f"{NAME}_summary.png")
    what = findings(args, summary)
    print("\nWhat this shows: " + what)
    body = (
        f"{setup}\n\n{table}\n\n![test accuracy and training loss per learning rate]({curves.name})\n\n"
        f"![final accuracy and steps to the target against the learning rate]({summary_png.name})\n\n"
        f"**What this shows.** {what}\n"
    )
    report = write_report(
        args.out,
        NAME,
        "BatchNorm, convergence speed and the learning rate",
        body,
        started=started,
        argv=argv,
    )
    return {**summary, "figures": [curves, summary_png], "report": report}


if __name__ == "__main__":
    main()
