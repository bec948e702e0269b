"""Model-wide switches for the normalization layers of a model, without editing its source.

linen (:func:`batch_norm_overrides`, :func:`use_jaxbn`): context managers that
intercept every normalization call (``nn.intercept_methods``) and compute it
with jaxbn's functional core, reading and writing the module's own variables
where the module keeps them; what is in force is part of ``jax.jit``'s cache
key. nnx (:func:`freeze`, :func:`unfreeze`,
:func:`set_batch_norm`, :func:`convert`): graph walks that set attributes on, or
replace, the layers of a module.

Exported as ``jaxbn.linen.batch_norm_overrides`` / ``jaxbn.linen.use_jaxbn``
and ``jaxbn.nnx.freeze`` / ``unfreeze`` / ``set_batch_norm`` / ``convert``.
This module imports :mod:`jaxbn.linen` and :mod:`jaxbn.nnx` lazily (they
import it).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import meta

from jaxbn import _validation, functional, per_example

# -- linen ---------------------------------------------------------------------------------------

#: The overrides :func:`batch_norm_overrides` accepts.
OVERRIDES = ("use_running_average", "update_running_stats", "momentum", "axis_name", "axis_index_groups",
             "keep_affine_trainable")

# What is in force, as one hashable value: (the overrides as sorted (name, value) pairs, whether flax's
# normalization layers are computed by jaxbn). A JAX user context, so it is part of the cache key of
# jax.jit (and of the other transforms' caches): a function traced inside a block is traced again
# outside it and vice versa, and the interception reads the very value that keyed the trace. Local to
# each thread, as JAX's configuration.
_ACTIVE = jax.make_user_context(((), False))


def _in_force() -> tuple[dict[str, Any], bool]:
    """The overrides in force and whether flax's normalization layers are computed by jaxbn."""
    items, convert = _ACTIVE.value
    return dict(items), convert


def _hashable(name: str, value: Any) -> Any:
    """``value`` as part of a cache key: sequences of names or groups as tuples, a 0-d momentum array as a float."""
    if name == "axis_index_groups" and isinstance(value, (list, tuple, np.ndarray)):
        value = tuple(tuple(group) if isinstance(group, (list, tuple, np.ndarray)) else group for group in value)
    elif name == "axis_name" and isinstance(value, list):
        value = tuple(value)
    elif name == "momentum" and isinstance(value, (np.ndarray, np.generic, jax.Array)) and \
            not isinstance(value, jax.core.Tracer):
        value = float(value)  # checked above: a real scalar
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"batch_norm_overrides: {name}={value!r} is not a static Python value. The overrides are part "
            "of jax.jit's cache key, so they must be hashable and known when the block is entered: a number, "
            "a bool, an axis name, groups as lists or tuples of ints (not a jax.Array or a traced value)."
        ) from None
    return value


