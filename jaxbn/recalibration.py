"""Re-estimating running statistics from data ("precise BN") for linen and nnx models.

Every BatchNorm (jaxbn's or flax's) is intercepted, reports its input's moments and normalizes
with them (or with the running statistics); the moments of all batches are merged exactly.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxbn import _validation, functional, stats
from jaxbn import linen as jaxbn_linen
from jaxbn import nnx as jaxbn_nnx
from jaxbn._flax import intercepted_nnx_calls, node_at, path_name, reboxed, unboxed

__all__ = ["recalibrate"]  # the helpers without a leading underscore serve jaxbn.inspection

_SOWN = "jaxbn_recalibrate"
_NORMALIZE_WITH = ("batch", "running")
_ESTIMATORS = ("population", "mean_of_batches")


def layer_moments(calls: list[tuple]) -> stats.Moments:
    """One layer's moments over all its calls (each sown as the fields of a :class:`jaxbn.Moments`), merged
    exactly by :func:`jaxbn.merge_moments`."""
    parts = [stats.Moments(*(jnp.asarray(field) for field in call)) for call in calls]
    if any(np.iscomplexobj(part.mean) for part in parts):
        raise TypeError("recalibrate does not support complex activations.")
    return stats.merge_moments(parts)


def _estimate(calls: list[tuple], estimator: str, unbiased: bool) -> tuple[np.ndarray, np.ndarray]:
    """The running ``(mean, var)`` a layer's calls give (NaN where no element was valid)."""
    if estimator == "mean_of_batches":  # PyTorch's update_bn: cumulative average of the batch statistics
        count, mean, var = (np.asarray([call[i] for call in calls], np.float64) for i in (2, 0, 1))
        return mean.mean(0), (var * count / np.maximum(count - 1, 1)).mean(0)
    merged = layer_moments(calls)
    n, mean, var = (np.asarray(value, np.float64) for value in (merged.count, merged.mean, merged.var))
    divisor = n - 1 if unbiased else n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, mean, np.nan), np.where(divisor > 0, var * n / divisor, np.nan)


def _normalized(x, params, state, axis, epsilon, dtype, mask, normalize_with, owner):
    """The batch's moments and the layer's output, normalized with them or with ``state``: batch norm with
    ``update_running_stats=False``. The model runs under ``jit`` on whole batches (sharded or not: XLA then
    reduces over the shards), so a layer's ``axis_name`` is not needed here. ``owner`` names the layer."""
    x = _validation.check_floating(x)
    feature_shape = _validation.feature_shape(x, axis)
    for collection, arrays in (("params", params), ("batch_stats", state)):
        for key, value in arrays.items():
            _validation.check_variable_size(value, math.prod(feature_shape), f"{collection}/{key}", owner)
    params = {key: jnp.reshape(value, feature_shape) for key, value in params.items()}
    state = {key: jnp.reshape(value, feature_shape) for key, value in state.items()}
    y, _, batch = functional.batch_norm(
        x, params, state, training=normalize_with == "batch", update_running_stats=False, return_moments=True,
        axis=axis, epsilon=epsilon, mask=mask, dtype=dtype,
    )
    return tuple(batch), y


