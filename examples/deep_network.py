"""A 100-layer plain MLP with and without BatchNorm, at the standard initialization and wrong ones.

The claims under test: BatchNorm lets a very deep network without residual
connections train, and makes it insensitive to the scale of the initial
weights, because every layer's output is renormalized and the gradients
neither vanish nor explode. The network is a plain MLP on scikit-learn's
bundled 8x8 digits (nothing is downloaded): ``--depths`` hidden ReLU layers
(default 10, 30 and 100: the deepest is the claim, the others show where it
starts to fail) of ``--width`` units (the first maps the 64 pixels to the
width), then a linear head, with no skip connections. Each hidden ``Dense``
is followed by ``jaxbn.batch_norm`` (running-average momentum 0.9; the
``Dense`` then has no bias) or by nothing (a bias). The weights start from
the He-normal initialization (LeCun for the head) times ``--init-scales``
(default 0.5, 1 and 2: the standard one and one scaled wrong each way).
Every setting trains with SGD (momentum 0.9, one learning rate for all;
``--optimizer adam`` for Adam) over several seeds.

The script reports, per depth and setting, the final training loss (the mean
over the last steps' batches), the test accuracy (with the running averages,
as a deployed model would use them), and the norm of each layer's weight
gradient on a fixed batch of 256 training images at initialization and after
training; the ratio of the first hidden layer's to the last one's shows
whether the gradients grow or shrink towards the input. It writes
``deep_network_loss.png`` (training loss against step, one panel per depth)
and ``deep_network_gradients.png`` (gradient norm against layer, log scale),
prints the table and writes ``OUT/deep_network.md``, whose "What this shows"
is worded from the measured numbers.

Measured on 2026-12-06 (3 seeds, 1000 steps, SGD lr 0.01): at 10 and 30
layers BatchNorm trained at every init scale (test accuracy 0.95-0.98 at 10
layers, 0.56-0.77 at 30) while without it only the standard scale trained
(x0.5 stalled near chance, test accuracy 0.19 at 10 layers and 0.10 at 30;
x2 overflowed to a non-finite loss). At 100 layers
the claim does NOT hold: no setting learned anything (test accuracy 0.10),
with or without BatchNorm. With BatchNorm the gradient at initialization
grows ~1.21x per layer towards the input (2.1e8x from the last hidden layer
to the first at 100 layers), the gradient explosion that Yang et al. (2019)
predict for BatchNorm networks without skip connections; Adam (lr 1e-3 and
1e-4, one seed, 400 steps) did not train the 100-layer BatchNorm network
either.

The layers run under ``jax.lax.scan`` over stacked weights, the steps under
``scan`` too, and ``jax.vmap`` maps over seeds and initial scales: each
depth is two compiled programs (with and without BatchNorm), called a chunk
of steps at a time for the progress bar.

    python examples/deep_network.py                 # 10, 30 and 100 layers, 3 seeds
    python examples/deep_network.py --depths 100 200 --optimizer adam --lr 0.001
    python examples/deep_network.py --quick         # a few seconds; numbers mean little

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

NAME = "deep_network"
NETWORKS = ("BatchNorm", "no BatchNorm")
BN_MOMENTUM = 0.9
GRADIENT_BATCH = 256  # training images on which the per-layer gradient norms are measured
LEARNED_ACCURACY = 0.5  # a setting "trained" when its mean test accuracy reaches this (chance: 0.1)
CALLS_PER_RUN = 10  # compiled calls per network and depth, for the progress bar


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=[10, 30, 100],
        help="hidden layers (each Dense [+ BatchNorm] + ReLU); the deepest is the claim under test, "
        "the others show where it starts to matter",
    )
    parser.add_argument("--width", type=int, default=32, help="units per hidden layer")
    parser.add_argument(
        "--init-scales",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0],
        help="factors on the He/LeCun standard deviation of the initial weights",
    )
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam"), default="sgd", help="SGD with momentum 0.9, or Adam"
    )
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    args = check_args(parser, parser.parse_args(argv))
    if args.quick:
        args.depths, args.width, args.steps = [6], 16, 40
    if min(args.depths) < 2 or args.steps < 10 or min(args.init_scales) <= 0:
        parser.error("--depths must be >= 2, --steps >= 10 and --init-scales positive")
    args.depths = sorted(set(args.depths))
    return args


def make_network(args: argparse.Namespace, depth: int, use_bn: bool):
    """Returns ``init(seed, init_scale) -> (params, state)`` and
    ``apply(params, state, x, training) -> (logits, state)``; hidden layers are stacked on a leading axis."""
    import jax
    import jax.numpy as jnp

    import jaxbn

    width = args.width

    def init(seed, init_scale):  # numpy: nothing to compile
        rng = np.random.default_rng(seed)
        he_first, he_hidden, lecun_head = (
            math.sqrt(2 / 64),
            math.sqrt(2 / width),
            math.sqrt(1 / width),
        )
        params = {
            "first": init_scale * he_first * rng.standard_normal((64, width), np.float32),
            "hidden": init_scale
            * he_hidden
            * rng.standard_normal((depth - 1, width, width), np.float32),
            "head": {
                "w": init_scale * lecun_head * rng.standard_normal((width, 10), np.float32),
                "b": np.zeros(10, np.float32),
            },
        }
        if use_bn:
            bn_params, bn_state = jaxbn.batch_norm_init(width)
            params["norm"], state = jax.tree.map(
                lambda a: np.broadcast_to(a, (depth, width)), (bn_params, bn_state)
            )
        else:
            params["bias"], state = np.zeros((depth, width), np.float32), {}
        return params, state

    def apply(params, state, x, training):
        def layer(h, weights_and_state):
            w, norm, layer_state = weights_and_state
            h = h @ w
            if use_bn:
                h, layer_state = jaxbn.batch_norm(
                    h, norm, layer_state, training=training, momentum=BN_MOMENTUM
                )
            else:
                h = h + norm
            return jax.nn.relu(h), layer_state

        norm = params["norm"] if use_bn else params["bias"]
        first, rest = (
            jax.tree.map(lambda a: a[0], (norm, state)),
            jax.tree.map(lambda a: a[1:], (norm, state)),
        )
        h, first_state = layer(x, (params["first"], *first))
        h, rest_state = jax.lax.scan(layer, h, (params["hidden"], *rest))
        new_state = jax.tree.map(
            lambda a, b: jnp.concatenate([a[None], b]), first_state, rest_state
        )
        return h @ params["head"]["w"] + params["head"]["b"], new_state

    return init, apply


def layer_gradient_norms(grads) -> Any:
    """The Frobenius norm of each weight matrix's gradient, first hidden layer to head, without overflow."""
    import jax.numpy as jnp

    def norms(g):  # (..., fan_in, fan_out) -> (...)
        largest = jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True)
        safe = jnp.where(largest > 0, largest, 1.0)
        return (safe * jnp.sqrt(jnp.sum((g / safe) ** 2, axis=(-2, -1), keepdims=True)))[..., 0, 0]

    return jnp.concatenate(
        [norms(grads["first"])[None], norms(grads["hidden"]), norms(grads["head"]["w"])[None]]
    )


