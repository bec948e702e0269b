"""Model-wide switches for the normalization layers of a model, without editing its source.

linen (:func:`batch_norm_overrides`, :func:`use_jaxbn`): context managers that
intercept every normalization call (``nn.intercept_methods``) and compute it
with jaxbn's functional core, reading and writing the module's own variables
where the module keeps them. nnx (:func:`freeze`, :func:`unfreeze`,
:func:`set_batch_norm`, :func:`convert`): graph walks that set attributes on, or
replace, the layers of a module.

Exported as ``jaxbn.linen.batch_norm_overrides`` / ``jaxbn.linen.use_jaxbn``
and ``jaxbn.nnx.freeze`` / ``unfreeze`` / ``set_batch_norm`` / ``convert``.
This module imports :mod:`jaxbn.linen` and :mod:`jaxbn.nnx` lazily (they
import it).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax.core import meta

from jaxbn import _validation, functional, per_example

# -- linen ---------------------------------------------------------------------------------------

#: The overrides :func:`batch_norm_overrides` accepts.
OVERRIDES = ("use_running_average", "update_running_stats", "momentum", "axis_name", "axis_index_groups",
             "keep_affine_trainable")

# (overrides in force, whether flax's normalization layers are computed by jaxbn)
_ACTIVE: contextvars.ContextVar[tuple[Mapping[str, Any], bool]] = contextvars.ContextVar(
    "jaxbn_switches", default=({}, False)
)


def _check_overrides(overrides: Mapping[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"batch_norm_overrides got unknown override(s) {unknown}; the overrides are {list(OVERRIDES)}.")
    for name in ("use_running_average", "keep_affine_trainable"):
        if name in overrides:
            _validation.check_static_bool(overrides[name], name)
    if "update_running_stats" in overrides:
        _validation.check_static_bool(overrides["update_running_stats"], "update_running_stats", none_ok=True)
    if overrides.get("momentum") is not None:
        _validation.check_momentum(overrides["momentum"])


def _linen_batch_norm(module: nn.Module, overrides: Mapping[str, Any], x: Any, use_running_average: Any = None, *,
                      mask: Any = None) -> jax.Array:
    """One BatchNorm call (jaxbn's or flax's module) computed by the functional core with ``overrides``."""
    from jaxbn import linen as jaxbn_linen
    from jaxbn.linen import unboxed

    field = lambda name, default=None: overrides[name] if name in overrides else getattr(module, name, default)  # noqa: E731
    if "use_running_average" in overrides:
        use_running_average = overrides["use_running_average"]
    else:
        use_running_average = nn.merge_param("use_running_average", module.use_running_average, use_running_average)
    training = not use_running_average
    momentum = field("momentum")
    update = field("update_running_stats")
    update = training if update is None else update
    mutable = module.is_mutable_collection("batch_stats")
    update = bool(update) and mutable
    names = ["mean", "var"] + (["count"] if momentum is None else [])
    if module.has_variable("batch_stats", "steps"):  # jaxbn's BatchRenorm with a scheduled limit
        names.append("steps")
    for name in names:
        if not module.has_variable("batch_stats", name):
            raise ValueError(
                f"batch_norm_overrides: {type(module).__name__} at {'/'.join(module.path) or '(root)'} has no "
                f"batch_stats/{name}" + (" (momentum=None needs the 'count' of a module created with "
                                         "momentum=None)" if name == "count" else "") + "."
            )
    stored = {name: module.get_variable("batch_stats", name) for name in names}
    state = {name: unboxed(value) for name, value in stored.items()}
    params = {name: unboxed(module.get_variable("params", name)) for name in ("scale", "bias")
              if module.has_variable("params", name)}
    if not field("keep_affine_trainable", True):
        params = jax.lax.stop_gradient(params)

    # jaxbn's module computes with its own functional call (BatchRenorm's is batch_renorm)
    normalize = module.functional_call if isinstance(module, jaxbn_linen.BatchNorm) else functional.batch_norm
    x = x if hasattr(x, "dtype") else jax.numpy.asarray(x)
    sow = getattr(module, "sow_moments", False) and (training or update)  # only where batch statistics are taken
    y, new_state, *moments = normalize(
        x, params, state, return_moments=sow, training=training, update_running_stats=update,
        axis=module.axis, momentum=momentum, unbiased_running_var=getattr(module, "unbiased_running_var", False),
        epsilon=module.epsilon, axis_name=field("axis_name"), axis_index_groups=field("axis_index_groups"),
        mask=mask, dtype=module.dtype, ghost_batch_size=getattr(module, "ghost_batch_size", None),
    )
    if update:
        for name, old in stored.items():
            new = new_state[name]
            module.put_variable("batch_stats", name, old.replace_boxed(new) if isinstance(old, meta.AxisMetadata)
                                else new)
    if moments and moments[0] is not None:
        module.sow("intermediates", "batch_moments", moments[0])
    return y


def _linen_per_example(module: nn.Module, kind: str, x: Any, *, mask: Any = None) -> jax.Array:
    """A flax LayerNorm/RMSNorm/GroupNorm/InstanceNorm call computed by jaxbn with the module's params."""
    from jaxbn import linen as jaxbn_linen
    from jaxbn.linen import unboxed

    x = x if hasattr(x, "dtype") else jax.numpy.asarray(x)
    jaxbn_linen.check_float32_reductions(module, x)
    params = {name: unboxed(module.get_variable("params", name)) for name in ("scale", "bias")
              if module.has_variable("params", name)}
    common = dict(epsilon=module.epsilon, mask=mask, axis_name=module.axis_name,
                  axis_index_groups=module.axis_index_groups, dtype=module.dtype)
    if kind == "LayerNorm":
        return per_example.layer_norm(x, params, reduction_axes=module.reduction_axes,
                                      feature_axes=module.feature_axes, **common)
    if kind == "RMSNorm":
        return per_example.rms_norm(x, params, reduction_axes=module.reduction_axes,
                                    feature_axes=module.feature_axes, **common)
    if kind == "GroupNorm":
        return per_example.group_norm(x, params, num_groups=module.num_groups, group_size=module.group_size,
                                      reduction_axes=module.reduction_axes, **common)
    return per_example.instance_norm(x, params, feature_axes=module.feature_axes, **common)


