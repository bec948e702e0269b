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
from flax import nnx, traverse_util

from jaxbn import _validation, functional, stats
from jaxbn import linen as jaxbn_linen
from jaxbn import nnx as jaxbn_nnx
from jaxbn._flax import intercepted_nnx_calls, node_at, path_name, reboxed, unboxed

__all__ = ["recalibrate"]  # the helpers without a leading underscore serve jaxbn.inspection

_SOWN = "jaxbn_recalibrate"
_NORMALIZE_WITH = ("batch", "running")
_ESTIMATORS = ("population", "mean_of_batches")
_BATCH_NORMS = (nn.BatchNorm, jaxbn_linen.BatchNorm, nnx.BatchNorm, jaxbn_nnx.BatchNorm)


def check_options(model: Any, normalize_with: str, estimator: str) -> bool:
    """Raises for a model that is no Flax module or an unknown option; returns whether it is linen."""
    if not isinstance(model, (nn.Module, nnx.Module)):
        raise TypeError(
            f"model must be a flax.linen or flax.nnx module, got {type(model).__name__}."
        )
    if normalize_with not in _NORMALIZE_WITH:
        raise ValueError(
            f"normalize_with must be one of {_NORMALIZE_WITH}, got {normalize_with!r}."
        )
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}.")
    return isinstance(model, nn.Module)


def merged_moments(calls: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's ``(count, mean, var)`` (float64) over all its calls' moments, merged exactly."""
    parts = [stats.Moments(*(jnp.asarray(field) for field in call)) for call in calls]
    if any(np.iscomplexobj(part.mean) for part in parts):
        raise TypeError("recalibrate does not support complex activations.")
    merged = stats.merge_moments(parts)
    count, mean, var = (np.asarray(v, np.float64) for v in (merged.count, merged.mean, merged.var))
    return count, mean, var


def running_stats(model: Any, variables: Any) -> Any:
    """linen: a copy of ``variables['batch_stats']``; nnx: each BatchNorm's running Variables."""
    if variables is None:
        nodes = [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, _BATCH_NORMS)]
        if not nodes:
            raise ValueError(f"found no BatchNorm in the {type(model).__name__} module.")
        keys = ("mean", "var", "count")
        present = lambda n: {k: getattr(n, k) for k in keys if getattr(n, k, None) is not None}
        return {p: present(n) for p, n in nodes}
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError(
            "variables must be the model's variables with a 'batch_stats' collection (what "
            f"model.init returns), got {type(variables).__name__} with keys "
            f"{list(variables) if isinstance(variables, Mapping) else None}."
        )

    def copy(tree: Any) -> Any:
        return {k: copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree

    return copy(variables["batch_stats"])


def _record(normalize_with, info, run, args, kwargs, path, module):
    """A BatchNorm call replaced by batch norm without updates, which sows the input's moments."""
    del run  # the call is replaced
    linen = isinstance(module, nn.Module)
    info[path] = (float(module.epsilon), bool(getattr(module, "unbiased_running_var", False)))
    get = module.get_variable if linen else lambda _, k: unboxed(getattr(module, k))
    params = {k: v for k in ("scale", "bias") if (v := get("params", k)) is not None}
    state = {k: get("batch_stats", k) for k in ("mean", "var")}
    owner = f"{type(module).__name__} at '{path_name(path)}'" if linen else type(module).__name__
    x = _validation.check_inexact(args[0] if args else kwargs["x"], real=True)
    # the model runs under jit on whole batches (XLA reduces over shards): no axis_name needed
    shape = _validation.feature_shape(x, module.axis)
    for collection, arrays in (("params", params), ("batch_stats", state)):
        for key, value in arrays.items():
            _validation.check_variable_size(value, math.prod(shape), f"{collection}/{key}", owner)
    params, state = ({k: jnp.reshape(v, shape) for k, v in d.items()} for d in (params, state))
    options = {"training": normalize_with == "batch", "return_moments": True}
    options.update(axis=module.axis, epsilon=module.epsilon, mask=kwargs.get("mask"))
    y, _, moments = functional.batch_norm(
        x, params, state, update_running_stats=False, dtype=module.dtype, **options
    )
    module.sow("intermediates" if linen else nnx.Intermediate, _SOWN, tuple(moments))
    return y


@functools.lru_cache(maxsize=32)
def _forward(model: Any, normalize_with: str, call_kwargs: tuple) -> tuple[Any, dict]:
    """A jitted ``(variables or nnx state, args) -> (sown moments, new nnx state)``."""
    info: dict[tuple, tuple[float, bool]] = {}  # in call order
    record = functools.partial(_record, normalize_with, info)

    def intercept(next_fun, args, kwargs, context):  # linen
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _BATCH_NORMS):
            return next_fun(*args, **kwargs)
        return record(None, args, kwargs, tuple(module.path), module)

    def run(module, *args):  # nnx
        with intercepted_nnx_calls(module, record, lambda node: isinstance(node, _BATCH_NORMS)):
            module(*args, **dict(call_kwargs))

    @jax.jit
    def layer_moments_forward(data, args):
        if isinstance(model, nn.Module):
            with nn.intercept_methods(intercept):
                _, sown = model.apply(data, *args, mutable=["intermediates"], **dict(call_kwargs))
            return sown.get("intermediates", {}), None
        module = nnx.merge(model, data, copy=True)  # a copy of our own: its BatchNorms intercepted
        _, sown = nnx.capture(run, nnx.Intermediate)(module, *args)
        return nnx.to_pure_dict(sown), nnx.state(module)

    return layer_moments_forward, info