def make_optimizer(args: argparse.Namespace):
    import optax

    return optax.sgd(args.lr, momentum=0.9) if args.optimizer == "sgd" else optax.adam(args.lr)


def make_functions(args: argparse.Namespace, apply, data):
    """Jitted over models (seeds x init scales): ``chunk`` runs SGD steps, ``measure`` returns the per-layer
    gradient norms and the test accuracy with the running averages."""
    import jax
    import jax.numpy as jnp
    import optax

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    optimizer = make_optimizer(args)
    x_probe, y_probe = x_train[:GRADIENT_BATCH], y_train[:GRADIENT_BATCH]

    def loss_fn(params, state, x, y):
        logits, state = apply(params, state, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    def one_chunk(params, state, opt_state, indices):
        def step(carry, index):
            params, state, opt_state = carry
            (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state, x_train[index], y_train[index]
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), state, opt_state), loss

        (params, state, opt_state), losses = jax.lax.scan(step, (params, state, opt_state), indices)
        return params, state, opt_state, losses

    def measure(params, state):
        grads, _ = jax.grad(loss_fn, has_aux=True)(params, state, x_probe, y_probe)
        logits, _ = apply(params, state, x_test, False)
        return layer_gradient_norms(grads), jnp.mean(jnp.argmax(logits, -1) == y_test)

    return jax.jit(jax.vmap(one_chunk)), jax.jit(jax.vmap(measure))