_FLAX_LINEN_PER_EXAMPLE = {nn.LayerNorm: "LayerNorm", nn.RMSNorm: "RMSNorm", nn.GroupNorm: "GroupNorm",
                           nn.InstanceNorm: "InstanceNorm"}


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():  # init: the module creates its variables
        return next_fun(*args, **kwargs)
    from jaxbn import linen as jaxbn_linen

    overrides, convert = _ACTIVE.get()
    if isinstance(module, jaxbn_linen.BatchNorm) or (isinstance(module, nn.BatchNorm) and (overrides or convert)):
        if not overrides and isinstance(module, jaxbn_linen.BatchNorm):
            return next_fun(*args, **kwargs)
        return _linen_batch_norm(module, overrides, *args, **kwargs)
    if convert:
        kind = next((name for cls, name in _FLAX_LINEN_PER_EXAMPLE.items() if type(module) is cls), None)
        if kind is not None:
            return _linen_per_example(module, kind, *args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def _switched(overrides: Mapping[str, Any], convert: bool) -> Iterator[None]:
    outer, outer_convert = _ACTIVE.get()
    token = _ACTIVE.set(({**outer, **overrides}, outer_convert or convert))
    try:
        with nn.intercept_methods(_intercept):
            yield
    finally:
        _ACTIVE.reset(token)


def batch_norm_overrides(**overrides: Any) -> contextlib.AbstractContextManager[None]:
    """Overrides fields of every BatchNorm a linen model calls inside the ``with`` block.

    Every call of a :class:`jaxbn.linen.BatchNorm` (or ``BatchRenorm``) or of
    flax's :class:`flax.linen.BatchNorm` is computed by :func:`jaxbn.batch_norm`
    with the module's own fields and variables, except the overridden ones;
    the running statistics are written back (in the module's ``batch_stats``)
    only when that collection is mutable. Blocks nest (the inner one wins per
    name). The model's source is untouched; the interception happens when the
    model is traced, so enter the block inside the function you ``jax.jit``.

    Overrides (keyword only, see ``OVERRIDES``):

    - ``use_running_average``: normalize with the running statistics (also
      overrides the call argument).
    - ``update_running_stats``: update them from the batch (None: when
      training). A *freeze* is ``use_running_average=True,
      update_running_stats=False``.
    - ``momentum``: a float in [0, 1] (None only for a module created with
      ``momentum=None``, which has ``batch_stats/count``).
    - ``axis_name`` / ``axis_index_groups``: synchronize the statistics.
    - ``keep_affine_trainable``: False stops the gradient of ``scale`` and
      ``bias`` (they get zero gradients; with weight decay, also mask them
      out of the optimizer, e.g. ``optax.masked``).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> bn = nn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> with jaxbn.linen.batch_norm_overrides(use_running_average=True, update_running_stats=False):
    ...     y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> bool((y == x / jnp.sqrt(1 + 1e-5)).all()), bool((updates['batch_stats']['mean'] == 0).all())
    (True, True)
    """
    _check_overrides(overrides)
    return _switched(overrides, convert=False)


def use_jaxbn() -> contextlib.AbstractContextManager[None]:
    """Computes flax's linen normalization layers with jaxbn inside the ``with`` block.

    Every call of :class:`flax.linen.BatchNorm`, ``LayerNorm``, ``RMSNorm``,
    ``GroupNorm`` and ``InstanceNorm`` (exactly these classes, not
    subclasses) runs jaxbn's functional core with the module's fields and
    variables (the same ``params``/``batch_stats``, so checkpoints are kept),
    like PyTorch's ``convert_sync_batchnorm`` without rebuilding the model:
    count-weighted statistics across devices, masks, the stable variance.
    ``init`` runs flax's modules unchanged. Combine with
    :func:`batch_norm_overrides` to also set e.g. ``axis_name``.
    """
    return _switched({}, convert=True)


# -- nnx -----------------------------------------------------------------------------------------


class FrozenParam(nnx.Variable):
    """The type :func:`freeze` gives ``scale``/``bias`` with ``keep_affine_trainable=False``.

    Not an ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
    ``nnx.grad`` with ``nnx.Param`` leave them alone; :func:`unfreeze` makes
    them ``nnx.Param`` again.
    """


def _flax_nnx_norms() -> dict[type, type]:
    from jaxbn import nnx as jaxbn_nnx

    return {nnx.BatchNorm: jaxbn_nnx.BatchNorm, nnx.LayerNorm: jaxbn_nnx.LayerNorm, nnx.RMSNorm: jaxbn_nnx.RMSNorm,
            nnx.GroupNorm: jaxbn_nnx.GroupNorm, nnx.InstanceNorm: jaxbn_nnx.InstanceNorm}


def _batch_norms(module: Any, function: str) -> list:
    """jaxbn's nnx BatchNorms in ``module``; raises on flax's (before anything is changed)."""
    from jaxbn import nnx as jaxbn_nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(f"{function} takes a flax.nnx module, got {type(module).__name__}.")
    found = []
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm):
            raise TypeError(
                f"{function}: the layer at {'/'.join(map(str, path)) or '(root)'} is flax's nnx.BatchNorm; "
                "convert the model first: module = jaxbn.nnx.convert(module)."
            )
        if isinstance(node, jaxbn_nnx.BatchNorm):
            found.append(node)
    return found


