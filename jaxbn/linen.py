"""Flax linen modules: drop-in replacements that call the functional core.

A module here owns its variables (the same names and collections as flax's)
and passes them to :mod:`jaxbn.functional` or :mod:`jaxbn.per_example`; it
computes nothing itself. Fields are flax's, in flax's order (so positional
construction matches), with two that jaxbn treats differently:

- ``use_fast_variance``: accepted and ignored; jaxbn's variance is always the
  stable one (exact at large offsets), there is no unstable fast mode.
- ``force_float32_reductions``: jaxbn always reduces in at least float32. In
  ``BatchNorm``, False stores the running statistics in ``param_dtype`` (as
  flax); in the other modules, False (half-precision statistics in flax) raises
  ``NotImplementedError`` for a half-precision input and changes nothing
  otherwise.

By default BatchNorm's running statistics are float32, as flax's, or float64
for a float64 ``param_dtype`` under ``jax_enable_x64`` (flax's start in float32
and turn float64 at the first float64 update).
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

__all__ = [
    "BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm", "batch_norm_overrides",
    "use_jaxbn",
]


def _affine_params(module: nn.Module, feature_shape: tuple[int, ...], use_scale: bool, use_bias: bool) -> dict:
    """Creates ``scale`` and ``bias`` as flax does (names, order, shapes, dtype)."""
    params = {}
    if use_scale:
        params["scale"] = module.param("scale", module.scale_init, feature_shape, module.param_dtype)
    if use_bias:
        params["bias"] = module.param("bias", module.bias_init, feature_shape, module.param_dtype)
    return params


def check_float32_reductions(module: nn.Module, x: Any) -> None:
    """Raises where flax's ``force_float32_reductions=False`` would reduce in half precision."""
    if module.force_float32_reductions:
        return
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if module.dtype is not None:
        dtype = jnp.promote_types(dtype, module.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4:
        raise NotImplementedError(
            f"{type(module).__name__}(force_float32_reductions=False) with a {jnp.dtype(dtype)} input "
            "asks for statistics in half precision; jaxbn always reduces in at least float32 "
            "(more accurate, and no slower since the reduction is memory-bound). Leave "
            "force_float32_reductions=True."
        )


def _running_variable(module: nn.Module, name: str, shape: tuple[int, ...], init: Any, *init_args: Any) -> Any:
    """``module.variable("batch_stats", name, init, *init_args)``, refusing a missing or misshapen one.

    flax silently creates a running statistic that the variables passed to
    ``apply`` lack (when ``batch_stats`` is mutable), which restarts it from its
    initial value; outside ``init`` that is always a mistake (variables of
    another model, or only ``{'params': ...}`` passed).
    """
    where = f"{type(module).__name__} at '{path_name(module.path)}'"
    if not module.is_initializing():
        if not module.has_variable("batch_stats", name):
            hint = (" (momentum=None keeps a 'count' that a BatchNorm created with a numeric momentum lacks)"
                    if name == "count" else "")
            raise ValueError(
                f"{where} has no batch_stats/{name} in the variables it was applied with{hint}: pass the "
                "variables init returned, with their 'batch_stats' collection, e.g. model.apply({'params': "
                "..., 'batch_stats': ...}, x, mutable=['batch_stats'])."
            )
        _validation.check_variable_size(
            unboxed(module.get_variable("batch_stats", name)), math.prod(shape), f"batch_stats/{name}", where
        )
    return module.variable("batch_stats", name, init, *init_args)


def _running_init(module: nn.Module, fill: float, shape: tuple[int, ...], dtype: Any) -> Any:
    """A running statistic filled with ``fill``, boxed as ``scale`` (else ``bias``) if that is boxed.

    flax annotates parameters only (``nn.with_partitioning`` /
    ``nn.with_logical_partitioning`` on an initializer); giving the running
    statistics the same box makes ``nn.get_partition_spec`` shard them like the
    parameters. The initializer is only traced (``jax.eval_shape``) for its
    metadata; unannotated initializers give a plain array, as flax.
    """
    value = jnp.full(shape, fill, dtype)
    inits = [init for use, init in ((module.use_scale, module.scale_init), (module.use_bias, module.bias_init)) if use]
    for init in inits:
        box = jax.eval_shape(lambda key: init(key, value.shape, module.param_dtype), jax.random.key(0))
        if isinstance(box, meta.AxisMetadata):
            return box.replace_boxed(value)
    return value


class BatchNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.BatchNorm`.

    Same fields and defaults, same call signature, same variables
    (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), so a
    model swaps the import and keeps its checkpoints; it calls
    :func:`jaxbn.batch_norm`. The options flax lacks default to flax's
    behaviour and variables: ``momentum=None`` (the cumulative average, adds
    ``batch_stats/count``), ``unbiased_running_var``, ``update_running_stats``
    and ``ghost_batch_size``. Where it differs from flax (count-weighted
    statistics, the stable variance, guards against bad data, sharding metadata
    on the running statistics, a complex running mean created at init) is
    listed in the README's "Differences from flax". During ``init``, as in
    flax, statistics are neither synchronized nor written; outside ``init``,
    variables without this layer's ``batch_stats`` (or with ones of another
    size) raise a ``ValueError`` instead of starting them afresh.

    Attributes:
      use_running_average: normalize with ``batch_stats`` (inference) instead
        of batch statistics; may also be passed to ``__call__``.
      axis: the feature axis (or axes).
      momentum: decay of the running average, in [0, 1]; None for the
        cumulative average (adds ``batch_stats/count``).
      epsilon: added to the variance, > 0.
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of ``scale`` and ``bias``, and of the running
        statistics where wider than float32 (float64 under x64).
      use_bias: learn a bias β.
      use_scale: learn a scale γ.
      bias_init: initializer for the bias (zeros).
      scale_init: initializer for the scale (ones).
      axis_name: device axis name(s) to synchronize statistics over.
      axis_index_groups: subgroups of ``axis_name`` (pmap only).
      use_fast_variance: accepted for compatibility; jaxbn's variance is
        always the stable one.
      force_float32_reductions: when False, running statistics are stored in
        ``param_dtype`` (as flax); statistics are still reduced in at least
        float32.
      unbiased_running_var: average ``var * n / (n - 1)`` (``n`` the global
        count) into the running variance, as PyTorch.
      update_running_stats: update the running statistics from the batch;
        None (default): exactly when not ``use_running_average``.
      ghost_batch_size: None, or the size of the ghost batches (consecutive
        examples along axis 0, local to each device) normalized separately.
      sow_moments: sow the batch's :class:`jaxbn.Moments` (when batch
        statistics are taken) into ``intermediates/batch_moments``, for
        :func:`jaxbn.merge_moments` and :func:`jaxbn.update_running_stats`.

    >>> import jax, jax.numpy as jnp
    >>> bn = BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    >>> variables = bn.init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> bool(jnp.allclose(updates['batch_stats']['mean'], 0.1 * x.mean(0)))
    True
    >>> cumulative = BatchNorm(use_running_average=False, momentum=None)
    >>> variables = cumulative.init(jax.random.key(1), x)
    >>> _, updates = cumulative.apply(variables, x, mutable=['batch_stats'])
    >>> updates['batch_stats']['count']
    Array(1., dtype=float32)
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
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x`` with batch statistics (training) or running ones.

        Args:
          x: the input.
          use_running_average: overrides the field of the same name.
          mask: boolean array broadcastable to ``x``; only ``True`` positions
            count towards the statistics.

        Returns:
          The normalized input, shaped as ``x``.
        """
        _validation.check_not_traced(use_running_average, "use_running_average")
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x) if not hasattr(x, "dtype") else x
        feature_shape = _validation.feature_shape(x, self.axis)
        stats_dtype = running_stats_dtype(self.param_dtype) if self.force_float32_reductions else self.param_dtype
        # complex input: a complex running mean (flax's turns complex at the first update)
        mean_dtype = jnp.result_type(stats_dtype, jnp.complex64) if jnp.iscomplexobj(x) else stats_dtype
        ra_mean = _running_variable(self, "mean", feature_shape, _running_init, self, 0.0, feature_shape, mean_dtype)
        ra_var = _running_variable(self, "var", feature_shape, _running_init, self, 1.0, feature_shape, stats_dtype)
        running = {"mean": ra_mean, "var": ra_var}
        if self.momentum is None:  # only then, so default variables stay flax's
            running["count"] = _running_variable(self, "count", (), lambda: jnp.zeros((), jnp.float32))
        running.update(self._extra_running_stats())
        params = _affine_params(self, feature_shape, self.use_scale, self.use_bias)
        state = {key: variable.value for key, variable in running.items()}

        training = not use_running_average
        initializing = self.is_initializing()
        update = training if self.update_running_stats is None else self.update_running_stats
        update = update and not initializing  # init writes nothing, as flax
        with warnings.catch_warnings():
            if initializing:  # a dummy batch of one is usual there, and nothing is estimated
                warnings.simplefilter("ignore", _validation.DegenerateBatchWarning)
            sow = self.sow_moments and (training or update)  # only where batch statistics are taken
            y, new_state, *moments = self.functional_call(
                x,
                params,
                state,
                return_moments=sow,
                training=training,
                update_running_stats=update,
                axis=self.axis,
                momentum=self.momentum,
                unbiased_running_var=self.unbiased_running_var,
                epsilon=self.epsilon,
                axis_name=None if initializing else self.axis_name,
                axis_index_groups=None if initializing else self.axis_index_groups,
                mask=mask,
                dtype=self.dtype,
                ghost_batch_size=None if initializing else self.ghost_batch_size,
            )
        if update:
            for key, variable in running.items():
                variable.value = new_state[key]
        if moments and moments[0] is not None:
            self.sow("intermediates", "batch_moments", moments[0])
        return y

    @nn.nowrap
    def functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
        """The functional call: :func:`jaxbn.batch_norm`."""
        return functional.batch_norm(x, params, state, **kwargs)

    @nn.nowrap
    def _extra_running_stats(self) -> dict[str, Any]:
        """``batch_stats`` variables beyond mean, var and count that the functional call updates."""
        return {}


class LayerNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.LayerNorm`; calls :func:`jaxbn.layer_norm`.

    Statistics per example over ``reduction_axes``; ``scale``/``bias`` of the
    ``feature_axes`` shape.

    Other fields, defaults and variables are flax's; ``use_fast_variance`` and
    ``force_float32_reductions`` as described in the module docstring.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 3)) + 1e4
    >>> variables = LayerNorm().init(jax.random.key(1), x)
    >>> y = LayerNorm().apply(variables, x)
    >>> bool(jnp.allclose(y.std(-1), 1, atol=1e-3))
    True
    """

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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        check_float32_reductions(self, x)
        feature_shape = _validation.feature_shape(x, self.feature_axes, "feature_axes")
        params = _affine_params(self, feature_shape, self.use_scale, self.use_bias)
        return per_example.layer_norm(
            x, params, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


class RMSNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.RMSNorm`; calls :func:`jaxbn.rms_norm`.

    ``x / sqrt(E[x^2] + eps) * scale`` per example over ``reduction_axes``.

    Other fields, defaults and variables are flax's; ``use_fast_variance`` and
    ``force_float32_reductions`` as described in the module docstring.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[3.0, -4.0]])
    >>> RMSNorm(epsilon=1e-12).apply(RMSNorm().init(jax.random.key(0), x), x)
    Array([[ 0.8485..., -1.1313...]], dtype=float32)
    """

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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        check_float32_reductions(self, x)
        feature_shape = _validation.feature_shape(x, self.feature_axes, "feature_axes")
        params = _affine_params(self, feature_shape, self.use_scale, False)
        return per_example.rms_norm(
            x, params, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


class GroupNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.GroupNorm`; calls :func:`jaxbn.group_norm`.

    Channels last, split into ``num_groups`` groups (or groups of
    ``group_size``: pass ``num_groups=None``); ``scale``/``bias`` of shape
    ``(C,)``.

    Other fields, defaults and variables are flax's; ``use_fast_variance`` and
    ``force_float32_reductions`` as described in the module docstring.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> variables = GroupNorm(num_groups=3).init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'params': {'bias': (6,), 'scale': (6,)}}
    """

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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        check_float32_reductions(self, x)
        params = _affine_params(self, _validation.feature_shape(x, -1), self.use_scale, self.use_bias)
        return per_example.group_norm(
            x, params, num_groups=self.num_groups, group_size=self.group_size, reduction_axes=self.reduction_axes,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype,
        )


class InstanceNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.InstanceNorm`; calls :func:`jaxbn.instance_norm`.

    Statistics per example and feature over the other non-batch axes.

    Other fields, defaults and variables are flax's; ``use_fast_variance`` and
    ``force_float32_reductions`` as described in the module docstring.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    >>> y = InstanceNorm().apply(InstanceNorm().init(jax.random.key(1), x), x)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-5))
    True
    """

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

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        check_float32_reductions(self, x)
        feature_shape = _validation.feature_shape(x, self.feature_axes, "feature_axes")
        params = _affine_params(self, feature_shape, self.use_scale, self.use_bias)
        return per_example.instance_norm(
            x, params, feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) as a linen module; calls :func:`jaxbn.batch_renorm`.

    ``y = γ (x̂ r + d) + β`` in training, with ``r`` and ``d`` the clipped,
    gradient-free corrections from the batch towards the running statistics
    (see :func:`jaxbn.batch_renorm` for the formula); inference is batch
    norm's. The fields (``ghost_batch_size`` included: ``r`` and ``d`` per
    ghost batch), call signature and variables are :class:`BatchNorm`'s (so a
    BatchNorm checkpoint loads, and ``r_max=1, d_max=0`` is BatchNorm
    to rounding), plus two fields:

    - ``r_max`` (>= 1) and ``d_max`` (>= 0): the clipping limits, each a
      number, or a callable ``step -> value`` evaluated at a step counter the
      module keeps. Only when one of them is callable does the module add the
      variable ``batch_stats/steps`` (int32, 0 at init, +1 at every update that
      changes the running statistics (not for a non-finite or fully masked
      batch), the limits using the value before it); with
      numbers its variables are exactly BatchNorm's. The paper's schedule is
      ``r_max=lambda s: jaxbn.renorm_clipping(s)[0]``,
      ``d_max=lambda s: jaxbn.renorm_clipping(s)[1]``. The defaults are the
      paper's final limits, 3 and 5.

    Reference: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS 2017.

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 4.0 + 5.0
    >>> brn = BatchRenorm(use_running_average=False, momentum=0.9)
    >>> variables = brn.init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = brn.apply(variables, x, mutable=['batch_stats'])
    >>> scheduled = BatchRenorm(use_running_average=False,
    ...                         r_max=lambda s: jaxbn.renorm_clipping(s)[0],
    ...                         d_max=lambda s: jaxbn.renorm_clipping(s)[1])
    >>> variables = scheduled.init(jax.random.key(1), x)
    >>> _, updates = scheduled.apply(variables, x, mutable=['batch_stats'])
    >>> updates['batch_stats']['steps']
    Array(1, dtype=int32)
    """

    r_max: Any = 3.0
    d_max: Any = 5.0

    @nn.nowrap
    def functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
        """The functional call: :func:`jaxbn.batch_renorm` at the current limits."""
        step = state.get("steps")
        r_max, d_max = (limit(step) if callable(limit) else limit for limit in (self.r_max, self.d_max))
        return renorm.batch_renorm(x, params, state, r_max=r_max, d_max=d_max, **kwargs)

    @nn.nowrap
    def _extra_running_stats(self) -> dict[str, Any]:
        """``batch_stats/steps``, only for a callable limit (so the variables stay BatchNorm's)."""
        if not (callable(self.r_max) or callable(self.d_max)):
            return {}
        return {"steps": _running_variable(self, "steps", (), lambda: jnp.zeros((), jnp.int32))}


# -- model-wide switches: method interception ---------------------------------------------------------------------------------------

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
                f"batch_norm_overrides: {type(module).__name__} at {path_name(module.path)} has no "
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
    normalize = module.functional_call if isinstance(module, BatchNorm) else functional.batch_norm
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
            module.put_variable("batch_stats", name, reboxed(old, new))
    if moments and moments[0] is not None:
        module.sow("intermediates", "batch_moments", moments[0])
    return y


def _linen_per_example(module: nn.Module, kind: str, x: Any, *, mask: Any = None) -> jax.Array:
    """A flax LayerNorm/RMSNorm/GroupNorm/InstanceNorm call computed by jaxbn with the module's params."""
    x = x if hasattr(x, "dtype") else jax.numpy.asarray(x)
    check_float32_reductions(module, x)
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
    overrides, convert = _in_force()
    if isinstance(module, BatchNorm) or (isinstance(module, nn.BatchNorm) and (overrides or convert)):
        if not overrides and isinstance(module, BatchNorm):
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