def _on_terminal() -> bool:
    """Whether stderr is a terminal (False where there is no stderr, e.g. pythonw, or it is closed)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _progress(iterable: Iterable, progress: bool | None, description: str) -> Iterable:
    """``iterable`` wrapped in a tqdm bar if asked. None (the default): on a terminal, for more than a few
    batches, if tqdm is installed (never an error); True: always, raising if tqdm is missing."""
    if progress is None:
        few = isinstance(iterable, Sized) and len(iterable) <= 5
        if few or not _on_terminal():
            return iterable
    elif not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress is None:
            return iterable
        raise ImportError("recalibrate(progress=True) needs tqdm: pip install tqdm (or pass progress=None or "
                          "False)") from None
    return tqdm(iterable, desc=description, unit="batch")


def check_batches(batches: Any, function: str) -> None:
    """Raises unless ``batches`` is an iterable of batches (not one array, whose rows iteration would give)."""
    if hasattr(batches, "shape") and hasattr(batches, "ndim"):  # jax, numpy, torch ... arrays
        raise TypeError(
            f"{function}: batches must be an iterable of batches (e.g. [x] or a data loader), got one array "
            f"({type(batches).__name__}) of shape {tuple(batches.shape)}, which would be iterated row by row; "
            f"for one batch x pass [x] (for the rows of a stacked array as batches, list(x))."
        )
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"{function}: batches must be an iterable of batches (e.g. a list or a generator), got "
            f"{type(batches).__name__}; for one batch x pass [x]."
        )
    arrays = batches if isinstance(batches, tuple) else ()
    if len(arrays) > 1 and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in arrays) and (
        len({(tuple(a.shape), str(a.dtype)) for a in arrays}) > 1
    ):
        raise TypeError(
            f"{function}: batches is a tuple of arrays of different shapes or dtypes "
            f"({', '.join(f'{a.dtype}{list(a.shape)}' for a in arrays)}), which looks like one batch's "
            f"arguments (e.g. (x, mask)) but would be iterated as {len(arrays)} batches; pass a list of "
            f"batches, e.g. [(x, mask)] for one batch."
        )


def _nonempty(batches: Iterable, function: str) -> Iterator[Any]:
    """The batches, raising after the loop if there were none."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise ValueError(f"{function}: batches is empty; pass at least one batch.")


def _as_args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def check_options(normalize_with: str, estimator: str) -> None:
    if normalize_with not in _NORMALIZE_WITH:
        raise ValueError(f"normalize_with must be one of {_NORMALIZE_WITH}, got {normalize_with!r}.")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}.")


# -- linen ---------------------------------------------------------------------------------------

_LINEN_BATCH_NORMS = (nn.BatchNorm, jaxbn_linen.BatchNorm)


def _linen_interceptor(normalize_with: str, info: dict[tuple[str, ...], dict[str, Any]]):
    """Replaces each BatchNorm call by :func:`_normalized`; notes each layer's static settings in ``info``."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _LINEN_BATCH_NORMS):
            return next_fun(*args, **kwargs)
        info[tuple(module.path)] = {  # static, noted while tracing
            "unbiased": bool(getattr(module, "unbiased_running_var", False)), "epsilon": float(module.epsilon)}
        params = {key: module.get_variable("params", key) for key in ("scale", "bias")
                  if module.has_variable("params", key)}
        state = {key: module.get_variable("batch_stats", key) for key in ("mean", "var")}
        moments, y = _normalized(
            args[0], params, state, module.axis, module.epsilon, module.dtype, kwargs.get("mask"), normalize_with,
            f"{type(module).__name__} at '{path_name(module.path)}'",
        )
        module.sow("intermediates", _SOWN, moments)
        return y

    return intercept


def linen_layer_moments(
    model: nn.Module, variables: Mapping, batches: Iterable, normalize_with: str, call_kwargs: Mapping,
    info: dict[tuple[str, ...], dict[str, Any]],
) -> Iterator[dict[tuple[str, ...], list[tuple]]]:
    """Per batch, ``{layer path: [moments fields per call]}`` (host arrays) of a linen model's BatchNorms,
    in the order the layers are first called.

    Each layer's ``unbiased_running_var`` and ``epsilon`` are noted in ``info`` (empty when passed) while
    tracing, in that order.
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError(
            "variables must be the model's variables with a 'batch_stats' collection (what model.init "
            f"returns), got {type(variables).__name__} with keys "
            f"{list(variables) if isinstance(variables, Mapping) else None}."
        )

    try:  # one jitted forward per model and options, so a second call compiles nothing
        layer_moments, traced = _linen_forward(model, normalize_with, tuple(sorted(call_kwargs.items())))
    except TypeError:  # an unhashable model or keyword argument: a forward for this call only
        layer_moments, traced = _linen_forward.__wrapped__(model, normalize_with, tuple(call_kwargs.items()))
    for batch in batches:
        sown = _sown_by_layer(jax.device_get(layer_moments(variables, _as_args(batch))))
        info.update(traced)  # noted while tracing (the first call with these shapes)
        yield _in_call_order({layer: list(calls) for layer, calls in sown}, info)


