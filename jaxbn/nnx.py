"""Flax NNX modules: drop-in replacements for flax's normalization layers, model-wide switches.

Each module takes flax's constructor arguments, creates flax's variables (names, types, metadata,
keys drawn from ``rngs``) and computes with :mod:`jaxbn.functional` or :mod:`jaxbn.per_example`;
:func:`freeze`, :func:`set_batch_norm` and :func:`convert` change a model's layers in place.
Details: docs/modules_notes.md.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import flax.errors
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _flax_dtypes
from flax.nnx.nn import initializers

from jaxbn import _validation, functional, per_example, renorm
from jaxbn._flax import path_name, running_stats_dtype

__all__ = ["BatchNorm", "BatchRenorm", "FrozenParam", "GroupNorm", "InstanceNorm", "LayerNorm"]
__all__ += ["RMSNorm", "convert", "freeze", "set_batch_norm", "unfreeze"]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

_CLOSURE_MESSAGE = (
    "{name} updates its running statistics in training, but it was captured as a closure by a "
    "transform (e.g. nnx.vmap or nnx.scan), which cannot write to it. Pass the module as an "
    "argument instead, e.g. nnx.vmap(f, in_axes=(nnx.StateAxes({{nnx.BatchStat: None, ...: "
    "None}}), 0), axis_name='batch') with BatchNorm(axis_name='batch') for statistics over the "
    "whole batch; or call it in inference mode (model.eval()) inside the transform."
)


class _Normalization(nnx.Module):
    """What every module here shares: checks, ``scale``/``bias`` as flax's, ``promote_dtype``."""

    if TYPE_CHECKING:  # the constructor's arguments become attributes in _setup

        def __getattr__(self, name: str) -> Any: ...

    def _setup(self, arguments: dict[str, Any], **attributes: Any) -> None:
        """Checks ``arguments`` (``locals()``), creates ``scale``/``bias``, stores the rest."""
        arguments = {k: v for k, v in arguments.items() if k != "self"}
        rngs, features = arguments.pop("rngs"), arguments.pop("num_features")
        self.num_features: int = _validation.positive_int(  # type: ignore[assignment]
            features, f"{type(self).__name__}: num_features"
        )
        _validation.check_epsilon(arguments["epsilon"])
        _validation.check_dtype(arguments["dtype"])
        for name in ("scale", "bias"):
            if f"use_{name}" not in arguments:  # RMSNorm has no bias
                continue
            init, metadata = arguments.pop(f"{name}_init"), arguments.pop(f"{name}_metadata")
            shape, dtype = (self.num_features,), arguments["param_dtype"]
            if arguments[f"use_{name}"]:
                setattr(self, name, nnx.Param(init(rngs.params(), shape, dtype), **metadata))
            else:  # None, as flax: data, except in flax's InstanceNorm
                setattr(self, name, None if isinstance(self, InstanceNorm) else nnx.data(None))
        for name, value in {**arguments, **attributes}.items():
            setattr(self, name, value)

    def _promote(self, x: Any, state: dict[str, jax.Array]) -> tuple[Any, dict, dict, Any]:
        """flax's ``promote_dtype`` step: ``(x, state, params, output dtype)``, see the notes."""
        names = [n for n in ("scale", "bias") if getattr(self, n, None) is not None]
        params = {n: getattr(self, n)[...] for n in names}
        x = jnp.asarray(x) if not hasattr(x, "dtype") else x
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x, state, params, self.dtype  # the functional core rejects x, naming it
        if self.promote_dtype is _flax_dtypes.promote_dtype:
            dtype = jnp.result_type(x, *state.values(), *params.values())
            return x, state, params, dtype if self.dtype is None else self.dtype
        state_keys, param_keys = ("mean", "var")[: len(state)], ("scale", "bias")
        values = (x, *(state.get(k) for k in state_keys), *(params.get(k) for k in param_keys))
        x, *promoted = self.promote_dtype(values, dtype=self.dtype)
        state = dict(zip(state_keys, promoted))
        params = {k: v for k, v in zip(param_keys, promoted[len(state_keys) :]) if v is not None}
        dtype = jnp.result_type(x, *params.values()) if self.dtype is None else self.dtype
        return x, state, params, dtype

    def _to_feature_shape(
        self, arrays: dict, x: Any, shape: tuple, axes: str, always=False
    ) -> dict:
        """The ``(num_features,)`` ``arrays``, checked, in the input's feature ``shape``."""
        owner = f"{type(self).__name__}(num_features={self.num_features})"
        for key, value in arrays.items():  # a variable of another layer (merged or restored state)
            _validation.check_variable_size(value, self.num_features, key, owner)
        if (arrays or always) and math.prod(shape) != self.num_features:
            raise ValueError(
                f"{owner} got an input of shape {tuple(x.shape)} with {math.prod(shape)} features "
                f"along {axes}={getattr(self, axes)!r}; construct it with "
                f"num_features={math.prod(shape)}, or check {axes} (-1 for NHWC, 1 for NCHW)."
            )
        return {key: value.reshape(shape) for key, value in arrays.items()}