def _check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Raises for an unknown or invalid override; returns the overrides with hashable values."""
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
    return {name: _hashable(name, value) for name, value in overrides.items()}


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
                f"batch_norm_overrides: {type(module).__name__} at {'/'.join(module.path) or '<root>'} has no "
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

    overrides, convert = _in_force()
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
    outer, outer_convert = _in_force()
    merged = {**outer, **overrides}  # the inner block wins per name
    with _ACTIVE((tuple(sorted(merged.items())), outer_convert or convert)), nn.intercept_methods(_intercept):
        yield


def batch_norm_overrides(**overrides: Any) -> contextlib.AbstractContextManager[None]:
    """Overrides fields of every BatchNorm a linen model calls inside the ``with`` block.

    Every call of a :class:`jaxbn.linen.BatchNorm` (or ``BatchRenorm``) or of
    flax's :class:`flax.linen.BatchNorm` is computed by :func:`jaxbn.batch_norm`
    with the module's own fields and variables, except the overridden ones;
    the running statistics are written back (in the module's ``batch_stats``)
    only when that collection is mutable. Blocks nest (the inner one wins per
    name). The model's source is untouched. Enter the block inside the
    function you ``jax.jit`` or around its call: what is in force is part of
    ``jax.jit``'s cache key (local to the thread), so a jitted step runs as the
    block says inside it and as the model says after it (it is traced once per
    set of overrides). Only a function compiled ahead of time
    (``jax.jit(f).lower(...).compile()``) keeps what was in force when it was
    lowered.

    Overrides (keyword only, see ``OVERRIDES``; Python values, since they key
    the cache):

    - ``use_running_average``: normalize with the running statistics (also
      overrides the call argument).
    - ``update_running_stats``: update them from the batch (None: when
      training). A *freeze* is ``use_running_average=True,
      update_running_stats=False``.
    - ``momentum``: a float in [0, 1] (None only for a module created with
      ``momentum=None``, which has ``batch_stats/count``).
    - ``axis_name`` / ``axis_index_groups``: synchronize the statistics
      (groups as lists or tuples of ints).
    - ``keep_affine_trainable``: False stops the gradient of ``scale`` and
      ``bias`` (they get zero gradients; with weight decay, also mask them
      out of the optimizer, e.g. ``optax.masked``).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> bn = nn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> step = jax.jit(lambda variables, x: bn.apply(variables, x, mutable=['batch_stats']))
    >>> with jaxbn.linen.batch_norm_overrides(use_running_average=True, update_running_stats=False):
    ...     y, updates = step(variables, x)  # frozen: normalized with the running (0, 1), not updated
    >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + 1e-5)))
    True
    >>> bool((updates['batch_stats']['mean'] == 0).all())  # exact: the stored zeros, not written
    True
    >>> step(variables, x)[1]['batch_stats']['mean']  # after the block: training, 0.01 * the batch mean
    Array([0.02, 0.03], dtype=float32)
    """
    return _switched(_check_overrides(overrides), convert=False)


def use_jaxbn() -> contextlib.AbstractContextManager[None]:
    """Computes flax's linen normalization layers with jaxbn inside the ``with`` block.

    Every call of :class:`flax.linen.BatchNorm`, ``LayerNorm``, ``RMSNorm``,
    ``GroupNorm`` and ``InstanceNorm`` (exactly these classes, not
    subclasses) runs jaxbn's functional core with the module's fields and
    variables (the same ``params``/``batch_stats``, so checkpoints are kept),
    like PyTorch's ``convert_sync_batchnorm`` without rebuilding the model:
    count-weighted statistics across devices, masks, the stable variance,
    running statistics that skip a non-finite batch. ``init`` runs flax's
    modules unchanged. Combine with :func:`batch_norm_overrides` to also set
    e.g. ``axis_name``. As there, the block may be entered inside the jitted
    function or around its call (it is part of ``jax.jit``'s cache key).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> bn = nn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(6.0).reshape(3, 2).at[0, 0].set(jnp.nan)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> step = jax.jit(lambda variables, x: bn.apply(variables, x, mutable=['batch_stats'])[1])
    >>> with jaxbn.linen.use_jaxbn():
    ...     updates = step(variables, x)  # jaxbn: a NaN batch leaves the running statistics alone
    >>> bool(jnp.isfinite(updates['batch_stats']['mean']).all())
    True
    >>> bool(jnp.isfinite(step(variables, x)['batch_stats']['mean']).all())  # flax's, after the block
    False
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
                f"{function}: the layer at {'/'.join(map(str, path)) or '<root>'} is flax's nnx.BatchNorm; "
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
    A layer held in several places (weight tying) becomes one jaxbn layer that
    every place holds. The model is changed in place, and only once every
    layer is known to be replaceable (a layer in a tuple raises a
    ``TypeError`` and leaves the model untouched); the result is returned (a
    new object when ``module`` itself is such a layer).

    >>> from flax import nnx
    >>> import jaxbn.nnx
    >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> model = nnx.Sequential(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), bn, bn)  # one BatchNorm, used twice
    >>> model = jaxbn.nnx.convert(model)
    >>> type(model.layers[1]).__name__, model.layers[1] is model.layers[2]
    ('BatchNorm', True)
    >>> type(model.layers[1]).__module__
    'jaxbn.nnx'
    """
    table = _flax_nnx_norms()
    if type(module) in table:
        return _converted(module, table[type(module)])
    if not isinstance(module, nnx.Module):
        raise TypeError(f"convert takes a flax.nnx module, got {type(module).__name__}.")
    # every place that holds such a layer: each container once (a shared one is changed once for all
    # that hold it), each of its entries that is such a layer (a layer held twice is found twice)
    places = []
    for path, node in nnx.iter_graph(module, graph=True):
        if isinstance(node, nnx.Variable) or not isinstance(node, (nnx.Pytree, list, dict, tuple)):
            continue
        for key, child in nnx.iter_children(node, graph=True):
            if type(child) not in table:
                continue
            if not isinstance(node, (nnx.Pytree, list, dict)):
                raise TypeError(
                    f"convert: cannot replace the {type(child).__name__} at {'/'.join(map(str, (*path, key)))} "
                    f"inside a {type(node).__name__}; hold the layers in a list (nnx.List) or dict (nnx.Dict). "
                    "Nothing was converted."
                )
            places.append((node, key, child, (*path, key)))
    replaced: dict[int, nnx.Module] = {}  # one jaxbn layer per flax layer, built before anything changes
    for _, _, layer, path in places:
        if id(layer) not in replaced:
            try:
                replaced[id(layer)] = _converted(layer, table[type(layer)])
            except (TypeError, ValueError) as err:  # jaxbn's checks at construction, e.g. of momentum
                error = TypeError if isinstance(err, TypeError) else ValueError
                raise error(f"convert: the {type(layer).__name__} at {'/'.join(map(str, path))}: {err} "
                            "Nothing was converted.") from err
    for parent, key, layer, _ in places:
        if isinstance(parent, nnx.Pytree) and isinstance(key, str):
            setattr(parent, key, replaced[id(layer)])
        else:
            parent[key] = replaced[id(layer)]
    return module