def train_depth(
    args: argparse.Namespace, depth: int, data, calls
) -> dict[str, dict[str, np.ndarray]]:
    """Trains both networks of ``depth`` layers at every init scale and seed, advancing the ``calls`` progress
    iterator once per compiled call. Returns, per network, arrays shaped (init scales, seeds, ...): ``losses``
    per step, ``grad_init`` and ``grad_final`` per layer, ``accuracy``."""
    import jax
    import jax.numpy as jnp

    scales, seeds = len(args.init_scales), args.seeds
    # One model per (init scale, seed), flattened; a seed has the same draws and batches at every scale.
    model_seeds = np.tile(np.arange(seeds), scales)
    model_scales = np.repeat(np.asarray(args.init_scales, np.float32), seeds)
    indices = np.stack(
        [
            batch_indices(
                np.random.default_rng(int(seed)), len(data.y_train), args.batch_size, args.steps
            )
            for seed in model_seeds
        ]
    )
    per_call = -(-args.steps // CALLS_PER_RUN)

    def unflatten(a):
        return np.asarray(a).reshape(scales, seeds, *np.shape(a)[1:])

    results = {}
    for network in NETWORKS:
        init, apply = make_network(args, depth, network == "BatchNorm")
        chunk, measure = make_functions(args, apply, data)
        optimizer = make_optimizer(args)
        params, state = jax.tree.map(
            lambda *a: jnp.asarray(np.stack(a)),
            *[init(seed, scale) for seed, scale in zip(model_seeds, model_scales)],
        )
        opt_state = jax.jit(jax.vmap(optimizer.init))(params)
        grad_init, _ = measure(params, state)
        losses = []
        for start in range(0, args.steps, per_call):
            next(calls)
            params, state, opt_state, chunk_losses = chunk(
                params, state, opt_state, indices[:, start : start + per_call]
            )
            losses.append(np.asarray(chunk_losses))
        grad_final, accuracy = measure(params, state)
        results[network] = {
            "losses": unflatten(np.concatenate(losses, -1)),
            "grad_init": unflatten(grad_init),
            "grad_final": unflatten(grad_final),
            "accuracy": unflatten(accuracy),
        }
    return results


def summarize(args: argparse.Namespace, runs) -> dict[str, dict[float, dict[str, list]]]:
    """Per network and init scale, per-seed lists: final loss, accuracy, gradient norms and first/last ratios."""
    last = max(1, args.steps // 20)  # the final loss averages the last 5% of the steps
    summary: dict[str, dict[float, dict[str, list]]] = {}
    for network, run in runs.items():
        summary[network] = {}
        for i, scale in enumerate(args.init_scales):
            losses = run["losses"][i]
            with np.errstate(all="ignore"):
                row = {
                    "final_loss": losses[:, -last:].mean(-1).astype(float).tolist(),
                    "diverged": (~np.isfinite(losses).all(-1)).tolist(),
                    "test_accuracy": run["accuracy"][i].astype(float).tolist(),
                }
                for when in ("init", "final"):
                    norms = run[f"grad_{when}"][
                        i
                    ]  # (seeds, layers): first hidden ... last hidden, head
                    row[f"grad_{when}"] = norms.astype(float).tolist()
                    row[f"ratio_{when}"] = (norms[:, 0] / norms[:, -2]).astype(float).tolist()
            summary[network][scale] = row
    return summary


def ratio_cell(row: dict[str, list], when: str) -> str:
    """The geometric mean over seeds of the first/last hidden layer's gradient norm, or what went wrong."""
    norms = np.asarray(row[f"grad_{when}"])[:, [0, -2]]
    if not np.isfinite(norms).all():
        return f"non-finite ({int((~np.isfinite(norms).all(-1)).sum())}/{len(norms)})"
    if (norms <= 0).any():
        return f"zero gradient ({int((norms <= 0).any(-1).sum())}/{len(norms)})"
    return f"{np.exp(np.log(row[f'ratio_{when}']).mean()):.2g}"


def value_cell(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"non-finite ({len(values) - len(finite)}/{len(values)})"
    return mean_and_spread(finite) if max(finite) < 1e3 else f"{np.mean(finite):.2e}"


COLORS = ("tab:purple", "tab:green", "tab:red", "tab:brown", "tab:cyan")


def setting_label(network: str, scale: float) -> str:
    return f"{network}, init x{scale:g}"


def plot_losses(args: argparse.Namespace, runs, name: str):
    plt = pyplot()
    n = len(args.depths)
    figure, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False, sharey=True)
    window = max(1, args.steps // 60)
    for ax, depth in zip(axes[0], args.depths):
        for network, style in zip(NETWORKS, ("-", "--")):
            for i, scale in enumerate(args.init_scales):
                losses = runs[depth][network]["losses"][i]
                with np.errstate(all="ignore"):
                    smooth = (
                        losses[:, : args.steps // window * window]
                        .reshape(len(losses), -1, window)
                        .mean(-1)
                    )
                ax.plot(
                    (np.arange(smooth.shape[-1]) + 1) * window,
                    smooth.mean(0),
                    style,
                    color=COLORS[i % len(COLORS)],
                    label=setting_label(network, scale),
                )
        ax.axhline(math.log(10), color="gray", linewidth=0.8, linestyle=":", label="chance (ln 10)")
        ax.set(yscale="log", ylim=(1e-2, 10), xlabel="step", title=f"{depth} hidden layers")
    axes[0, 0].set_ylabel(f"training loss (mean of {window} steps and the seeds)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.12)
    )
    figure.suptitle(
        f"Plain MLP (width {args.width}) on digits, {optimizer_name(args)}: training loss\n"
        "(a line ends where the loss turned non-finite; above the top: loss > 10)",
        y=1.04,
    )
    return save_figure(figure, args.out, name)


def plot_gradients(args: argparse.Namespace, runs, name: str):
    plt = pyplot()
    n = len(args.depths)
    figure, axes = plt.subplots(n, 2, figsize=(12, 3.6 * n), squeeze=False)
    for row, depth in zip(axes, args.depths):
        layers = np.arange(1, depth + 2)  # the hidden layers, then the head
        for ax, when in zip(row, ("init", "final")):
            for network, style in zip(NETWORKS, ("-", "--")):
                for i, scale in enumerate(args.init_scales):
                    with np.errstate(
                        all="ignore"
                    ):  # the geometric mean over seeds; NaN or 0 leave gaps
                        norms = np.exp(np.log(runs[depth][network][f"grad_{when}"][i]).mean(0))
                    ax.plot(
                        layers,
                        norms,
                        style,
                        color=COLORS[i % len(COLORS)],
                        label=setting_label(network, scale),
                    )
            ax.set(
                yscale="log",
                ylabel="weight-gradient norm",
                title=f"{depth} hidden layers, "
                + ("at initialization" if when == "init" else f"after {args.steps} steps"),
            )
    for ax in axes[-1]:
        ax.set_xlabel("layer (1: first hidden layer; last: the head)")
    figure.suptitle(
        f"Per-layer weight-gradient norms on {GRADIENT_BATCH} training images (geometric mean over "
        "seeds), log scale; a missing line: non-finite or zero gradients",
        y=1.0,
    )
    figure.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.0)
    )
    return save_figure(figure, args.out, name)


def findings(args: argparse.Namespace, summary) -> str:
    """The "What this shows" paragraph, worded from the numbers."""
    standard = 1.0 if 1.0 in args.init_scales else args.init_scales[0]
    deepest = max(args.depths)

    def learned(row):
        return not any(row["diverged"]) and float(np.mean(row["test_accuracy"])) >= LEARNED_ACCURACY

    def scales_learned(depth, network):
        return [s for s in args.init_scales if learned(summary[depth][network][s])]

    def listed(scales):
        return "at " + ", ".join(f"x{s:g}" for s in scales) if scales else "at no init scale"

    def trained_at(depth):
        with_bn, without = scales_learned(depth, "BatchNorm"), scales_learned(depth, "no BatchNorm")
        if not with_bn and not without:
            return f"at {depth} layers, at no init scale with or without BatchNorm"
        return f"at {depth} layers, with BatchNorm {listed(with_bn)} and without {listed(without)}"

    lines = [
        f"Counting a setting as trained when no seed diverged and the mean test accuracy reached "
        f"{LEARNED_ACCURACY:g}, the network trained: "
        + "; ".join(map(trained_at, args.depths))
        + "."
    ]
    robust = [
        d
        for d in args.depths
        if len(scales_learned(d, "BatchNorm")) == len(args.init_scales)
        and len(scales_learned(d, "no BatchNorm")) < len(args.init_scales)
    ]
    if robust:
        lines.append(
            "BatchNorm made training insensitive to the initial scale at "
            + ", ".join(f"{d}" for d in robust)
            + " layers, as claimed."
        )
    deep_bn = summary[deepest]["BatchNorm"][standard]
    if learned(deep_bn):
        lines.append(
            f"At {deepest} layers BatchNorm trained the plain network (test accuracy "
            f"{np.mean(deep_bn['test_accuracy']):.3f}), as claimed."
        )
    else:
        lines.append(
            f"The claim that BatchNorm lets a {deepest}-layer plain network train does NOT hold here: at "
            f"the standard initialization it ended at a training loss of {np.mean(deep_bn['final_loss']):.3g} "
            f"and a test accuracy of {np.mean(deep_bn['test_accuracy']):.3f}"
            f" ({'also' if not learned(summary[deepest]['no BatchNorm'][standard]) else 'while'} without "
            f"BatchNorm: {np.mean(summary[deepest]['no BatchNorm'][standard]['test_accuracy']):.3f})."
        )

    def ratio(depth, network, when, scale=standard):
        r = np.asarray(summary[depth][network][scale][f"ratio_{when}"])
        return float(np.exp(np.log(r).mean())) if np.isfinite(r).all() and (r > 0).all() else None

    bn_ratios = {d: ratio(d, "BatchNorm", "init") for d in args.depths}
    known = {d: r for d, r in bn_ratios.items() if r is not None}
    if known:
        lines.append(
            "At initialization the first hidden layer's gradient norm was, with BatchNorm, "
            + ", ".join(f"{r:.2g}x the last one's at {d} layers" for d, r in known.items())
            + "; without BatchNorm "
            + ", ".join(
                f"{ratio(d, 'no BatchNorm', 'init'):.2g}x"
                if ratio(d, "no BatchNorm", "init")
                else "not finite"
                for d in known
            )
            + " at the same depths."
        )
        d, r = max(known.items())
        if r > 10:
            lines.append(
                f"BatchNorm did NOT keep the gradients even across layers: they grow towards the input by "
                f"about {r ** (1 / d):.3f}x per layer, the gradient explosion at initialization that Yang et "
                "al. (2019, 'A mean field theory of batch normalization') predict for BatchNorm networks "
                "without skip connections, and that they find makes such networks untrainable at large "
                "depth."
            )
        after = ratio(d, "BatchNorm", "final")
        if after is not None:
            lines.append(
                f"After training, the BatchNorm network's ratio at {d} layers was {after:.2g}."
            )
    plain = summary[deepest]["no BatchNorm"]
    with np.errstate(all="ignore"):
        first = {
            s: float(np.exp(np.mean(np.log(np.asarray(plain[s]["grad_init"])[:, 0]))))
            for s in args.init_scales
        }
    relative = (
        {s: first[s] / first[standard] for s in args.init_scales if s != standard}
        if 0 < first[standard] < math.inf
        else {}
    )
    powers = [
        f"x{s:g}: {r:.2g} = {s:g}^{math.log(r) / math.log(s):.0f}"
        for s, r in relative.items()
        if math.isfinite(r) and r > 0
    ]
    lines.append(
        f"Without BatchNorm at {deepest} layers the first layer's gradient norm at initialization was "
        + ", ".join(f"{first[s]:.2g} at x{s:g}" for s in args.init_scales)
        + (
            f": relative to x{standard:g}, "
            + "; ".join(powers)
            + ", the scale to about the power of the "
            "depth (each layer multiplies the signal by the scale)."
            if powers
            else "."
        )
    )
    return " ".join(lines)


def optimizer_name(args: argparse.Namespace) -> str:
    return (
        f"SGD lr {args.lr:g}, momentum 0.9" if args.optimizer == "sgd" else f"Adam lr {args.lr:g}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every setting; returns ``{depth: {network: {init_scale: row}}}`` for network in ("BatchNorm",
    "no BatchNorm"), each row with per-seed lists ``final_loss``, ``diverged``, ``test_accuracy``,
    ``grad_init`` / ``grad_final`` (norm per layer, head last) and ``ratio_init`` / ``ratio_final``
    (first hidden layer's norm over the last one's), plus ``"figures"`` and ``"report"`` (paths)."""
    started = time.perf_counter()
    args = parse_args(argv)
    data = load_digits(0)
    per_call = -(-args.steps // CALLS_PER_RUN)
    calls = iter(
        progress(
            range(len(args.depths) * len(NETWORKS) * -(-args.steps // per_call)),
            desc="training",
            enabled=not args.no_progress,
        )
    )
    runs = {depth: train_depth(args, depth, data, calls) for depth in args.depths}
    next(calls, None)  # closes the progress bar
    summary = {depth: summarize(args, runs[depth]) for depth in args.depths}
    header = [
        "layers",
        "network",
        "init scale",
        "final training loss",
        "test accuracy",
        "diverged seeds",
        "grad norm first/last layer, init",
        "same, after training",
    ]
    rows = [
        [
            depth,
            network,
            f"x{scale:g}",
            value_cell(row["final_loss"]),
            value_cell(row["test_accuracy"]),
            f"{sum(row['diverged'])}/{args.seeds}",
            ratio_cell(row, "init"),
            ratio_cell(row, "final"),
        ]
        for depth in args.depths
        for network in NETWORKS
        for scale, row in summary[depth][network].items()
    ]
    table = markdown_table(header, rows)
    setup = (
        f"Plain MLP, {' / '.join(map(str, args.depths))} hidden layers of {args.width} units (ReLU, no skip "
        f"connections) on digits ({len(data.y_train)} train / {len(data.y_test)} test images); initial weights "
        f"He-normal (LeCun for the head) times the init scale; {optimizer_name(args)}, batch {args.batch_size}, "
        f"{args.steps} steps, {args.seeds} seed(s), mean ± std over seeds. Final training loss: the mean over "
        f"the last {max(1, args.steps // 20)} steps' batches. Test accuracy with the running averages "
        f"(momentum {BN_MOMENTUM}). Gradient ratios: the first hidden layer's weight-gradient norm over the "
        f"last one's, on {GRADIENT_BATCH} training images, geometric mean over seeds."
    )
    print(setup + "\n\n" + table)
    loss_png = plot_losses(args, runs, f"{NAME}_loss.png")
    gradient_png = plot_gradients(args, runs, f"{NAME}_gradients.png")
    what = findings(args, summary)
    print("\nWhat this shows: " + what)
    body = (
        f"{setup}\n\n{table}\n\n![training loss against step]({loss_png.name})\n\n"
        f"![per-layer gradient norms at initialization and after training]({gradient_png.name})\n\n"
        f"**What this shows.** {what}\n"
    )
    report = write_report(
        args.out,
        NAME,
        f"A {max(args.depths)}-layer plain network with and without BatchNorm",
        body,
        started=started,
        argv=argv,
    )
    return {**summary, "figures": [loss_png, gradient_png], "report": report}


if __name__ == "__main__":
    main()
