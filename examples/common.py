"""What the examples share: the digits data, progress bars, result tables and figures.

Copy this file next to an example to run it elsewhere. Every example takes
the arguments of :func:`example_parser` (``--quick``, ``--seeds`` where it
averages over seeds, ``--out``, ``--update-committed``, ``--no-progress``),
prints a markdown table, and writes its figures and a report
(``OUT/<name>.md``: the command, the date, the wall time and the table) with
:func:`write_report`, which prints where they went.

``OUT`` is by default a folder of the system's temporary directory
(:func:`default_out`), outside the repository: trying an example never
touches the committed results. ``--update-committed`` regenerates those:
``examples/figures`` (:data:`FIGURES`), or ``examples/figures/quick``
(:data:`QUICK_FIGURES`) with ``--quick``, whose reports the test suite
compares with reruns of the quick modes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shlex
import sys
import tempfile
import time
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

#: The committed full-mode reports and figures (shown in examples/README.md).
FIGURES = pathlib.Path(__file__).resolve().parent / "figures"
#: The committed quick-mode reports, which tests/test_examples.py compares with reruns.
QUICK_FIGURES = FIGURES / "quick"

_saved: list[pathlib.Path] = []  # the figures saved since the last report, which write_report lists


class Split(NamedTuple):
    """A train/test split of scikit-learn's digits: float32 inputs, int32 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def default_out(name: str) -> pathlib.Path:
    """Where an example writes by default: ``<temp dir>/jaxbn-examples/<name>``, outside the repository."""
    return pathlib.Path(tempfile.gettempdir()) / "jaxbn-examples" / name


def example_parser(
    description: str, name: str, *, seeds: int | None = 3
) -> argparse.ArgumentParser:
    """Returns a parser with the arguments every example takes; an example adds its own.

    Args:
      description: the example's one-line description.
      name: the example's name (``examples/<name>.py``): it names the report and the default output folder.
      seeds: the default number of seeds; None: the example takes no ``--seeds`` (it runs each setting once).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.set_defaults(example_name=name)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run that checks the code works (the test suite uses it); its numbers mean little",
    )
    if seeds is not None:
        parser.add_argument("--seeds", type=int, default=seeds, help="independent runs per setting")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"where the PNGs and the report go (default: {default_out(name)}, outside the repository)",
    )
    where.add_argument(
        "--update-committed",
        action="store_true",
        help=f"write into {FIGURES.parent.name}/{FIGURES.name} ({FIGURES.parent.name}/{FIGURES.name}/"
        f"{QUICK_FIGURES.name} with --quick): regenerate the committed report and figures",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Rejects a non-positive ``--seeds`` through ``parser.error``, sets ``args.out``; returns ``args``.

    ``args.out`` becomes :data:`FIGURES` (:data:`QUICK_FIGURES` with ``--quick``) under
    ``--update-committed``, else :func:`default_out` unless ``--out`` was given.
    """
    if getattr(args, "seeds", 1) < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.update_committed:
        args.out = QUICK_FIGURES if args.quick else FIGURES
    elif args.out is None:
        args.out = default_out(args.example_name)
    return args


def force_cpu_devices(n: int) -> None:
    """Makes JAX show the CPU as ``n`` devices; must run before JAX starts its backend.

    Args:
      n: the number of host-platform devices.
    """
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={n}"])
    os.environ["JAX_PLATFORMS"] = (
        "cpu"  # else a GPU machine picks its accelerator and ignores the CPU devices
    )


def load_digits(seed: int = 0, *, images: bool = False, test_fraction: float = 0.25) -> Split:
    """Loads scikit-learn's bundled 8x8 digits (1797 images; nothing is downloaded), split by class.

    Args:
      seed: seed of the stratified split.
      images: ``(N, 8, 8, 1)`` NHWC images if True, else ``(N, 64)`` vectors.
      test_fraction: the share held out for testing.

    Returns:
      A :class:`Split` with pixel values scaled to [0, 1].
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)  # pixels are integers in [0, 16]
    x = x[..., None] if images else x.reshape(len(x), -1)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(x_train, y_train, x_test, y_test)


def batch_indices(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: shuffled epochs, each dropping its last partial batch.

    Args:
      rng: the generator that orders the examples.
      n: the number of examples.
      batch_size: examples per step, at most ``n``.
      steps: the number of steps.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size)


def progress(
    iterable: Iterable[Any],
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool = True,
) -> Iterable[Any]:
    """Wraps ``iterable`` in a tqdm progress bar on a terminal (stderr) when tqdm is installed.

    Args:
      iterable: what to iterate over.
      total: its length, where ``len`` cannot tell.
      desc: the bar's label.
      enabled: False returns ``iterable`` unchanged.
    """
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 3) -> str:
    """Formats rows as a markdown table; floats get ``digits`` decimals, None becomes '-'.

    >>> print(markdown_table(["lr", "accuracy"], [[0.1, 0.9712], [1.0, None]]))
    | lr | accuracy |
    | --- | --- |
    | 0.100 | 0.971 |
    | 1.000 | - |
    """

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_and_spread(values: Sequence[float]) -> str:
    """``'mean ± std'`` over seeds (``'mean'`` for one value), three decimals.

    >>> mean_and_spread([0.9, 0.95, 1.0])
    '0.950 ± 0.041'
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std():.3f}"


def differs(a: Sequence[float], b: Sequence[float], resolution: float) -> bool:
    """Whether two per-seed results differ by more than the sum of their stds over seeds (and ``resolution``).

    >>> differs([0.90, 0.92], [0.97, 0.99], resolution=1 / 360), differs([0.90, 0.95], [0.93], 1 / 360)
    (True, False)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return abs(float(a.mean() - b.mean())) > max(float(a.std() + b.std()), resolution)


def save_figure(figure: Any, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Writes a matplotlib figure as ``out_dir/name``, closes it and returns the path.

    The PNG is stored with a palette of 128 colours (about a quarter of the size; plots
    have few colours), so that the figures committed with the examples stay small.
    """
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)
    shrink_png(path)
    _saved.append(path)
    return path


def shrink_png(path: pathlib.Path) -> None:
    """Rewrites the PNG at ``path`` with a 128-colour palette (Pillow comes with matplotlib)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(
    out_dir: pathlib.Path,
    name: str,
    title: str,
    body: str,
    *,
    started: float,
    argv: Sequence[str] | None,
) -> pathlib.Path:
    """Writes ``out_dir/name.md``: the title, the command, the date, the wall time and ``body``; prints the files.

    The printed line, ``wrote <files> in <out_dir>``, lists the report and the figures
    :func:`save_figure` wrote to ``out_dir`` since the last report.

    Args:
      out_dir: the output folder.
      name: the example's name (the file is ``name.md``).
      title: a heading.
      body: the tables and findings, markdown.
      started: ``time.perf_counter()`` when the run began.
      argv: the arguments the example ran with (None: ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", f"examples/{name}.py", *argv])
    seconds = time.perf_counter() - started
    header = (
        f"## {title}\n\n`{command}` on {datetime.date.today().isoformat()}, "
        f"{seconds:.0f} s on {os.cpu_count()} CPU core(s)\n\n"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text(header + body.rstrip() + "\n")
    written = [p.name for p in dict.fromkeys(_saved) if p.parent == out_dir] + [path.name]
    _saved.clear()
    print(f"\nwrote {', '.join(written)} in {out_dir}", flush=True)
    return path