class BatchNorm(_Normalization):
    """Drop-in replacement for :class:`flax.nnx.BatchNorm`; calls :func:`jaxbn.batch_norm`.

    flax's arguments (in flax's order, as flax's except those below), variables and mode switches
    (``.train()``, ``.eval()``, ``nnx.view``), then jaxbn's options; ``__call__`` takes ``mask=``.

    Args:
      momentum: as flax's, or None for the cumulative average (adds the float32 ``count``).
      use_fast_variance: ignored: the variance is always the stable one.
      unbiased_running_var: average ``var * n / (n - 1)`` into the running variance, as PyTorch.
      update_running_stats: update the running statistics; None: when not ``use_running_average``.
      ghost_batch_size: normalize ghost batches of this size (along axis 0) separately.
      sow_moments: sow the batch's :class:`jaxbn.Moments` as the intermediate ``batch_moments``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> bn = BatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(bn)))
    {'bias': (3,), 'count': (), 'mean': (3,), 'scale': (3,), 'var': (3,)}
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    >>> y = bn(x)  # training (the default): batch statistics, updates mean/var
    >>> bool(jnp.allclose(bn.mean[...], x.mean(0))), bn.count[...]
    (True, Array(1., dtype=float32))
    >>> bn.eval()  # inference: running statistics, nothing updated
    >>> bool(jnp.allclose(bn(x), (x - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5), atol=1e-5))
    True
    """

    #: Set by :func:`freeze`: running statistics, never updated, whatever ``use_running_average``.
    frozen: bool = False

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
        bias_init: Any = initializers.zeros,
        scale_init: Any = initializers.ones,
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
        self._setup(locals())
        # the sharding metadata of the first annotated parameter (see docs/modules_notes.md)
        annotated = [p.get_metadata() for p in (self.scale, self.bias) if p is not None]
        metadata: dict[str, Any] = next((m for m in annotated if m.get("out_sharding")), {})
        keep = ("out_sharding", "mesh", "sharding_rules", "eager_sharding")
        metadata = {key: value for key, value in metadata.items() if key in keep}
        stats_dtype = running_stats_dtype(param_dtype)  # float32, or a wider param_dtype (float64)
        self.mean = nnx.BatchStat(jnp.zeros((self.num_features,), stats_dtype), **metadata)
        self.var = nnx.BatchStat(jnp.ones((self.num_features,), stats_dtype), **metadata)
        if momentum is None:  # only then, so a default module's state stays flax's
            self.count = nnx.BatchStat(jnp.zeros((), jnp.float32))

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        """Normalizes ``x`` with batch or running statistics; ``mask`` (broadcastable to ``x``)
        selects the elements that count; ``use_running_average`` overrides the attribute."""
        _validation.check_not_traced(use_running_average, "use_running_average")
        if use_running_average is None:
            use_running_average = self.use_running_average
        if self.frozen:  # jaxbn.nnx.freeze: running statistics, never updated, whatever the mode
            use_running_average = True
        if use_running_average is None:
            raise ValueError(
                f"{type(self).__name__} needs use_running_average: pass it to the constructor, to "
                "the call (bn(x, use_running_average=...)), or set it with model.train() / "
                "model.eval()."
            )
        training = not use_running_average
        update = training if self.update_running_stats is None else self.update_running_stats
        update = update and not self.frozen
        names = ["mean", "var"] + (["count"] if self.momentum is None else [])
        running = {name: getattr(self, name) for name in names + ["steps"] if hasattr(self, name)}
        stored = {key: variable[...] for key, variable in running.items()}
        if update and jnp.iscomplexobj(x) and not jnp.iscomplexobj(stored["mean"]):
            # a complex input's running mean is complex (flax's drops the imaginary part)
            stored["mean"] = stored["mean"].astype(jnp.result_type(stored["mean"], jnp.complex64))
        x, promoted, params, dtype = self._promote(x, {k: stored[k] for k in ("mean", "var")})
        shape = _validation.feature_shape(x, self.axis)
        # averaging starts from the stored values
        state = {**stored, **({} if update else promoted)}
        vectors = self._to_feature_shape({k: state[k] for k in ("mean", "var")}, x, shape, "axis")
        options = ("axis", "momentum", "unbiased_running_var", "epsilon", "axis_name")
        kwargs = {name: getattr(self, name) for name in (*options, "axis_index_groups")}
        kwargs.update(ghost_batch_size=self.ghost_batch_size, mask=mask, dtype=dtype)
        kwargs.update(training=training, update_running_stats=update)
        kwargs["return_moments"] = self.sow_moments and (training or update)  # batch statistics
        params = self._to_feature_shape(params, x, shape, "axis")
        y, new_state, *moments = self._functional_call(x, params, {**state, **vectors}, **kwargs)
        if update:
            for key, variable in running.items():
                value = new_state[key].reshape(stored[key].shape)
                try:
                    if value.dtype == variable[...].dtype:
                        variable[...] = value  # keeps the variable's placement
                    else:  # the running mean of a complex input turns complex
                        variable.set_value(value)
                except flax.errors.TraceContextError as err:
                    message = _CLOSURE_MESSAGE.format(name=type(self).__name__)
                    raise flax.errors.TraceContextError(message) from err
        if moments and moments[0] is not None:
            self.sow(nnx.Intermediate, "batch_moments", moments[0])
        return y

    def _functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> Any:
        """The functional call: :func:`jaxbn.batch_norm`."""
        return functional.batch_norm(x, params, state, **kwargs)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given (recorded while frozen).

        Args:
          use_running_average: normalize with the running statistics (``nnx.view_info`` reads this).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017) as an NNX module; calls :func:`jaxbn.batch_renorm`.

    :class:`BatchNorm`'s arguments (``**kwargs``) and variables (a BatchNorm checkpoint loads),
    plus the limits ``r_max`` and ``d_max``, as :class:`jaxbn.linen.BatchRenorm`'s; a callable limit
    adds the int32 ``nnx.BatchStat`` ``steps``.

    >>> import jax, jaxbn
    >>> from flax import nnx
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 4.0 + 5.0
    >>> brn = BatchRenorm(3, r_max=lambda s: jaxbn.renorm_clipping(s)[0], rngs=nnx.Rngs(0))
    >>> _ = brn(x)
    >>> sorted(nnx.to_pure_dict(nnx.state(brn))), brn.steps[...]
    (['bias', 'mean', 'scale', 'steps', 'var'], Array(1, dtype=int32))
    """

    def __init__(self, num_features: int, *, r_max: Any = 3.0, d_max: Any = 5.0, **kwargs: Any):
        scheduled = callable(r_max) or callable(d_max)
        if not scheduled:
            _validation.check_renorm_limits(r_max, d_max)
        super().__init__(num_features, **kwargs)
        if scheduled:  # only then, so the variables stay BatchNorm's
            self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.r_max, self.d_max = r_max, d_max

    def _functional_call(self, x: jax.Array, params: Any, state: Any, **kwargs: Any) -> Any:
        """The functional call: :func:`jaxbn.batch_renorm` at the current limits."""
        return renorm.batch_renorm_scheduled(x, params, state, self.r_max, self.d_max, **kwargs)


# each per-example kind's function, and the attributes it takes beyond the common ones
_PER_EXAMPLE = {
    "LayerNorm": (per_example.layer_norm, ("reduction_axes", "feature_axes")),
    "RMSNorm": (per_example.rms_norm, ("reduction_axes", "feature_axes")),
    "GroupNorm": (per_example.group_norm, ("num_groups", "reduction_axes")),
    "InstanceNorm": (per_example.instance_norm, ("feature_axes",)),
}


class _PerExample(_Normalization):
    """What the per-example modules share: their call."""

    _kind = ""  # the subclass's name: its entry in _PER_EXAMPLE

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        x, _, params, dtype = self._promote(x, {})
        # GroupNorm: channels last, num_features checked even without scale/bias
        grouped = isinstance(self, GroupNorm)
        axes = "feature_axis" if grouped else "feature_axes"
        shape = _validation.feature_shape(x, getattr(self, axes), axes)
        params = self._to_feature_shape(params, x, shape, axes, always=grouped)
        function, fields = _PER_EXAMPLE[self._kind]
        fields += ("epsilon", "axis_name", "axis_index_groups")
        kwargs = {name: getattr(self, name) for name in fields}
        return function(x, params, mask=mask, dtype=dtype, **kwargs)  # type: ignore[operator]


class LayerNorm(_PerExample):
    """Drop-in replacement for :class:`flax.nnx.LayerNorm`; calls :func:`jaxbn.layer_norm`.

    flax's arguments and variables (``use_fast_variance`` is ignored).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 3)) + 1e4
    >>> bool(jnp.allclose(LayerNorm(3, rngs=nnx.Rngs(0))(x).std(-1), 1, atol=1e-3))
    True
    """

    _kind = "LayerNorm"

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
        self._setup(locals())


class RMSNorm(_PerExample):
    """Drop-in replacement for :class:`flax.nnx.RMSNorm`; calls :func:`jaxbn.rms_norm`.

    flax's arguments and variables (``use_fast_variance`` is ignored).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> RMSNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))(jnp.array([[3.0, -4.0]]))
    Array([[ 0.8485..., -1.1313...]], dtype=float32)
    """

    _kind = "RMSNorm"

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
        self._setup(locals())

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Normalizes ``x``; ``mask`` (broadcastable to ``x``) selects the elements that count."""
        return super().__call__(x, mask=mask)


