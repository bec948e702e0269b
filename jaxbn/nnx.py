"""Flax NNX modules: drop-in replacements that call the functional core.

Each class takes :mod:`flax.nnx`'s constructor arguments in flax's order
(``num_features`` first, ``rngs`` required, ``scale_metadata`` /
``bias_metadata`` passed to the :class:`~flax.nnx.Param`), creates the same
variables under the same names and types (``scale``/``bias`` as
``nnx.Param``; BatchNorm's ``mean``/``var`` as ``nnx.BatchStat`` in float32,
float64 only for a float64 ``param_dtype`` under ``jax_enable_x64``)
and draws the same keys from ``rngs``, so ``nnx.state``, ``nnx.split`` /
``nnx.merge``, ``nnx.jit``, ``nnx.grad``, ``nnx.Optimizer`` and checkpoints
treat a model exactly as with flax's modules. A module here owns its variables
and passes them to :mod:`jaxbn.functional` / :mod:`jaxbn.per_example`; it
computes nothing itself.

What jaxbn does differently, as in :mod:`jaxbn.linen`:

- ``use_fast_variance`` is accepted and ignored: the variance is always the
  stable one (exact at large offsets, still one all-reduce).
- Statistics are reduced in at least float32 and synchronized over
  ``axis_name`` weighted by counts (exact with masks and uneven shards).
- A non-finite batch leaves BatchNorm's running statistics unchanged.
- Complex input: BatchNorm's running mean becomes complex at the first update
  (flax's writes the complex mean into its float32 variable, dropping the
  imaginary part).
- Bad hyperparameters raise at construction (``momentum``, ``epsilon``,
  ``num_features``, the grouping) and shape errors at the first call, naming
  the argument.

``promote_dtype`` behaves as flax's: with the default, the output dtype is
``dtype`` or the promotion of the input and the module's variables (for
BatchNorm that includes the running statistics, as in flax), and jaxbn
keeps the input in its own dtype internally (so a bfloat16 training step saves
bfloat16 activations); a custom function is applied to ``(x, mean, var, scale,
bias)`` (BatchNorm) or ``(x, scale, bias)`` as flax applies it, except that
running statistics are always updated from their stored values.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import flax.errors
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes
from flax.nnx.nn import initializers

from jaxbn import _validation, functional, per_example, renorm
from jaxbn._flax import path_name, running_stats_dtype

__all__ = [
    "BatchNorm", "BatchRenorm", "FrozenParam", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm", "convert",
    "freeze", "set_batch_norm", "unfreeze",
]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

_CLOSURE_MESSAGE = (
    "{name} updates its running statistics in training, but it was captured as a closure by a "
    "transform (e.g. nnx.vmap or nnx.scan), which cannot write to it. Pass the module as an "
    "argument instead, e.g. nnx.vmap(f, in_axes=(nnx.StateAxes({{nnx.BatchStat: None, ...: None}}), 0), "
    "axis_name='batch') with BatchNorm(axis_name='batch') for statistics over the whole batch; or "
    "call it in inference mode (model.eval()) inside the transform."
)


def _check_num_features(num_features: Any, cls: str) -> int:
    """Returns ``num_features`` as an int, raising unless it is a positive integer."""
    return _validation.positive_int(num_features, f"{cls}: num_features")


class _Affine(NamedTuple):
    """How a module creates its ``scale`` or ``bias``: flax's constructor arguments for it."""

    used: bool
    init: Any
    metadata: Mapping[str, Any]