def freeze(module: Any, *, keep_affine_trainable: bool = True) -> Any:
    """Freezes every jaxbn BatchNorm in ``module`` (in place): running statistics, never updated.

    A frozen layer normalizes with its running statistics and leaves them
    unchanged whatever ``use_running_average`` says, so it stays frozen
    through ``module.train()`` / ``module.eval()`` (which still record the
    mode for after :func:`unfreeze`). With ``keep_affine_trainable=False``,
    ``scale`` and ``bias`` become :class:`FrozenParam` (not ``nnx.Param``), so
    an optimizer or gradient over ``nnx.Param`` skips them. flax's own
    ``nnx.BatchNorm`` is refused (convert the model first with :func:`convert`).

    Returns:
      ``module``.
    """
    _validation.check_static_bool(keep_affine_trainable, "keep_affine_trainable")
    for layer in _batch_norms(module, "freeze"):
        layer.frozen = True
        if not keep_affine_trainable:
            for name in ("scale", "bias"):
                variable = getattr(layer, name)
                if isinstance(variable, nnx.Param):
                    setattr(layer, name, FrozenParam(variable.get_value(), **variable.get_metadata()))
    return module


def unfreeze(module: Any) -> Any:
    """Undoes :func:`freeze` (in place): each BatchNorm follows ``use_running_average`` again,
    and :class:`FrozenParam` ``scale``/``bias`` become ``nnx.Param``. Returns ``module``."""
    for layer in _batch_norms(module, "unfreeze"):
        layer.frozen = False
        for name in ("scale", "bias"):
            variable = getattr(layer, name)
            if isinstance(variable, FrozenParam):
                setattr(layer, name, nnx.Param(variable.get_value(), **variable.get_metadata()))
    return module