class GroupNorm(_PerExample):
    """Drop-in replacement for :class:`flax.nnx.GroupNorm`; calls :func:`jaxbn.group_norm`.

    flax's arguments and variables (``use_fast_variance`` is ignored): channels last, in
    ``num_groups`` groups or groups of ``group_size``, both stored resolved, as flax.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = GroupNorm(4, num_groups=2, epsilon=1e-12, rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[1.0, 3.0, 10.0, 30.0]])), layer.group_size
    (Array([[-1.,  1., -1.,  1.]], dtype=float32), 2)
    """

    _kind = "GroupNorm"

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
        bias_init: Any = initializers.zeros,
        scale_init: Any = initializers.ones,
        reduction_axes: Any = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _flax_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        num_groups = _validation.number_of_groups(
            _validation.positive_int(num_features, "GroupNorm: num_features"),  # type: ignore[arg-type]
            num_groups,
            group_size,
            "channels (num_features)",
        )
        group_size = num_features // num_groups
        self._setup(locals(), feature_axis=-1)


class InstanceNorm(_PerExample):
    """Drop-in replacement for :class:`flax.nnx.InstanceNorm`; calls :func:`jaxbn.instance_norm`.

    flax's arguments and variables (``use_fast_variance`` is ignored).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> y = InstanceNorm(3, rngs=nnx.Rngs(0))(jax.random.normal(jax.random.key(0), (2, 5, 5, 3)))
    >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-5))
    True
    """

    _kind = "InstanceNorm"

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
        self._setup(locals())