class _Normalization(nnx.Module):
    """What every module here shares: argument checks, ``scale``/``bias`` created as flax
    creates them (same order, same keys drawn, same metadata), attribute storage."""

    def __init__(
        self, num_features: Any, *, rngs: nnx.Rngs, param_dtype: Any, affine: Mapping[str, _Affine],
        disabled: Any, **attributes: Any,
    ):
        self.num_features = _check_num_features(num_features, type(self).__name__)
        if "epsilon" in attributes:
            _validation.check_epsilon(attributes["epsilon"])
        _validation.check_dtype(attributes.get("dtype"))
        for name, (used, init, metadata) in affine.items():
            value = nnx.Param(init(rngs.params(), (self.num_features,), param_dtype), **metadata) if used else disabled
            setattr(self, name, value)
        self.param_dtype = param_dtype
        for name, value in attributes.items():
            setattr(self, name, value)


_SHARDING_METADATA = ("out_sharding", "mesh", "sharding_rules", "eager_sharding")


def _shard_like_params(module: nnx.Module, stats: tuple[str, ...], params: tuple[str, ...]) -> None:
    """Gives the ``stats`` variables the sharding metadata of the first of ``params`` that has any.

    flax annotates parameters only (``scale_metadata={'out_sharding': ...}`` or
    ``nnx.with_partitioning`` on an initializer); with the same
    ``out_sharding``/``mesh``/``sharding_rules`` the running statistics get the
    same partition spec (``nnx.get_partition_spec``), are placed like the
    parameters when created, and restore onto the same devices. Unannotated
    parameters leave the statistics as flax's.
    """
    for name in params:
        param = getattr(module, name)
        metadata = {} if param is None else param.get_metadata()
        if metadata.get("out_sharding"):
            metadata = {key: value for key, value in metadata.items() if key in _SHARDING_METADATA}
            for stat in stats:
                setattr(module, stat, type(getattr(module, stat))(getattr(module, stat)[...], **metadata))
            return


