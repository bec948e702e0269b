"""Flax linen modules: drop-in replacements for flax's normalization layers, model-wide switches.

Each module has flax's fields, call signature and variables, and computes with
:mod:`jaxbn.functional` or :mod:`jaxbn.per_example`; :func:`batch_norm_overrides` and
:func:`use_jaxbn` change a model's layers without editing it. Details: docs/modules_notes.md.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta
from flax.linen import initializers

from jaxbn import _validation, functional, per_example, renorm
from jaxbn._flax import path_name, reboxed, running_stats_dtype, unboxed

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
__all__ += ["batch_norm_overrides", "use_jaxbn"]


def check_float32_reductions(module: nn.Module, x: Any) -> None:
    """Raises where flax's ``force_float32_reductions=False`` would reduce in half precision."""
    if module.force_float32_reductions:
        return
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    dtype = dtype if module.dtype is None else jnp.promote_types(dtype, module.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4:
        raise NotImplementedError(
            f"{type(module).__name__}(force_float32_reductions=False) with a {jnp.dtype(dtype)} "
            "input asks for statistics in half precision; jaxbn always reduces in at least float32 "
            "(more accurate, and no slower since the reduction is memory-bound). Leave "
            "force_float32_reductions=True."
        )


def _affine_params(module: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """Creates the ``scale`` and ``bias`` the module uses, as flax (names, order, shape, dtype)."""
    used = [n for n in ("scale", "bias") if getattr(module, f"use_{n}", False)]
    dtype = module.param_dtype
    return {n: module.param(n, getattr(module, f"{n}_init"), shape, dtype) for n in used}


def _stored_params(module: nn.Module) -> dict[str, Any]:
    """The ``scale`` and ``bias`` a (flax) module has, unboxed."""
    names = [name for name in ("scale", "bias") if module.has_variable("params", name)]
    return {name: unboxed(module.get_variable("params", name)) for name in names}


def _running_variable(module: nn.Module, name: str, shape: tuple, fill: Any, dtype: Any) -> None:
    """Creates ``batch_stats/name`` in ``init``; outside it, raises for a missing or wrong one."""
    where = f"{type(module).__name__} at '{path_name(module.path)}'"
    if not module.is_initializing():
        if not module.has_variable("batch_stats", name):
            hint = " (momentum=None keeps a 'count' that a BatchNorm created with a numeric "
            hint += "momentum lacks)"
            raise ValueError(
                f"{where} has no batch_stats/{name} in the variables it was applied with"
                f"{hint if name == 'count' else ''}: pass the variables init returned, with their "
                "'batch_stats' collection, e.g. model.apply({'params': ..., 'batch_stats': ...}, "
                "x, mutable=['batch_stats'])."
            )
        value = unboxed(module.get_variable("batch_stats", name))
        _validation.check_variable_size(value, math.prod(shape), f"batch_stats/{name}", where)

    def initial() -> Any:
        value = jnp.full(shape, fill, dtype)
        used = [p for p in ("scale", "bias") if getattr(module, f"use_{p}")]
        inits = [getattr(module, f"{p}_init") for p in used]
        key = jax.random.key(0)
        for init in inits if name in ("mean", "var") else []:  # traced only, for their metadata
            box = jax.eval_shape(lambda k, f=init: f(k, shape, module.param_dtype), key)
            if isinstance(box, meta.AxisMetadata):
                return box.replace_boxed(value)
        return value

    module.variable("batch_stats", name, initial)


def _batch_norm(
    module: nn.Module, x: Any, average: Any, mask: Any, overrides: Any = None, params: Any = None
) -> jax.Array:
    """One BatchNorm call by the functional core, ``overrides`` (None: jaxbn's call) over fields."""
    switched, overrides = overrides is not None, overrides or {}

    def field(name: str, default: Any = None) -> Any:
        return overrides[name] if name in overrides else getattr(module, name, default)

    if switched and "use_running_average" not in overrides:
        average = nn.merge_param("use_running_average", module.use_running_average, average)
    training = not overrides.get("use_running_average", average)
    initializing, momentum = module.is_initializing(), field("momentum")
    update = field("update_running_stats")
    update = (training if update is None else update) and not initializing  # init writes nothing
    if switched:
        update = bool(update) and module.is_mutable_collection("batch_stats")
    names = ["mean", "var"] + (["count"] if momentum is None else [])
    names += ["steps"] if module.has_variable("batch_stats", "steps") else []  # scheduled renorm
    for name in names:
        if not module.has_variable("batch_stats", name):
            hint = " (momentum=None needs the 'count' of a module created with momentum=None)"
            raise ValueError(
                f"batch_norm_overrides: {type(module).__name__} at {path_name(module.path)} has no "
                f"batch_stats/{name}{hint if name == 'count' else ''}."
            )
    stored: dict[str, Any] = {name: module.get_variable("batch_stats", name) for name in names}
    params = _stored_params(module) if params is None else params
    if not field("keep_affine_trainable", True):
        params = jax.lax.stop_gradient(params)
    # init normalizes a dummy batch: nothing estimated across devices or ghost batches, as flax
    distributed = ("axis_name", "axis_index_groups", "ghost_batch_size")
    kwargs = {name: None if initializing else field(name) for name in distributed}
    kwargs.update(axis=module.axis, epsilon=module.epsilon, mask=mask, dtype=module.dtype)
    kwargs.update(training=training, update_running_stats=update, momentum=momentum)
    kwargs["unbiased_running_var"] = getattr(module, "unbiased_running_var", False)
    # sown only where batch statistics are taken
    kwargs["return_moments"] = getattr(module, "sow_moments", False) and (training or update)
    state = {name: unboxed(value) for name, value in stored.items()}
    # jaxbn's module computes with its own functional call (BatchRenorm's is batch_renorm)
    normalize = module.functional_call if isinstance(module, BatchNorm) else functional.batch_norm
    with warnings.catch_warnings():
        if initializing:
            warnings.simplefilter("ignore", _validation.DegenerateBatchWarning)
        x = x if hasattr(x, "dtype") else jnp.asarray(x)
        y, new_state, *moments = normalize(x, params, state, **kwargs)  # type: ignore[arg-type]
    if update:
        for name, old in stored.items():
            module.put_variable("batch_stats", name, reboxed(old, new_state[name]))
    if moments and moments[0] is not None:
        module.sow("intermediates", "batch_moments", moments[0])
    return y


class BatchNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.BatchNorm`; calls :func:`jaxbn.batch_norm`.

    flax's fields (in flax's order, as flax's except those below), call signature and variables: a
    model swaps the import and keeps its checkpoints. Unlike flax, applying variables without this
    layer's ``batch_stats`` raises a ``ValueError``.

    Attributes:
      momentum: as flax's, or None for the cumulative average (adds ``batch_stats/count``).
      use_fast_variance: ignored: the variance is always the stable one.
      force_float32_reductions: False stores the running statistics in ``param_dtype``, as flax.
      unbiased_running_var: average ``var * n / (n - 1)`` into the running variance, as PyTorch.
      update_running_stats: update the running statistics; None: when not ``use_running_average``.
      ghost_batch_size: normalize ghost batches of this size (along axis 0) separately.
      sow_moments: sow the batch's :class:`jaxbn.Moments` as ``intermediates/batch_moments``.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    >>> bn = BatchNorm(use_running_average=False, momentum=None)
    >>> variables = bn.init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'batch_stats': {'count': (), 'mean': (3,), 'var': (3,)},
     'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> stats = updates['batch_stats']
    >>> bool(jnp.allclose(stats['mean'], x.mean(0))), stats['count']
    (True, Array(1., dtype=float32))
    """

    use_running_average: bool | None = None
    axis: int | Any = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    update_running_stats: bool | None = None
    ghost_batch_size: int | None = None
    sow_moments: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        """Normalizes ``x`` with batch or running statistics; ``mask`` (broadcastable to ``x``)
        selects the elements that count; ``use_running_average`` overrides the field."""
        _validation.check_not_traced(use_running_average, "use_running_average")
        name = "use_running_average"
        use_running_average = nn.merge_param(name, getattr(self, name), use_running_average)
        x = x if hasattr(x, "dtype") else jnp.asarray(x)
        shape = _validation.feature_shape(x, self.axis)
        dtype = self.param_dtype
        dtype = running_stats_dtype(dtype) if self.force_float32_reductions else dtype
        # a complex input's running mean is complex from init (flax's turns complex when updated)
        mean_dtype = jnp.result_type(dtype, jnp.complex64) if jnp.iscomplexobj(x) else dtype
        _running_variable(self, "mean", shape, 0.0, mean_dtype)
        _running_variable(self, "var", shape, 1.0, dtype)
        if self.momentum is None:  # only then, so default variables stay flax's
            _running_variable(self, "count", (), 0.0, jnp.float32)
        if callable(getattr(self, "r_max", None)) or callable(getattr(self, "d_max", None)):
            _running_variable(self, "steps", (), 0, jnp.int32)  # BatchRenorm's step counter
        return _batch_norm(self, x, use_running_average, mask, params=_affine_params(self, shape))

    @nn.nowrap
    def functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> Any:
        """The functional call: :func:`jaxbn.batch_norm`."""
        return functional.batch_norm(x, params, state, **kwargs)


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) as a linen module; calls :func:`jaxbn.batch_renorm`.

    :class:`BatchNorm`'s fields and variables (a BatchNorm checkpoint loads), plus two.

    Attributes:
      r_max: the limit (>= 1) of the correction ``r``; a number, or a callable ``step -> value``.
      d_max: the limit (>= 0) of ``d``, likewise. A callable limit adds the int32 counter
        ``batch_stats/steps``; :func:`jaxbn.renorm_clipping` is the paper's schedule.

    >>> import jax, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 4.0 + 5.0
    >>> brn = BatchRenorm(use_running_average=False, r_max=lambda s: jaxbn.renorm_clipping(s)[0])
    >>> _, updates = brn.apply(brn.init(jax.random.key(1), x), x, mutable=['batch_stats'])
    >>> sorted(updates['batch_stats']), updates['batch_stats']['steps']
    (['mean', 'steps', 'var'], Array(1, dtype=int32))
    """

    r_max: Any = 3.0
    d_max: Any = 5.0

    @nn.nowrap
    def functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> Any:
        """The functional call: :func:`jaxbn.batch_renorm` at the current limits."""
        return renorm.batch_renorm_scheduled(x, params, state, self.r_max, self.d_max, **kwargs)


# each per-example kind's function, and the fields it takes beyond the common ones
_PER_EXAMPLE = {
    "LayerNorm": (per_example.layer_norm, ("reduction_axes", "feature_axes")),
    "RMSNorm": (per_example.rms_norm, ("reduction_axes", "feature_axes")),
    "GroupNorm": (per_example.group_norm, ("num_groups", "group_size", "reduction_axes")),
    "InstanceNorm": (per_example.instance_norm, ("feature_axes",)),
}


def _per_example(module: nn.Module, kind: str, x: Any, params: Any, mask: Any) -> jax.Array:
    """A LayerNorm, RMSNorm, GroupNorm or InstanceNorm call (jaxbn's or flax's), by jaxbn."""
    function, fields = _PER_EXAMPLE[kind]
    fields += ("epsilon", "axis_name", "axis_index_groups", "dtype")
    return function(x, params, mask=mask, **{name: getattr(module, name) for name in fields})  # type: ignore[operator]


class _PerExample(nn.Module):
    """What jaxbn's per-example modules share: their call."""

    _kind = ""  # the subclass's name: its entry in _PER_EXAMPLE

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        check_float32_reductions(self, x)
        axes = getattr(self, "feature_axes", -1)  # GroupNorm: channels last
        params = _affine_params(self, _validation.feature_shape(x, axes, "feature_axes"))
        return _per_example(self, self._kind, x, params, mask)


class LayerNorm(_PerExample):
    """Drop-in replacement for :class:`flax.linen.LayerNorm`; calls :func:`jaxbn.layer_norm`.

    flax's fields and variables; ``use_fast_variance`` and ``force_float32_reductions`` as in
    :class:`BatchNorm`, except that False raises ``NotImplementedError`` for a half-precision input.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 3)) + 1e4
    >>> y = LayerNorm().apply(LayerNorm().init(jax.random.key(1), x), x)
    >>> bool(jnp.allclose(y.std(-1), 1, atol=1e-3))
    True
    """

    _kind = "LayerNorm"
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    reduction_axes: Any = -1
    feature_axes: Any = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True


class RMSNorm(_PerExample):
    """Drop-in replacement for :class:`flax.linen.RMSNorm`; calls :func:`jaxbn.rms_norm`.

    flax's fields and variables (see :class:`LayerNorm`).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[3.0, -4.0]])
    >>> RMSNorm(epsilon=1e-12).apply(RMSNorm().init(jax.random.key(0), x), x)
    Array([[ 0.8485..., -1.1313...]], dtype=float32)
    """

    _kind = "RMSNorm"
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    scale_init: Any = initializers.ones
    reduction_axes: Any = -1
    feature_axes: Any = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True


class GroupNorm(_PerExample):
    """Drop-in replacement for :class:`flax.linen.GroupNorm`; calls :func:`jaxbn.group_norm`.

    flax's fields and variables (see :class:`LayerNorm`): channels last, in ``num_groups`` groups.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> jax.tree_util.tree_map(jnp.shape, GroupNorm(num_groups=3).init(jax.random.key(1), x))
    {'params': {'bias': (6,), 'scale': (6,)}}
    """

    _kind = "GroupNorm"
    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    reduction_axes: Any = None
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True


class InstanceNorm(_PerExample):
    """Drop-in replacement for :class:`flax.linen.InstanceNorm`; calls :func:`jaxbn.instance_norm`.

    flax's fields and variables (see :class:`LayerNorm`).

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    >>> y = InstanceNorm().apply(InstanceNorm().init(jax.random.key(1), x), x)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-5))
    True
    """

    _kind = "InstanceNorm"
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    feature_axes: Any = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True


# -- model-wide switches: method interception ------------------------------------------------------

#: The overrides :func:`batch_norm_overrides` accepts.
OVERRIDES: tuple[str, ...] = ("use_running_average", "update_running_stats", "momentum")
OVERRIDES += ("axis_name", "axis_index_groups", "keep_affine_trainable")

# What is in force: (the overrides as sorted (name, value) pairs, whether flax's layers are computed
# by jaxbn). A JAX user context, so part of jax.jit's cache key: a function traced inside a block is
# traced again outside it, and the interception reads the value that keyed the trace. Per thread.
_ACTIVE = jax.make_user_context(((), False))


def _hashable(name: str, value: Any) -> Any:
    """``value`` as part of a cache key: sequences as tuples, a 0-d momentum array as a float."""
    if name == "axis_index_groups" and isinstance(value, (list, tuple, np.ndarray)):
        value = tuple(tuple(g) if isinstance(g, (list, tuple, np.ndarray)) else g for g in value)
    elif name == "axis_name" and isinstance(value, list):
        value = tuple(value)
    elif name == "momentum" and isinstance(value, (np.ndarray, np.generic, jax.Array)):
        value = value if isinstance(value, jax.core.Tracer) else float(value)  # a real scalar
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"batch_norm_overrides: {name}={value!r} is not a static Python value. The overrides "
            "are part of jax.jit's cache key, so they must be hashable and known when the block is "
            "entered: a number, a bool, an axis name, groups as lists or tuples of ints (not a "
            "jax.Array or a traced value)."
        ) from None
    return value


def _intercept(next_fun, args, kwargs, context):
    """Computes BatchNorms with the overrides in force, flax's layers under :func:`use_jaxbn`."""
    module, (items, convert) = context.module, _ACTIVE.value
    if context.method_name == "__call__" and not module.is_initializing():  # init: flax's own
        overrides = dict(items)
        wanted = overrides if isinstance(module, BatchNorm) else overrides or convert
        if wanted and isinstance(module, (BatchNorm, nn.BatchNorm)):
            return _switched_batch_norm(module, overrides, *args, **kwargs)
        if convert and type(module) in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm):
            return _flax_per_example(module, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _switched_batch_norm(module, overrides, x, use_running_average=None, *, mask=None) -> jax.Array:
    """A BatchNorm's call signature, for :func:`_batch_norm` with ``overrides``."""
    return _batch_norm(module, x, use_running_average, mask, overrides)


def _flax_per_example(module: nn.Module, x: Any, mask: Any = None) -> jax.Array:
    """flax's LayerNorm, RMSNorm, GroupNorm or InstanceNorm computed by jaxbn with its params."""
    x = x if hasattr(x, "dtype") else jnp.asarray(x)
    check_float32_reductions(module, x)
    return _per_example(module, type(module).__name__, x, _stored_params(module), mask)


@contextlib.contextmanager
def _switched(overrides: Mapping[str, Any], convert: bool) -> Iterator[None]:
    items, outer_convert = _ACTIVE.value
    merged = {**dict(items), **overrides}  # the inner block wins per name
    active = (tuple(sorted(merged.items())), outer_convert or convert)
    with _ACTIVE(active), nn.intercept_methods(_intercept):
        yield


def batch_norm_overrides(**overrides: Any) -> contextlib.AbstractContextManager[None]:
    """Overrides fields of every BatchNorm (jaxbn's or flax's) a linen model calls inside the block.

    The calls compute with the module's fields and variables except the overridden ones and write
    the running statistics only where ``batch_stats`` is mutable. Blocks nest (the inner one wins).
    What is in force keys ``jax.jit``'s cache, so a jitted step follows the block it is called in.

    Args:
      **overrides: Python values for any of ``OVERRIDES``; ``keep_affine_trainable=False``
        stops the gradients of ``scale`` and ``bias``.

    Raises:
      TypeError: for an unknown override or one that is not a static Python value.
      ValueError: for an invalid value, or (at the call) ``momentum=None`` on a layer without
        ``count``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> bn, x = nn.BatchNorm(use_running_average=False), jnp.arange(6.0).reshape(3, 2)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> step = jax.jit(lambda variables, x: bn.apply(variables, x, mutable=['batch_stats']))
    >>> with jaxbn.linen.batch_norm_overrides(use_running_average=True, update_running_stats=False):
    ...     y, updates = step(variables, x)  # frozen: normalized with the running (0, 1)
    >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + 1e-5)))
    True
    >>> bool((updates['batch_stats']['mean'] == 0).all())  # exact: the stored zeros, not written
    True
    >>> step(variables, x)[1]['batch_stats']['mean']  # after the block: 0.01 * the batch mean
    Array([0.02, 0.03], dtype=float32)
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(
            f"batch_norm_overrides got unknown override(s) {unknown}; the overrides are "
            f"{list(OVERRIDES)}."
        )
    for name in ("use_running_average", "keep_affine_trainable", "update_running_stats"):
        if name in overrides:
            none_ok = name == "update_running_stats"
            _validation.check_static_bool(overrides[name], name, none_ok=none_ok)
    if overrides.get("momentum") is not None:
        _validation.check_momentum(overrides["momentum"])
    return _switched({name: _hashable(name, value) for name, value in overrides.items()}, False)


def use_jaxbn() -> contextlib.AbstractContextManager[None]:
    """Computes flax's linen normalization layers with jaxbn inside the ``with`` block.

    Calls of exactly :class:`flax.linen.BatchNorm`, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
    ``InstanceNorm`` (outside ``init``) run jaxbn's functional core with the module's fields and
    variables, like PyTorch's ``convert_sync_batchnorm`` without rebuilding the model. It combines
    with :func:`batch_norm_overrides` and keys ``jax.jit``'s cache as it does.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> bn = nn.BatchNorm(use_running_average=False)
    >>> x = jnp.arange(6.0).reshape(3, 2).at[0, 0].set(jnp.nan)
    >>> step = jax.jit(lambda v, x: bn.apply(v, x, mutable=['batch_stats'])[1]['batch_stats'])
    >>> variables = bn.init(jax.random.key(0), x)
    >>> with jaxbn.linen.use_jaxbn():  # jaxbn: a NaN batch leaves the running statistics alone
    ...     print(bool(jnp.isfinite(step(variables, x)['mean']).all()))
    True
    >>> bool(jnp.isfinite(step(variables, x)['mean']).all())  # flax's, after the block
    False
    """
    return _switched({}, True)