# -- model-wide switches: graph walks --------------------------------------------------------------


class FrozenParam(nnx.Variable):
    """What :func:`freeze` turns ``scale``/``bias`` into: not an ``nnx.Param``, so not trained."""


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


def _retype_affine(layer: BatchNorm, old: type[nnx.Variable], new: type[nnx.Variable]) -> None:
    """Gives ``layer``'s ``scale``/``bias`` of type ``old`` the type ``new`` (value, metadata)."""
    for name in ("scale", "bias"):
        variable: Any = getattr(layer, name)
        if isinstance(variable, old):
            setattr(layer, name, new(variable.get_value(), **variable.get_metadata()))


def freeze(module: Any, *, keep_affine_trainable: bool = True) -> Any:
    """Freezes every jaxbn BatchNorm in ``module`` in place and returns it.

    A frozen layer normalizes with its running statistics and never updates them, whatever its
    mode, until :func:`unfreeze`; ``keep_affine_trainable=False`` makes ``scale``/``bias``
    :class:`FrozenParam`.

    Raises:
      TypeError: for flax's ``nnx.BatchNorm`` (:func:`convert` the model first).

    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.freeze(jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0)), keep_affine_trainable=False)
    >>> _ = bn(jnp.ones((4, 2)))  # in training mode, yet the statistics stay
    >>> bn.mean[...], type(bn.scale).__name__
    (Array([0., 0.], dtype=float32), 'FrozenParam')
    """
    _validation.check_static_bool(keep_affine_trainable, "keep_affine_trainable")
    for layer in _batch_norms(module, "freeze"):
        layer.frozen = True
        if not keep_affine_trainable:
            _retype_affine(layer, nnx.Param, FrozenParam)
    return module