def _values(module: nnx.Module, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The values of the variables ``names`` that exist (are not None)."""
    return {name: getattr(module, name)[...] for name in names if getattr(module, name) is not None}


def _promote(
    module: nnx.Module, x: Any, state: dict[str, jax.Array], params: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], Any]:
    """flax's ``promote_dtype`` step: returns ``(x, state, params, output dtype)``.

    With flax's default function nothing is cast (jaxbn computes in at least
    float32 and keeps ``x`` in its own dtype for the backward pass); the
    output dtype is what flax's cast would give: ``dtype``, else the promotion
    of ``x``, ``state`` and ``params``. A custom function is applied to
    ``(x, *state, *params)`` in flax's order.
    """
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x, state, params, module.dtype  # the functional core rejects x, naming it
    if module.promote_dtype is _flax_dtypes.promote_dtype:
        dtype = module.dtype if module.dtype is not None else jnp.result_type(x, *state.values(), *params.values())
        return x, state, params, dtype
    state_keys, param_keys = ("mean", "var")[: len(state)], ("scale", "bias")
    values = (x, *(state.get(k) for k in state_keys), *(params.get(k) for k in param_keys))
    promoted = module.promote_dtype(values, dtype=module.dtype)
    x = promoted[0]
    state = {k: v for k, v in zip(state_keys, promoted[1 : 1 + len(state_keys)])}
    params = {k: v for k, v in zip(param_keys, promoted[1 + len(state_keys) :]) if v is not None}
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x, *params.values())
    return x, state, params, dtype


def _to_feature_shape(
    module: nnx.Module,
    arrays: dict[str, jax.Array],
    x: jax.Array,
    feature_shape: tuple[int, ...],
    axes_name: str,
    always: bool = False,
) -> dict[str, jax.Array]:
    """Views the ``(num_features,)`` variables in the input's feature shape.

    flax keeps ``(num_features,)`` even for several feature axes (their sizes
    multiplied); the functional core wants one entry per feature axis. Raises
    if the input's features are not ``num_features`` (unless there is nothing
    to reshape and not ``always``: flax's LayerNorm without parameters ignores
    ``num_features``).
    """
    for key, value in arrays.items():  # a variable of another layer (e.g. merged or restored state)
        _validation.check_variable_size(
            value, module.num_features, f"{key}", f"{type(module).__name__}(num_features={module.num_features})"
        )
    if (arrays or always) and math.prod(feature_shape) != module.num_features:
        raise ValueError(
            f"{type(module).__name__}(num_features={module.num_features}) got an input of shape "
            f"{tuple(x.shape)} with {math.prod(feature_shape)} features along "
            f"{axes_name}={getattr(module, axes_name)!r}; construct it with "
            f"num_features={math.prod(feature_shape)}, or check {axes_name} (-1 for NHWC, 1 for NCHW)."
        )
    return {key: value.reshape(feature_shape) for key, value in arrays.items()}


class BatchNorm(_Normalization):
    """Drop-in replacement for :class:`flax.nnx.BatchNorm`; calls :func:`jaxbn.batch_norm`.

    Same constructor arguments (in flax's order), same variables (``scale``,
    ``bias``: ``nnx.Param``; ``mean``, ``var``: float32 ``nnx.BatchStat``,
    float64 for a float64 ``param_dtype`` under x64, where flax's stay float32),
    same ``use_running_average`` switch (from the constructor, the call, or
    ``.train()`` / ``.eval()`` / ``nnx.view``). The options flax lacks
    default to flax's behaviour and variables (``momentum=None`` adds a float32
    ``count``); ``__call__`` takes ``mask=``. Where it differs from flax is
    listed in the README's "Differences from flax".

    Args:
      num_features: the size of the feature axis (the product of the sizes
        when ``axis`` names several).
      use_running_average: normalize with the running statistics (inference)
        instead of the batch's; the call argument takes precedence.
      axis: the feature axis (or axes): -1 for NHWC, 1 for NCHW.
      momentum: in [0, 1], the weight of the old running statistics; None for
        the cumulative average (adds ``count``).
      epsilon: > 0, added to the variance.
      dtype: output dtype (default: the promotion of the input and the
        variables, as flax).
      param_dtype: dtype of ``scale`` and ``bias``, and of ``mean`` and
        ``var`` where wider than float32 (float64 under x64).
      use_bias: learn a bias β.
      use_scale: learn a scale γ.
      bias_init: initializer of the bias (zeros).
      scale_init: initializer of the scale (ones).
      axis_name: device axis name(s) bound by ``pmap``/``shard_map``/``vmap``
        to synchronize statistics over; None under plain ``jit``.
      axis_index_groups: subgroups of ``axis_name`` (pmap only).
      use_fast_variance: accepted for compatibility; ignored.
      promote_dtype: flax's dtype-promotion hook (see the module docstring).
      rngs: the keys for ``scale_init`` and ``bias_init``.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      unbiased_running_var: average ``var * n / (n - 1)`` (``n`` the global
        count of the batch) into the running variance.
      update_running_stats: whether a call updates the running statistics;
        None for ``not use_running_average``.
      ghost_batch_size: None, or the size of the ghost batches (consecutive
        examples along axis 0, local to each device) normalized with their
        own statistics (ghost batch norm; see :func:`jaxbn.batch_norm`).
      sow_moments: sow the batch's :class:`jaxbn.Moments` (when batch
        statistics are taken) as the ``nnx.Intermediate`` ``batch_moments``
        (collect them with ``nnx.capture``), for :func:`jaxbn.merge_moments`
        and :func:`jaxbn.update_running_stats`.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> bn = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(bn)))
    {'bias': (3,), 'mean': (3,), 'scale': (3,), 'var': (3,)}
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    >>> y = bn(x)  # training (the default): batch statistics, updates mean/var
    >>> bool(jnp.allclose(bn.mean[...], 0.1 * x.mean(0)))
    True
    >>> bn.eval()  # inference: running statistics, nothing updated
    >>> bool(jnp.allclose(bn(x), (x - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5), atol=1e-5))
    True
    >>> cumulative = BatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
    >>> _ = cumulative(x)
    >>> cumulative.count[...]
    Array(1., dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | Any = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        unbiased_running_var: bool = False,
        update_running_stats: bool | None = None,
        ghost_batch_size: int | None = None,
        sow_moments: bool = False,
    ):
        if momentum is not None:
            _validation.check_momentum(momentum)
        _validation.check_static_bool(unbiased_running_var, "unbiased_running_var")
        _validation.check_static_bool(update_running_stats, "update_running_stats", none_ok=True)
        _validation.positive_int(ghost_batch_size, "ghost_batch_size", none_ok=True)
        super().__init__(
            num_features, rngs=rngs, param_dtype=param_dtype, disabled=nnx.data(None),
            affine={"scale": _Affine(use_scale, scale_init, scale_metadata),
                    "bias": _Affine(use_bias, bias_init, bias_metadata)},
            use_running_average=use_running_average, axis=axis, momentum=momentum, epsilon=epsilon, dtype=dtype,
            use_bias=use_bias, use_scale=use_scale, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
            unbiased_running_var=unbiased_running_var, update_running_stats=update_running_stats,
            ghost_batch_size=ghost_batch_size, sow_moments=sow_moments,
        )
        stats_dtype = running_stats_dtype(param_dtype)  # float32, or a wider param_dtype (float64)
        self.mean = nnx.BatchStat(jnp.zeros((self.num_features,), stats_dtype))
        self.var = nnx.BatchStat(jnp.ones((self.num_features,), stats_dtype))
        if momentum is None:  # only then, so a default module's state stays flax's
            self.count = nnx.BatchStat(jnp.zeros((), jnp.float32))
        _shard_like_params(self, ("mean", "var"), ("scale", "bias"))

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x`` with batch statistics (training) or running ones.

        Args:
          x: the input; its ``axis`` holds ``num_features`` features.
          use_running_average: overrides the attribute of the same name.
          mask: boolean array broadcastable to ``x``; only ``True`` positions
            count towards the statistics (all are normalized).

        Returns:
          The normalized input, shaped as ``x``.
        """
        _validation.check_not_traced(use_running_average, "use_running_average")
        if use_running_average is None:
            use_running_average = self.use_running_average
        if self.frozen:  # jaxbn.nnx.freeze: running statistics, never updated, whatever the mode
            use_running_average = True
        if use_running_average is None:
            raise ValueError(
                f"{type(self).__name__} needs use_running_average: pass it to the constructor, to the call "
                "(bn(x, use_running_average=...)), or set it with model.train() / model.eval()."
            )
        training = not use_running_average
        update = training if self.update_running_stats is None else self.update_running_stats
        update = update and not self.frozen
        running = {"mean": self.mean, "var": self.var}
        if self.momentum is None:
            running["count"] = self.count
        if hasattr(self, "steps"):  # BatchRenorm with scheduled limits
            running["steps"] = self.steps
        stored = {key: variable[...] for key, variable in running.items()}
        if update and jnp.iscomplexobj(x) and not jnp.iscomplexobj(stored["mean"]):
            # A complex input's running mean is complex (flax's drops the imaginary part).
            stored["mean"] = stored["mean"].astype(jnp.result_type(stored["mean"], jnp.complex64))
        x, promoted, params, dtype = _promote(
            self, x, {"mean": stored["mean"], "var": stored["var"]}, _values(self, ("scale", "bias"))
        )
        feature_shape = _validation.feature_shape(x, self.axis)
        state = {**stored, **({} if update else promoted)}  # averaging starts from the stored values
        vectors = _to_feature_shape(self, {k: state[k] for k in ("mean", "var")}, x, feature_shape, "axis")
        y, new_state, *moments = self._functional_call(
            x,
            _to_feature_shape(self, params, x, feature_shape, "axis"),
            {**state, **vectors},
            return_moments=self.sow_moments and (training or update),  # only where batch statistics are taken
            training=training,
            update_running_stats=update,
            axis=self.axis,
            momentum=self.momentum,
            unbiased_running_var=self.unbiased_running_var,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            dtype=dtype,
            ghost_batch_size=self.ghost_batch_size,
        )
        if update:
            for key, variable in running.items():
                value = new_state[key].reshape(stored[key].shape)
                try:
                    if value.dtype == variable[...].dtype:
                        variable[...] = value  # keeps the variable's placement
                    else:  # the running mean of a complex input turns complex
                        variable.set_value(value)
                except flax.errors.TraceContextError as err:
                    raise flax.errors.TraceContextError(_CLOSURE_MESSAGE.format(name=type(self).__name__)) from err
        if moments and moments[0] is not None:
            self.sow(nnx.Intermediate, "batch_moments", moments[0])
        return y

    def _functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
        """The functional call: :func:`jaxbn.batch_norm`."""
        return functional.batch_norm(x, params, state, **kwargs)

    #: Set by :func:`jaxbn.nnx.freeze`: normalize with the running statistics and never update them,
    #: whatever ``use_running_average`` (which ``.train()``/``.eval()``/``set_view`` still set, for
    #: after :func:`jaxbn.nnx.unfreeze`) says.
    frozen: bool = False

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given (a frozen layer
        records it but keeps using its running statistics until unfrozen).

        Args:
          use_running_average: normalize with the running statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) as an NNX module; calls :func:`jaxbn.batch_renorm`.

    ``y = γ (x̂ r + d) + β`` in training, with ``r`` and ``d`` the clipped,
    gradient-free corrections from the batch towards the running statistics
    (see :func:`jaxbn.batch_renorm`); inference is batch norm's. The
    arguments and variables are :class:`BatchNorm`'s (so a BatchNorm
    checkpoint loads, and ``r_max=1, d_max=0`` is BatchNorm (to rounding); with
    ``ghost_batch_size``, ``r`` and ``d`` are per ghost batch), plus two, as
    :class:`jaxbn.linen.BatchRenorm`:

    - ``r_max`` (>= 1) and ``d_max`` (>= 0): the clipping limits, each a
      number, or a callable ``step -> value`` evaluated at a step counter the
      module keeps. Only when one of them is callable does the module add the
      ``nnx.BatchStat`` ``steps`` (int32, 0 at construction, +1 at every
      update that changes the running statistics, the limits using the value
      before it). The paper's schedule is
      ``r_max=lambda s: jaxbn.renorm_clipping(s)[0]``,
      ``d_max=lambda s: jaxbn.renorm_clipping(s)[1]``. The defaults are the
      paper's final limits, 3 and 5.

    Reference: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS 2017.

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 4.0 + 5.0
    >>> brn = BatchRenorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> sorted(nnx.to_pure_dict(nnx.state(brn)))
    ['bias', 'mean', 'scale', 'var']
    >>> y = brn(x)
    >>> scheduled = BatchRenorm(3, r_max=lambda s: jaxbn.renorm_clipping(s)[0],
    ...                         d_max=lambda s: jaxbn.renorm_clipping(s)[1], rngs=nnx.Rngs(0))
    >>> _ = scheduled(x)
    >>> scheduled.steps[...]
    Array(1, dtype=int32)
    """

    def __init__(self, num_features: int, *, r_max: Any = 3.0, d_max: Any = 5.0, **kwargs: Any):
        """Takes :class:`BatchNorm`'s arguments (``rngs`` included), plus ``r_max`` and ``d_max``."""
        if not (callable(r_max) or callable(d_max)):
            renorm.check_renorm_limits(r_max, d_max)
        super().__init__(num_features, **kwargs)
        if callable(r_max) or callable(d_max):  # only then, so the variables stay BatchNorm's
            self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.r_max = r_max
        self.d_max = d_max

    def _functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
        """The functional call: :func:`jaxbn.batch_renorm` at the current limits."""
        step = state.get("steps")
        r_max, d_max = (limit(step) if callable(limit) else limit for limit in (self.r_max, self.d_max))
        return renorm.batch_renorm(x, params, state, r_max=r_max, d_max=d_max, **kwargs)