@functools.lru_cache(maxsize=32)
def _linen_forward(model: nn.Module, normalize_with: str, call_kwargs: tuple) -> tuple[Any, dict]:
    """A jitted forward sowing each BatchNorm's moments, and the per-layer facts its tracing notes."""
    info: dict[tuple[str, ...], dict[str, Any]] = {}

    @jax.jit
    def layer_moments(variables, args):
        with nn.intercept_methods(_linen_interceptor(normalize_with, info)):
            _, sown = model.apply(variables, *args, mutable=["intermediates"], **dict(call_kwargs))
        return sown.get("intermediates", {})

    return layer_moments, info


def _recalibrate_linen(model, variables, batches, normalize_with, estimator, progress, call_kwargs):
    info: dict[tuple[str, ...], dict[str, Any]] = {}
    pooled: dict[tuple[str, ...], list[tuple]] = {}  # per layer, the moments of each call
    batches = _nonempty(_progress(batches, progress, "recalibrate"), "recalibrate")
    for layers in linen_layer_moments(model, variables, batches, normalize_with, call_kwargs, info):
        for layer, calls in layers.items():
            pooled.setdefault(layer, []).extend(calls)
    if not pooled:
        raise ValueError("recalibrate found no BatchNorm call in the model's __call__ with these arguments.")
    batch_stats = _copied(variables["batch_stats"])
    for layer, calls in pooled.items():
        node = node_at(batch_stats, layer)
        mean, var = _estimate(calls, estimator, info[layer]["unbiased"])
        node["mean"] = _written(node["mean"], mean)
        node["var"] = _written(node["var"], var)
        if "count" in node:
            node["count"] = _written(node["count"], np.float64(len(calls)))
    return {**variables, "batch_stats": batch_stats}


def _in_call_order(layers: dict[tuple, list], order: Iterable[tuple]) -> dict[tuple, list]:
    """``layers`` reordered as ``order`` lists their paths (the sown tree is sorted by name: ``BatchNorm_10``
    before ``BatchNorm_2``); any path ``order`` lacks comes last."""
    ordered = {layer: layers[layer] for layer in order if layer in layers}
    return {**ordered, **{layer: calls for layer, calls in layers.items() if layer not in ordered}}


def _sown_by_layer(tree: Mapping, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], tuple]]:
    """``(module path, sown values)`` for every layer of an ``intermediates`` tree."""
    for key, value in tree.items():
        if key == _SOWN:
            yield path, value
        elif isinstance(value, Mapping):
            yield from _sown_by_layer(value, path + (key,))


def _copied(tree: Any) -> Any:
    """A copy of a nest of mappings (the arrays themselves are shared)."""
    return {key: _copied(value) for key, value in tree.items()} if isinstance(tree, Mapping) else tree


def _written(old: Any, new: np.ndarray) -> Any:
    """``new`` in ``old``'s shape and dtype (and partitioning box); where ``new`` is NaN, ``old`` stays."""
    value = unboxed(old)
    new = np.reshape(new, np.shape(value))
    return reboxed(old, jnp.asarray(np.where(np.isnan(new), np.asarray(value, np.float64), new), value.dtype))


# -- nnx -----------------------------------------------------------------------------------------

_NNX_BATCH_NORMS = (nnx.BatchNorm, jaxbn_nnx.BatchNorm)