def unfreeze(module: Any) -> Any:
    """Undoes :func:`freeze` in place and returns ``module``."""
    for layer in _batch_norms(module, "unfreeze"):
        layer.frozen = False
        _retype_affine(layer, FrozenParam, nnx.Param)
    return module


_UNSET: Any = object()


def set_batch_norm(
    module: Any, *, momentum: Any = _UNSET, axis_name: Any = _UNSET, axis_index_groups: Any = _UNSET
) -> Any:
    """Sets the arguments given on every jaxbn BatchNorm in ``module`` (in place) and returns it.

    Raises:
      ValueError: for an invalid momentum, or ``momentum=None`` on layers without ``count``.
      TypeError: for flax's ``nnx.BatchNorm`` (:func:`convert` the model first).

    >>> import jaxbn.nnx
    >>> from flax import nnx
    >>> jaxbn.nnx.set_batch_norm(jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0)), momentum=0.5).momentum
    0.5
    """
    layers = _batch_norms(module, "set_batch_norm")
    if momentum is None:
        missing = [layer for layer in layers if getattr(layer, "count", None) is None]
        if missing:
            raise ValueError(
                "set_batch_norm(momentum=None) needs BatchNorms created with momentum=None (they "
                f"have the 'count' variable); {len(missing)} layer(s) have none."
            )
    elif momentum is not _UNSET:
        _validation.check_momentum(momentum)
    values = {"momentum": momentum, "axis_name": axis_name, "axis_index_groups": axis_index_groups}
    for layer in layers:
        for name, value in values.items():
            if value is not _UNSET:
                setattr(layer, name, value)
    return module