class LayerNorm(_Normalization):
    """Drop-in replacement for :class:`flax.nnx.LayerNorm`; calls :func:`jaxbn.layer_norm`.

    Statistics per example over ``reduction_axes``; ``scale``/``bias``
    (``nnx.Param`` of shape ``(num_features,)``) along ``feature_axes``.
    Arguments, variables and defaults are flax's (see the module docstring
    for ``use_fast_variance`` and ``promote_dtype``).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = LayerNorm(3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 3)) + 1e4
    >>> bool(jnp.allclose(layer(x).std(-1), 1, atol=1e-3))
    True
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, rngs=rngs, param_dtype=param_dtype, disabled=nnx.data(None),
            affine={"scale": _Affine(use_scale, scale_init, scale_metadata),
                    "bias": _Affine(use_bias, bias_init, bias_metadata)},
            epsilon=epsilon, dtype=dtype, use_bias=use_bias, use_scale=use_scale, reduction_axes=reduction_axes,
            feature_axes=feature_axes, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        x, _, params, dtype = _promote(self, x, {}, _values(self, ("scale", "bias")))
        feature_shape = _validation.feature_shape(x, self.feature_axes, "feature_axes")
        params = _to_feature_shape(self, params, x, feature_shape, "feature_axes")
        return per_example.layer_norm(
            x, params, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=dtype,
        )


class RMSNorm(_Normalization):
    """Drop-in replacement for :class:`flax.nnx.RMSNorm`; calls :func:`jaxbn.rms_norm`.

    ``x / sqrt(E[x^2] + eps) * scale`` per example over ``reduction_axes``;
    ``scale`` is an ``nnx.Param`` of shape ``(num_features,)``. Arguments,
    variables and defaults are flax's (see the module docstring).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> RMSNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))(jnp.array([[3.0, -4.0]]))
    Array([[ 0.8485..., -1.1313...]], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_scale: bool = True,
        scale_init: Any = initializers.ones,
        reduction_axes: Any = -1,
        feature_axes: Any = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, rngs=rngs, param_dtype=param_dtype, disabled=nnx.data(None),
            affine={"scale": _Affine(use_scale, scale_init, scale_metadata)},
            epsilon=epsilon, dtype=dtype, use_scale=use_scale, reduction_axes=reduction_axes,
            feature_axes=feature_axes, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        x, _, params, dtype = _promote(self, x, {}, _values(self, ("scale",)))
        feature_shape = _validation.feature_shape(x, self.feature_axes, "feature_axes")
        params = _to_feature_shape(self, params, x, feature_shape, "feature_axes")
        return per_example.rms_norm(
            x, params, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=dtype,
        )


class GroupNorm(_Normalization):
    """Drop-in replacement for :class:`flax.nnx.GroupNorm`; calls :func:`jaxbn.group_norm`.

    Channels last (``num_features`` of them), split into ``num_groups``
    groups, or groups of ``group_size`` (pass ``num_groups=None``); both are
    stored resolved, as flax does. ``scale``/``bias`` have shape
    ``(num_features,)``. Arguments, variables and defaults are flax's (see the
    module docstring).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = GroupNorm(4, num_groups=2, epsilon=1e-12, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[1.0, 3.0, 10.0, 30.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
    >>> layer.num_groups, layer.group_size
    (2, 2)
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros_init(),
        scale_init: Any = initializers.ones_init(),
        reduction_axes: Any = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        num_groups = per_example.number_of_groups(_check_num_features(num_features, "GroupNorm"), num_groups,
                                                  group_size, "channels (num_features)")
        super().__init__(
            num_features, rngs=rngs, param_dtype=param_dtype, disabled=nnx.data(None),
            affine={"scale": _Affine(use_scale, scale_init, scale_metadata),
                    "bias": _Affine(use_bias, bias_init, bias_metadata)},
            feature_axis=-1, num_groups=num_groups, group_size=num_features // num_groups,
            epsilon=epsilon, dtype=dtype, use_bias=use_bias, use_scale=use_scale, reduction_axes=reduction_axes,
            axis_name=axis_name, axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        x, _, params, dtype = _promote(self, x, {}, _values(self, ("scale", "bias")))
        params = _to_feature_shape(self, params, x, _validation.feature_shape(x, -1), "feature_axis", always=True)
        return per_example.group_norm(
            x, params, num_groups=self.num_groups, reduction_axes=self.reduction_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=dtype,
        )


class InstanceNorm(_Normalization):
    """Drop-in replacement for :class:`flax.nnx.InstanceNorm`; calls :func:`jaxbn.instance_norm`.

    Statistics per example (axis 0) and feature over the other axes;
    ``scale``/``bias`` of shape ``(num_features,)`` along ``feature_axes``.
    Arguments, variables and defaults are flax's (see the module docstring).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    >>> y = InstanceNorm(3, rngs=nnx.Rngs(0))(x)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-5))
    True
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros,
        scale_init: Any = initializers.ones,
        feature_axes: Any = -1,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        super().__init__(
            num_features, rngs=rngs, param_dtype=param_dtype, disabled=None,  # None: as flax's InstanceNorm
            affine={"scale": _Affine(use_scale, scale_init, scale_metadata),
                    "bias": _Affine(use_bias, bias_init, bias_metadata)},
            epsilon=epsilon, dtype=dtype, use_bias=use_bias, use_scale=use_scale, feature_axes=feature_axes,
            axis_name=axis_name, axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
        )

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        x, _, params, dtype = _promote(self, x, {}, _values(self, ("scale", "bias")))
        feature_shape = _validation.feature_shape(x, self.feature_axes, "feature_axes")
        params = _to_feature_shape(self, params, x, feature_shape, "feature_axes")
        return per_example.instance_norm(
            x, params, feature_axes=self.feature_axes, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=dtype,
        )


# -- model-wide switches: graph walks -----------------------------------------------------------------------------------------


class FrozenParam(nnx.Variable):
    """The type :func:`freeze` gives ``scale``/``bias`` with ``keep_affine_trainable=False``.

    Not an ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
    ``nnx.grad`` with ``nnx.Param`` leave them alone; :func:`unfreeze` makes
    them ``nnx.Param`` again.
    """


def _flax_nnx_norms() -> dict[type, type]:
    return {nnx.BatchNorm: BatchNorm, nnx.LayerNorm: LayerNorm, nnx.RMSNorm: RMSNorm,
            nnx.GroupNorm: GroupNorm, nnx.InstanceNorm: InstanceNorm}


def _batch_norms(module: Any, function: str) -> list:
    """jaxbn's nnx BatchNorms in ``module``; raises on flax's (before anything is changed)."""
    if not isinstance(module, nnx.Module):
        raise TypeError(f"{function} takes a flax.nnx module, got {type(module).__name__}.")
    found = []
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm):
            raise TypeError(
                f"{function}: the layer at {path_name(path)} is flax's nnx.BatchNorm; "
                "convert the model first: module = jaxbn.nnx.convert(module)."
            )
        if isinstance(node, BatchNorm):
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
                    f"convert: cannot replace the {type(child).__name__} at {path_name((*path, key))} "
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
                raise error(f"convert: the {type(layer).__name__} at {path_name(path)}: {err} "
                            "Nothing was converted.") from err
    for parent, key, layer, _ in places:
        if isinstance(parent, nnx.Pytree) and isinstance(key, str):
            setattr(parent, key, replaced[id(layer)])
        else:
            parent[key] = replaced[id(layer)]
    return module