def _recording_call(normalize_with: str, order: list[tuple]):
    """An nnx interceptor: each BatchNorm call sows its input's moments and notes its path in ``order``."""

    def record(run, args, kwargs, path, module):
        del run  # the call is replaced
        order.append(path)
        x = args[0] if args else kwargs["x"]
        params = {key: getattr(module, key)[...] for key in ("scale", "bias") if getattr(module, key) is not None}
        state = {"mean": module.mean[...], "var": module.var[...]}
        moments, y = _normalized(x, params, state, module.axis, module.epsilon, module.dtype, kwargs.get("mask"),
                                 normalize_with, type(module).__name__)
        module.sow(nnx.Intermediate, _SOWN, moments)
        return y

    return record


def nnx_batch_norms(module: nnx.Module) -> dict[tuple, Any]:
    """The BatchNorm nodes of an nnx module graph, by path."""
    layers = {tuple(path): node for path, node in nnx.iter_graph(module) if isinstance(node, _NNX_BATCH_NORMS)}
    if not layers:
        raise ValueError(f"found no BatchNorm in the {type(module).__name__} module.")
    return layers


def nnx_layer_moments(
    module: nnx.Module, batches: Iterable, normalize_with: str, call_kwargs: Mapping
) -> Iterator[dict[tuple, list[tuple]]]:
    """Per batch, ``{layer path: [moments fields per call]}`` (host arrays) of an nnx module's BatchNorms,
    in the order the layers are first called."""
    graphdef, state = nnx.split(module)
    try:  # one jitted forward per module structure and options, so a second call compiles nothing
        forward, order = _nnx_forward(graphdef, normalize_with, tuple(sorted(call_kwargs.items())))
    except TypeError:  # an unhashable keyword argument: a forward for this call only
        forward, order = _nnx_forward.__wrapped__(graphdef, normalize_with, tuple(call_kwargs.items()))
    for batch in batches:
        sown, state = forward(state, _as_args(batch))
        yield _in_call_order({layer: list(calls) for layer, calls in _sown_by_layer(jax.device_get(sown))}, order)
    nnx.update(module, state)  # what else the calls changed (random number streams, say)


@functools.lru_cache(maxsize=32)
def _nnx_forward(graphdef: Any, normalize_with: str, call_kwargs: tuple) -> tuple[Any, dict]:
    """A jitted ``(state, args) -> (sown moments, new state)`` for modules of ``graphdef``, and the
    layer paths in call order its tracing notes."""
    order: dict[tuple, None] = {}  # the BatchNorms' paths in call order, noted while tracing

    def run(module, *args):
        called: list[tuple] = []
        with intercepted_nnx_calls(module, _recording_call(normalize_with, called),
                                   lambda node: isinstance(node, _NNX_BATCH_NORMS)):
            module(*args, **dict(call_kwargs))
        order.update((path, None) for path in called)

    @jax.jit
    def forward(state, args):
        module = nnx.merge(graphdef, state, copy=True)  # a copy of our own: its BatchNorms are intercepted
        if hasattr(nnx, "capture"):  # flax >= 0.12.x: sown values come back from the call
            _, sown = nnx.capture(run, nnx.Intermediate)(module, *args)
        else:
            run(module, *args)
            sown = nnx.pop(module, nnx.Intermediate)
        return nnx.to_pure_dict(sown), nnx.state(module)

    return forward, order


def _recalibrate_nnx(module, batches, normalize_with, estimator, progress, call_kwargs):
    layers = nnx_batch_norms(module)
    pooled: dict[tuple, list[tuple]] = {}  # per layer, the moments of each call
    batches = _nonempty(_progress(batches, progress, "recalibrate"), "recalibrate")
    for moments_by_layer in nnx_layer_moments(module, batches, normalize_with, call_kwargs):
        for layer, calls in moments_by_layer.items():
            pooled.setdefault(layer, []).extend(calls)
    for layer, calls in pooled.items():
        node = layers[layer]
        mean, var = _estimate(calls, estimator, bool(getattr(node, "unbiased_running_var", False)))
        node.mean[...] = _written(node.mean[...], mean)
        node.var[...] = _written(node.var[...], var)
        if getattr(node, "count", None) is not None:
            node.count[...] = _written(node.count[...], np.float64(len(calls)))
    return module


