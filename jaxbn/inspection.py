"""Batch against running statistics, per BatchNorm: :func:`inspect_batch_norms` and :func:`plot`."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxbn._flax import node_at, path_name, unboxed
from jaxbn.recalibration import check_options, layer_moments, merged_moments, running_stats

__all__ = ["LayerReport", "inspect_batch_norms", "plot"]


class LayerReport(NamedTuple):
    """One BatchNorm's statistics for a batch (NumPy float64 arrays per feature): ``mean_shift``
    is ``(batch_mean - running_mean) / sqrt(running_var + eps)``, ``log_var_ratio`` is
    ``log((batch_var + eps) / (running_var + eps))``, ``drift`` the root mean square of both over
    the features (0: the running statistics describe the batch; about 1: one running standard
    deviation off, or e times the spread), ``dead_features`` the features whose batch variance
    is at most ``eps`` (e.g. a ReLU never firing)."""

    path: tuple
    count: np.ndarray  # type: ignore[assignment]  # the field shadows tuple.count
    batch_mean: np.ndarray
    batch_var: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    mean_shift: np.ndarray
    log_var_ratio: np.ndarray
    drift: float
    dead_features: int


def inspect_batch_norms(
    model: Any,
    variables_or_batch: Any,
    batch: Any = None,
    *,
    normalize_with: str = "running",
    **call_kwargs: Any,
) -> list[LayerReport]:
    """Compares every BatchNorm's input statistics on ``batch`` with its running statistics: a
    :class:`LayerReport` per BatchNorm, in the order they were first called.

    The batch runs through the model once (jitted), each BatchNorm normalizing with its
    running statistics (``normalize_with="running"``, as inference does) or the batch's
    (``"batch"``); nothing is updated.

    Args:
      model: a ``flax.linen`` module (then the variables come next) or a ``flax.nnx`` module.
      variables_or_batch: linen: the model's variables; nnx: the batch.
      batch: linen: the batch (the first argument, or a tuple of the positional arguments).
      normalize_with: ``"running"`` or ``"batch"``.
      **call_kwargs: keyword arguments of the model's call.

    Raises:
      ValueError: no BatchNorm was called, or ``normalize_with`` is not one of its values.

    >>> import jax, flax.linen as nn, jaxbn.linen
    >>> from jaxbn.inspection import inspect_batch_norms
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return jaxbn.linen.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
    >>> x = jax.random.normal(jax.random.key(0), (64, 2)) + 10.0
    >>> (report,) = inspect_batch_norms(Net(), Net().init(jax.random.key(1), x), x)
    >>> report.path, report.drift > 1  # the initial statistics (0, 1) are far from these activations
    (('BatchNorm_0',), True)
    """
    linen = check_options(model, normalize_with, "population")
    if linen and batch is None:
        raise TypeError("inspect_batch_norms(linen_model, variables, batch): the batch is missing.")
    if not linen and batch is not None:
        raise TypeError(
            "inspect_batch_norms(nnx_module, batch): pass the batch as the second argument."
        )
    variables, batch = (variables_or_batch, batch) if linen else (None, variables_or_batch)
    tree = running_stats(model, variables)
    info: dict[tuple, tuple[float, bool]] = {}
    (layers,) = layer_moments(model, variables, [batch], normalize_with, call_kwargs, info)
    reports = []
    for path, calls in layers.items():
        count, mean, var = merged_moments(calls)  # a layer called several times: all its inputs
        node, eps = tree[path] if variables is None else node_at(tree, path), info[path][0]
        rm, rv = (np.asarray(unboxed(node[k]), float).reshape(mean.shape) for k in ("mean", "var"))
        shift, ratio = (mean - rm) / np.sqrt(rv + eps), np.log((var + eps) / (rv + eps))
        valid = count > 0
        drift = float(np.sqrt(np.mean((shift**2 + ratio**2)[valid]))) if valid.any() else 0.0
        dead = int(np.sum(valid & (var <= eps)))
        reports.append(LayerReport(path, count, mean, var, rm, rv, shift, ratio, drift, dead))
    if not reports:
        raise ValueError(
            "inspect_batch_norms found no BatchNorm call in the model with these arguments."
        )
    return reports


def plot(reports: list[LayerReport], path: str | None = None) -> Any:
    """A ``matplotlib.figure.Figure``: bar charts of each layer's drift and dead features.

    Args:
      reports: what :func:`inspect_batch_norms` returned.
      path: a file to save the figure to (its suffix picks the format), or None.

    Raises:
      ImportError: matplotlib is not installed.

    >>> import numpy as np
    >>> from jaxbn.inspection import LayerReport, plot
    >>> z = np.zeros(2)
    >>> figure = plot([LayerReport(("stem",), z, z, z, z, z, z, z, 0.5, 0)])
    >>> [text.get_text() for text in figure.axes[1].texts]
    ['no dead features']
    """
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError(
            "jaxbn.inspection.plot needs matplotlib: pip install matplotlib"
        ) from None
    names = [path_name(report.path) for report in reports]
    rows = np.arange(len(reports))
    longest = max((len(name) for name in names), default=0)
    size = (6.0 + 0.075 * longest, 1.5 + 0.3 * max(len(reports), 3))
    figure = Figure(figsize=size, layout="constrained")
    drift, dead = figure.subplots(1, 2, sharey=True, width_ratios=(2, 1))
    drift.barh(rows, [report.drift for report in reports], color="tab:blue")
    drift.set_yticks(rows, names)
    drift.invert_yaxis()  # the first layer on top
    drift.set_xlabel("drift (batch vs running)")
    counts = [report.dead_features for report in reports]
    if any(counts):
        dead.barh(rows, counts, color="tab:red")
        dead.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        options = {"ha": "center", "va": "center", "color": "tab:gray"}
        dead.text(0.5, 0.5, "no dead features", transform=dead.transAxes, **options)
        dead.tick_params(axis="x", bottom=False, labelbottom=False)
    dead.set_xlabel("dead features")
    dead.tick_params(axis="y", left=False)
    if path is not None:
        figure.savefig(path)
    return figure