def layer_moments(
    model: Any, variables: Any, batches: Iterable, normalize_with: str, kwargs: Mapping, info: dict
) -> Iterator[dict[tuple, list[tuple]]]:
    """Per batch, ``{layer path: [moments fields per call]}`` (host arrays) of the BatchNorms of a
    linen model (with ``variables``) or an nnx module, in the order the layers are first called;
    notes each layer's ``(epsilon, unbiased_running_var)`` in ``info``."""
    key, data = (model, variables) if variables is not None else nnx.split(model)
    try:  # one jitted forward per model (nnx: graphdef) and options: a second call compiles nothing
        forward, traced = _forward(key, normalize_with, tuple(sorted(kwargs.items())))
    except TypeError:  # an unhashable model or keyword argument: a forward for this call only
        forward, traced = _forward.__wrapped__(key, normalize_with, tuple(kwargs.items()))
    for batch in batches:
        sown, new = forward(data, tuple(batch) if isinstance(batch, tuple) else (batch,))
        data = data if new is None else new
        info.update(traced)  # noted while tracing (the first call with these shapes)
        flat = traverse_util.flatten_dict(jax.device_get(sown))
        layers = {path[:-1]: list(calls) for path, calls in flat.items() if path[-1] == _SOWN}
        yield {**{path: layers[path] for path in info if path in layers}, **layers}
    if variables is None:
        nnx.update(model, data)  # what else the calls changed (random number streams, say)


def _progress(batches: Iterable, progress: bool | None) -> Iterable:
    """``batches`` in a tqdm bar if asked; None: on a terminal, for over 5, if tqdm is there."""
    if progress is None:
        few = isinstance(batches, Sized) and len(batches) <= 5
        try:
            if few or not sys.stderr.isatty():
                return batches
        except (AttributeError, ValueError, OSError):  # no stderr (pythonw) or a closed one
            return batches
    elif not progress:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress is None:
            return batches
        raise ImportError(
            "recalibrate(progress=True) needs tqdm: pip install tqdm (or pass progress=None or "
            "False)"
        ) from None
    return tqdm(batches, desc="recalibrate", unit="batch")


def _written(old: Any, new: Any) -> Any:
    """``new`` in ``old``'s shape, dtype and box (a Variable: written); NaN keeps ``old``."""
    value = unboxed(old)
    new = np.reshape(new, np.shape(value))
    new = jnp.asarray(np.where(np.isnan(new), np.asarray(value, np.float64), new), value.dtype)
    return reboxed(old, new)


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
    """Re-estimates every BatchNorm's running statistics from ``batches``: linen returns new
    variables of the same structure, nnx updates the module in place and returns it.

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
    linen = check_options(model, normalize_with, estimator)
    if linen and batches is None:
        raise TypeError("recalibrate(linen_model, variables, batches): the batches are missing.")
    if not linen and batches is not None:
        raise TypeError(
            "recalibrate(nnx_module, batches): an nnx module holds its variables; pass the "
            "batches as the second argument."
        )
    variables = variables_or_batches if linen else None
    data: Any = batches if linen else variables_or_batches  # the iterable of batches
    if hasattr(data, "shape") and hasattr(data, "ndim"):  # jax, numpy, torch ... arrays
        raise TypeError(
            "recalibrate: batches must be an iterable of batches (e.g. [x] or a data loader), got "
            f"one array ({type(data).__name__}) of shape {tuple(data.shape)}, which would be "
            "iterated row by row; for one batch x pass [x] (for the rows of a stacked array as "
            "batches, list(x))."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            "recalibrate: batches must be an iterable of batches (e.g. a list or a generator), "
            f"got {type(data).__name__}; for one batch x pass [x]."
        )
    arrays = data if isinstance(data, tuple) else ()
    typed = len(arrays) > 1 and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in arrays)
    if typed and len({(tuple(a.shape), str(a.dtype)) for a in arrays}) > 1:
        raise TypeError(
            "recalibrate: batches is a tuple of arrays of different shapes or dtypes "
            f"({', '.join(f'{a.dtype}{list(a.shape)}' for a in arrays)}), which looks like one "
            f"batch's arguments (e.g. (x, mask)) but would be iterated as {len(arrays)} batches; "
            "pass a list of batches, e.g. [(x, mask)] for one batch."
        )
    tree = running_stats(model, variables)
    info: dict[tuple, tuple[float, bool]] = {}
    pooled: dict[tuple, list[tuple]] = {}  # per layer, the moments of each call
    seen = 0
    moments = layer_moments(
        model, variables, _progress(data, progress), normalize_with, call_kwargs, info
    )
    for seen, layers in enumerate(moments, 1):
        for layer, calls in layers.items():
            pooled.setdefault(layer, []).extend(calls)
    if not seen:
        raise ValueError("recalibrate: batches is empty; pass at least one batch.")
    if variables is not None and not pooled:
        raise ValueError(
            "recalibrate found no BatchNorm call in the model's __call__ with these arguments."
        )
    for layer, calls in pooled.items():
        if estimator == "mean_of_batches":  # PyTorch's update_bn: the average of batch statistics
            n, mean, var = (np.asarray([call[i] for call in calls], np.float64) for i in (2, 0, 1))
            mean, var = mean.mean(0), (var * n / np.maximum(n - 1, 1)).mean(0)
        else:  # NaN where no element was valid
            n, mean, var = merged_moments(calls)
            divisor = n - 1 if info[layer][1] else n
            with np.errstate(invalid="ignore", divide="ignore"):
                var = np.where(divisor > 0, var * n / divisor, np.nan)
            mean = np.where(n > 0, mean, np.nan)
        node = tree[layer] if variables is None else node_at(tree, layer)
        for key, value in (("mean", mean), ("var", var), ("count", np.float64(len(calls)))):
            if key in node:
                node[key] = _written(node[key], value)
    return model if variables is None else {**variables, "batch_stats": tree}