# -- the public function -------------------------------------------------------------------------


def recalibrate(
    model: Any,
    variables_or_batches: Any,
    batches: Iterable[Any] | None = None,
    *,
    normalize_with: str = "batch",
    estimator: str = "population",
    progress: bool | None = None,
    **call_kwargs: Any,
) -> Any:
    """Re-estimates every BatchNorm's running statistics from ``batches``.

    Each batch runs through the model once (jitted, whole: a sharded batch gives the whole
    batch's statistics, so no ``axis_name`` collective is needed), every BatchNorm
    (``jaxbn.linen``/``jaxbn.nnx`` or flax's) normalizing with the batch's statistics (as
    PyTorch's ``update_bn``) or the running ones, and reporting the moments of its input's
    valid elements. ``estimator="population"`` merges them exactly (:func:`jaxbn.merge_moments`:
    the statistics of all valid elements, unbiased for ``unbiased_running_var``);
    ``"mean_of_batches"`` averages the batch means and unbiased variances, as PyTorch does.

    Args:
      model: a ``flax.linen`` module, or a ``flax.nnx`` module (updated in place).
      variables_or_batches: linen: the model's variables (with ``'batch_stats'``); nnx:
        the batches.
      batches: linen: an iterable of batches, each the model's first argument or a tuple
        of its positional arguments (one array is refused: pass ``[x]``).
      normalize_with: ``"batch"`` (default) or ``"running"`` (a fixed-point step).
      estimator: ``"population"`` (default) or ``"mean_of_batches"``.
      progress: a tqdm bar; None: on a terminal for more than 5 batches if tqdm is
        installed; True: always (ImportError without tqdm); False: never.
      **call_kwargs: static keyword arguments of the model's call (e.g. ``train=False``).

    Returns:
      linen: new variables of the same structure; nnx: the module.

    Raises:
      ValueError: no BatchNorm was called, no batch was given, or an option is unknown.
      TypeError: the batches are one array, one batch's arguments or not iterable.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn, jaxbn.linen
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return jaxbn.linen.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
    >>> batches = [jax.random.normal(jax.random.key(i), (16, 2)) + i for i in range(4)]
    >>> variables = Net().init(jax.random.key(0), batches[0])
    >>> new = jaxbn.recalibrate(Net(), variables, batches, progress=False)
    >>> dense = {'params': variables['params']['Dense_0']}
    >>> h = jnp.concatenate([nn.Dense(3).apply(dense, b) for b in batches])
    >>> bool(jnp.allclose(new['batch_stats']['BatchNorm_0']['mean'], h.mean(0), atol=1e-5))
    True
    """
    check_options(normalize_with, estimator)
    if isinstance(model, nn.Module):
        if batches is None:
            raise TypeError("recalibrate(linen_model, variables, batches): the batches are missing.")
        check_batches(batches, "recalibrate")
        return _recalibrate_linen(model, variables_or_batches, batches, normalize_with, estimator, progress,
                                  call_kwargs)
    if isinstance(model, nnx.Module):
        if batches is not None:
            raise TypeError("recalibrate(nnx_module, batches): an nnx module holds its variables; pass the batches "
                            "as the second argument.")
        check_batches(variables_or_batches, "recalibrate")
        return _recalibrate_nnx(model, variables_or_batches, normalize_with, estimator, progress, call_kwargs)
    raise TypeError(f"model must be a flax.linen or flax.nnx module, got {type(model).__name__}.")