def _converted(layer: nnx.Module, target: type) -> nnx.Module:
    """A jaxbn layer with ``layer``'s attributes and very variables (values, types, metadata)."""
    parameters = inspect.signature(target.__init__).parameters  # type: ignore[misc]
    skip = ("self", "num_features", "rngs", "group_size")  # GroupNorm's: num_groups determines it
    names = [name for name in parameters if name not in skip and not name.endswith("_metadata")]
    kwargs = {name: getattr(layer, name) for name in names if hasattr(layer, name)}
    num_features = getattr(layer, "num_features", None)
    if num_features is None:  # flax's GroupNorm keeps only the grouping
        num_features = layer.num_groups * layer.group_size  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = target(num_features, rngs=nnx.Rngs(0), **kwargs)
    for name in ("scale", "bias", "mean", "var"):
        if hasattr(layer, name):
            setattr(new, name, getattr(layer, name))
    return new


def convert(module: Any) -> Any:
    """Replaces flax's nnx normalization layers in ``module`` by jaxbn's, keeping their variables.

    Like PyTorch's ``convert_sync_batchnorm``: each :class:`flax.nnx.BatchNorm`, ``LayerNorm``,
    ``RMSNorm``, ``GroupNorm`` and ``InstanceNorm`` in the graph becomes the jaxbn layer with the
    same arguments and variable objects, in place (a new object only if ``module`` is such a layer).

    Raises:
      TypeError: for a layer held in a tuple (nothing is converted) or a non-nnx ``module``.

    >>> import jaxbn.nnx
    >>> from flax import nnx
    >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> model = jaxbn.nnx.convert(nnx.Sequential(bn, bn))  # one BatchNorm, used twice
    >>> type(model.layers[0]).__module__, model.layers[0] is model.layers[1]
    ('jaxbn.nnx', True)
    """
    norms = (BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm)
    table = {getattr(nnx, norm.__name__): norm for norm in norms}  # flax's class: jaxbn's
    if type(module) in table:
        return _converted(module, table[type(module)])
    if not isinstance(module, nnx.Module):
        raise TypeError(f"convert takes a flax.nnx module, got {type(module).__name__}.")
    # every place that holds such a layer: each container once (a shared one is changed once for
    # all that hold it), each entry that is such a layer (a layer held twice is found twice)
    places = []
    for path, node in nnx.iter_graph(module, graph=True):
        if isinstance(node, nnx.Variable) or not isinstance(node, (nnx.Pytree, list, dict, tuple)):
            continue
        for key, child in nnx.iter_children(node, graph=True):
            if type(child) not in table:
                continue
            if not isinstance(node, (nnx.Pytree, list, dict)):
                raise TypeError(
                    f"convert: cannot replace the {type(child).__name__} at "
                    f"{path_name((*path, key))} inside a {type(node).__name__}; hold the layers in "
                    "a list (nnx.List) or dict (nnx.Dict). Nothing was converted."
                )
            places.append((node, key, child, (*path, key)))
    replaced: dict[int, nnx.Module] = {}  # one jaxbn layer per flax layer, before anything changes
    for _, _, layer, path in places:
        if id(layer) not in replaced:
            try:
                replaced[id(layer)] = _converted(layer, table[type(layer)])
            except (TypeError, ValueError) as err:  # jaxbn's checks at construction (momentum...)
                raise (TypeError if isinstance(err, TypeError) else ValueError)(
                    f"convert: the {type(layer).__name__} at {path_name(path)}: {err} "
                    "Nothing was converted."
                ) from err
    for parent, key, layer, _ in places:
        if isinstance(parent, nnx.Pytree) and isinstance(key, str):
            setattr(parent, key, replaced[id(layer)])
        else:
            parent[key] = replaced[id(layer)]  # type: ignore[index, call-overload]
    return module