_UNSET: Any = object()


def set_batch_norm(module: Any, *, momentum: Any = _UNSET, axis_name: Any = _UNSET,
                   axis_index_groups: Any = _UNSET) -> Any:
    """Sets ``momentum`` / ``axis_name`` / ``axis_index_groups`` of every jaxbn BatchNorm in ``module``.

    Only the arguments given are set (in place). ``momentum=None`` (the
    cumulative average) needs layers created with ``momentum=None`` (they
    have the ``count`` variable). flax's ``nnx.BatchNorm`` is refused
    (convert the model first). Returns ``module``.
    """
    layers = _batch_norms(module, "set_batch_norm")
    if momentum is not _UNSET:
        if momentum is None:
            missing = [layer for layer in layers if getattr(layer, "count", None) is None]
            if missing:
                raise ValueError("set_batch_norm(momentum=None) needs BatchNorms created with momentum=None "
                                 f"(they have the 'count' variable); {len(missing)} layer(s) have none.")
        else:
            _validation.check_momentum(momentum)
    values = {"momentum": momentum, "axis_name": axis_name, "axis_index_groups": axis_index_groups}
    for layer in layers:
        for name, value in values.items():
            if value is not _UNSET:
                setattr(layer, name, value)
    return module


def _converted(layer: nnx.Module, target: type) -> nnx.Module:
    """A jaxbn layer with ``layer``'s fields and its very variables (values, types and metadata)."""
    parameters = inspect.signature(target.__init__).parameters
    kwargs = {name: getattr(layer, name) for name in parameters
              if name not in ("self", "num_features", "rngs") and not name.endswith("_metadata")
              and hasattr(layer, name) and parameters[name].kind is not inspect.Parameter.VAR_KEYWORD}
    if target.__name__ == "GroupNorm":
        kwargs.pop("group_size", None)  # stored resolved; num_groups determines it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        num_features = getattr(layer, "num_features", None)
        if num_features is None:  # flax's GroupNorm keeps only the grouping
            num_features = layer.num_groups * layer.group_size
        new = target(num_features, rngs=nnx.Rngs(0), **kwargs)
    for name in ("scale", "bias", "mean", "var"):
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    return new


def convert(module: Any) -> Any:
    """Replaces flax's nnx normalization layers in ``module`` by jaxbn's, keeping their variables.

    Like PyTorch's ``convert_sync_batchnorm``: every :class:`flax.nnx.BatchNorm`,
    ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``InstanceNorm`` (exactly
    these classes) found by a graph walk (attributes, lists, dicts, nested
    modules) becomes the jaxbn layer with the same arguments and the same
    variable objects (so ``nnx.state`` is unchanged: values, types, metadata).
    The model is changed in place; the result is returned (a new object when
    ``module`` itself is such a layer).
    """
    table = _flax_nnx_norms()
    if type(module) in table:
        return _converted(module, table[type(module)])
    if not isinstance(module, nnx.Module):
        raise TypeError(f"convert takes a flax.nnx module, got {type(module).__name__}.")
    found = [(tuple(path), node) for path, node in nnx.iter_graph(module) if type(node) in table and path]
    replaced: dict[int, nnx.Module] = {}
    for path, node in found:
        new = replaced.setdefault(id(node), _converted(node, table[type(node)]))
        parent = module
        for key in path[:-1]:
            parent = getattr(parent, key) if isinstance(parent, nnx.Module) and isinstance(key, str) else parent[key]
        key = path[-1]
        if isinstance(parent, nnx.Module) and isinstance(key, str):
            setattr(parent, key, new)
        elif isinstance(parent, tuple):
            raise TypeError(f"convert: cannot replace the layer at {'/'.join(map(str, path))} inside a tuple; "
                            "hold the layers in a list (nnx.List) or dict.")
        else:
            parent[key] = new
    return module
