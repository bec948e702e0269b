"""Pure normalization functions: ``(inputs, params, state) -> (outputs, new state)``.

No Flax here. Parameters are ``{'scale', 'bias'}`` and running statistics
``{'mean', 'var'}``: the dicts flax keeps in its ``params`` and ``batch_stats``
collections, so the Flax modules pass their variables straight through. A
cumulative running average (``momentum=None``) adds a scalar ``'count'``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _ghost, _train_step, _validation, stats

__all__ = ["normalize", "batch_norm", "batch_norm_init", "update_running_stats"]

Params = Mapping[str, jax.Array]
State = Mapping[str, jax.Array]

_PARAM_KEYS = ("scale", "bias")
_STATE_KEYS = ("mean", "var")
_COUNT_KEY = "count"  # batches averaged by a cumulative running average (momentum=None)
_STEPS_KEY = "steps"  # updates taken, kept by batch renormalization's scheduled limits


def batch_norm_init(
    num_features: int | Sequence[int],
    *,
    dtype: Any = jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
    cumulative: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Creates batch-norm parameters and running statistics, as flax initializes them.

    ``scale = 1``, ``bias = 0``, running ``mean = 0`` and ``var = 1``; with
    ``cumulative=True`` also ``count = 0``, the state of
    ``batch_norm(..., momentum=None)``.

    Args:
      num_features: the size of the feature axis (or a tuple of sizes when
        normalizing over several feature axes).
      dtype: dtype of the parameters and statistics (float32, as flax). A
        complex dtype (for complex input) makes the running mean complex; the
        variance and the parameters take the matching real dtype.
      use_scale: include ``'scale'`` in the parameters.
      use_bias: include ``'bias'`` in the parameters.
      cumulative: add ``'count'``, a float32 scalar: the number of batches a
        cumulative average (``momentum=None``) has averaged.

    Returns:
      ``(params, state)``: ``{'scale', 'bias'}`` (those enabled) and
      ``{'mean', 'var'}`` (and ``'count'`` if cumulative).

    Raises:
      TypeError / ValueError: ``num_features`` is not a positive integer (or a
        tuple of them), or ``dtype`` is not floating or complex.

    >>> params, state = batch_norm_init(3)
    >>> params['scale'], state['var']
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    >>> batch_norm_init(3, cumulative=True)[1]['count']
    Array(0., dtype=float32)
    >>> batch_norm_init(3, dtype=jnp.complex64)[1]['mean'].dtype
    dtype('complex64')
    """
    sizes = tuple(num_features) if isinstance(num_features, Sequence) else (num_features,)
    if not sizes:
        raise ValueError("num_features must be a positive int or a non-empty tuple of them, got ().")
    shape = tuple(_validation.positive_int(n, "num_features") for n in sizes)
    _validation.check_dtype(dtype, complex_ok=True)
    real_dtype = jnp.finfo(dtype).dtype  # of the variance and the parameters: float32 for complex64
    params = {}
    if use_scale:
        params["scale"] = jnp.ones(shape, real_dtype)
    if use_bias:
        params["bias"] = jnp.zeros(shape, real_dtype)
    state = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, real_dtype)}
    if cumulative:
        state[_COUNT_KEY] = jnp.zeros((), jnp.float32)
    return params, state


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-5,
    dtype: Any = None,
) -> jax.Array:
    r"""Normalizes ``x`` with given statistics and applies an optional affine map.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \gamma + \beta

    with ``mean``, ``var``, ``scale`` (γ) and ``bias`` (β) of the feature
    shape, broadcast along every other axis. Computed in at least float32.

    Args:
      x: floating or complex input.
      mean, var: per-feature statistics (shape: ``x``'s sizes along ``axis``);
        for complex ``x`` the mean may be complex, the variance is real
        (``E[|x - mu|^2]``).
      scale, bias: optional per-feature affine parameters.
      axis: the feature axis or axes (``-1`` for NHWC, ``1`` for NCHW).
      epsilon: added to the variance, > 0.
      dtype: output dtype; default: the promotion of ``x``, ``scale`` and
        ``bias`` (flax's rule).

    Returns:
      The normalized array, shaped as ``x``.

    >>> import jax.numpy as jnp
    >>> normalize(jnp.array([[1.0, 10.0], [3.0, 30.0]]), jnp.array([2.0, 20.0]),
    ...           jnp.array([1.0, 100.0]), epsilon=1e-12)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> normalize(jnp.array([[1 + 2j], [1 - 2j]]), jnp.array([1 + 0j]), jnp.array([4.0]), epsilon=1e-12)
    Array([[0.+1.j],
           [0.-1.j]], dtype=complex64)
    """
    x = _validation.check_inexact(x)
    compute_dtype = _validation.compute_dtype(x, dtype)
    _validation.check_epsilon(epsilon, compute_dtype)
    _validation.check_output_dtype(x.dtype, dtype)
    _, reduction_axes, feature_shape = _validation.feature_axes(x, axis)
    params = _validation.check_feature_arrays(
        {"scale": scale, "bias": bias}, _PARAM_KEYS, (), feature_shape, "params"
    )
    stats_ = _validation.check_feature_arrays(
        {"mean": mean, "var": var}, _STATE_KEYS, _STATE_KEYS, feature_shape, "state"
    )
    if jnp.iscomplexobj(stats_["var"]):
        raise TypeError(f"var must be real (the variance E|x - mean|^2), got {stats_['var'].dtype}.")
    with jax.named_scope("jaxbn.normalize"):
        return _train_step.affine_normalize(
            x, stats_["mean"], None, stats_["var"], params, reduction_axes, epsilon, compute_dtype,
            _validation.output_dtype(x, params, dtype),
        )


def _update_running_stats(
    state: State, batch: stats.Moments, momentum: Any, unbiased: bool
) -> dict[str, jax.Array]:
    """:func:`_averaged_into` as one cached jitted call; a Python momentum stays a Python number (static),
    so ``1 - momentum`` is computed in double precision, as it was before the call was jitted."""
    if momentum is None or isinstance(momentum, (int, float)):
        return _averaged_into_static_momentum(state, batch, momentum, unbiased)
    return _averaged_into_jitted(state, batch, momentum, unbiased)


def _averaged_into(
    state: State, batch: stats.Moments, momentum: Any, unbiased: bool
) -> dict[str, jax.Array]:
    """Averages ``batch`` into ``state``, guarded; the one place running stats change.

    Exponential (``momentum * old + (1 - momentum) * batch``) or, for
    ``momentum=None``, cumulative (``old + (batch - old) / (count + 1)``, and
    ``count + 1``). With ``unbiased`` the variance averaged is
    ``var * n / (n - 1)``, ``n`` the global count. Features without a valid
    element (and, if unbiased, with only one) keep their old statistics; when
    any valid feature's batch statistics are not finite the whole state is kept
    and ``count``/``steps`` do not advance (the decision depends only on
    globally reduced values, so every device takes it alike). A non-finite old
    statistic is replaced by the batch's. The state keeps its dtypes.
    """
    mean, var, n = (lax.stop_gradient(v) for v in (batch.mean, batch.var, batch.count))
    has_data = n > 0
    all_finite = jnp.all(jnp.where(has_data, jnp.isfinite(mean) & jnp.isfinite(var), True))
    update = has_data & all_finite
    update_var = update
    if unbiased:
        var = var * n / jnp.maximum(n - 1, 1)
        update_var = update & (n > 1)
    new_state = dict(state)
    for key, value, keep in (("mean", mean, update), ("var", var, update_var)):
        old = state[key]
        previous = old.astype(value.dtype)
        if momentum is None:
            averaged = previous + (value - previous) / (state[_COUNT_KEY].astype(value.dtype) + 1)
        else:
            averaged = momentum * previous + (1 - momentum) * value
        averaged = jnp.where(jnp.isfinite(previous), averaged, value)  # a bad state is replaced
        new_state[key] = jnp.where(keep, averaged, old).astype(old.dtype)
    for key in (_COUNT_KEY, _STEPS_KEY):
        if key in state:
            new_state[key] = jnp.where(jnp.any(update), state[key] + 1, state[key]).astype(state[key].dtype)
    return new_state


_averaged_into_static_momentum = jax.jit(_averaged_into, static_argnums=(2, 3))
_averaged_into_jitted = jax.jit(_averaged_into, static_argnums=(3,))


def update_running_stats(
    state: State,
    batch: stats.Moments,
    *,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
) -> dict[str, jax.Array]:
    r"""Averages batch moments into running statistics, as :func:`batch_norm`'s training step does.

    ``state' = momentum * state + (1 - momentum) * (mean, var)`` (or the
    cumulative average for ``momentum=None``, with ``state['count']``), with
    the same guards: a non-finite batch leaves the state as it is, features
    without valid elements keep theirs. Together with
    ``batch_norm(..., update_running_stats=False, return_moments=True)`` and
    :func:`jaxbn.merge_moments` it gives one update per optimizer step over
    several micro-batches (four updates at momentum 0.9 would act like one at
    0.9^4 ~ 0.66).

    Args:
      state: ``{'mean', 'var'}`` (and ``'count'`` for ``momentum=None``).
      batch: the batch's :class:`jaxbn.Moments` of the state's shape.
      momentum: in [0, 1], or None for the cumulative average.
      unbiased_running_var: average ``var * n / (n - 1)`` into the state.

    Returns:
      The new state, with the old one's keys and dtypes.

    Raises:
      TypeError / ValueError: bad state, momentum or moments.

    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> params, state = jaxbn.batch_norm_init(2)
    >>> micro = [jaxbn.batch_norm(x[i:i + 2], params, state, training=True, momentum=0.9,
    ...                           update_running_stats=False, return_moments=True)[2] for i in (0, 2)]
    >>> update_running_stats(state, jaxbn.merge_moments(micro), momentum=0.9)['mean']
    Array([0.3, 0.4], dtype=float32)
    """
    if not isinstance(batch, stats.Moments):
        raise TypeError(f"batch must be jaxbn.Moments, got {type(batch).__name__}.")
    feature_shape = tuple(jnp.shape(batch.mean))
    for field in ("mean", "var", "count"):
        value = getattr(batch, field)
        dtype = jnp.result_type(value)
        if not jnp.issubdtype(dtype, jnp.inexact if field == "mean" else jnp.floating):
            raise TypeError(
                f"batch.{field} must have a {'floating or complex' if field == 'mean' else 'real floating'} dtype, "
                f"got {dtype}; pass the Moments that jaxbn.moments, batch_norm(..., return_moments=True) or "
                "merge_moments returned."
            )
        if tuple(jnp.shape(value)) != feature_shape:
            raise ValueError(
                f"batch.{field} has shape {tuple(jnp.shape(value))}, but batch.mean has shape {feature_shape}: "
                "a Moments holds one value per feature in each field."
            )
    checked = _validation.check_feature_arrays(
        state, _STATE_KEYS, _STATE_KEYS, feature_shape, "state", scalars=(_COUNT_KEY, _STEPS_KEY)
    )
    _check_state_dtypes(checked, batch.mean, update=True)
    _validation.check_static_bool(unbiased_running_var, "unbiased_running_var")
    if momentum is not None:
        _validation.check_momentum(momentum)
    _check_cumulative_state(checked, momentum)
    return _update_running_stats(checked, batch, momentum, unbiased_running_var)


def _check_cumulative_state(state: Mapping[str, Any], momentum: Any) -> None:
    """Raises unless ``state`` has a ``'count'`` exactly when ``momentum`` is None."""
    if momentum is None and _COUNT_KEY not in state:
        raise ValueError(
            "momentum=None (a cumulative average of all batch statistics) needs "
            "state['count'], the number of batches averaged so far; create the state "
            "with batch_norm_init(..., cumulative=True)."
        )
    if momentum is not None and _COUNT_KEY in state:
        raise ValueError(
            f"state has a 'count' entry (a cumulative average, from batch_norm_init(..., "
            f"cumulative=True)), but momentum={momentum!r} asks for an exponential "
            "average, which would leave it stale. Pass momentum=None, or a state "
            "without 'count'."
        )


def _check_state_dtypes(state: Mapping[str, jax.Array], x: jax.Array, update: bool) -> None:
    """Raises for running statistics that would lose precision or their dtype."""
    for key in _STATE_KEYS:
        dtype = state[key].dtype
        if dtype == jnp.float16:
            raise TypeError(
                f"state['{key}'] is float16, whose range (6.5e4) a running variance easily exceeds; "
                "keep running statistics in float32 (or bfloat16). The input itself may be float16."
            )
    if jnp.iscomplexobj(state["var"]):
        raise TypeError(f"state['var'] must be real (the variance E|x - mean|^2), got {state['var'].dtype}.")
    if update and jnp.iscomplexobj(x) and not jnp.iscomplexobj(state["mean"]):
        raise TypeError(
            f"the input is {x.dtype} but state['mean'] is {state['mean'].dtype}: a complex batch "
            "mean cannot be averaged into a real running mean without changing its dtype. Create "
            "the state with batch_norm_init(..., dtype=jnp.complex64)."
        )


class _BatchNormCall(NamedTuple):
    """:func:`batch_norm`'s arguments, validated once."""

    function: str  # names the caller in messages
    x: jax.Array
    params: dict[str, jax.Array]
    state: dict[str, jax.Array]
    given_state: Any  # returned as it is when nothing updates it
    mask: jax.Array | None
    reduction_axes: tuple[int, ...]
    training: bool
    update: bool
    momentum: Any
    unbiased_running_var: bool
    epsilon: Any
    axis_name: Any
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    compute_dtype: Any
    out_dtype: Any
    ghost_batch_size: int | None
    single_value: bool  # one value per feature across devices: no statistics to take
    want_moments: bool  # return the batch moments, also where nothing is updated


def check_batch_norm_args(
    function: str,
    x: Any,
    params: Any,
    state: Any,
    *,
    training: Any,
    update_running_stats: Any,
    axis: Any,
    momentum: Any,
    unbiased_running_var: Any,
    epsilon: Any,
    axis_name: Any,
    axis_index_groups: Any,
    mask: Any,
    dtype: Any,
    ghost_batch_size: Any,
    return_moments: Any = False,
    complex_ok: bool = True,
    scalars: tuple[str, ...] = (_COUNT_KEY,),
) -> _BatchNormCall:
    """Validates :func:`batch_norm`'s arguments (shared with :func:`jaxbn.batch_renorm`)."""
    _validation.check_static_bool(training, "training")
    _validation.check_static_bool(return_moments, "return_moments")
    _validation.check_static_bool(update_running_stats, "update_running_stats", none_ok=True)
    _validation.check_static_bool(unbiased_running_var, "unbiased_running_var")
    update = training if update_running_stats is None else update_running_stats
    x = _validation.check_inexact(x) if complex_ok else _validation.check_floating(x)
    compute_dtype = _validation.compute_dtype(x, dtype)
    _validation.check_epsilon(epsilon, compute_dtype)
    _validation.check_output_dtype(x.dtype, dtype)
    _, reduction_axes, feature_shape = _validation.feature_axes(x, axis)
    params = _validation.check_feature_arrays(params, _PARAM_KEYS, (), feature_shape, "params")
    checked_state = _validation.check_feature_arrays(
        state, _STATE_KEYS, _STATE_KEYS, feature_shape, "state", scalars=scalars
    )
    _check_state_dtypes(checked_state, x, update)
    if momentum is not None:
        _validation.check_momentum(momentum)
    if update:
        _check_cumulative_state(checked_state, momentum)
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    statistics = training or update or return_moments  # batch statistics are taken (and the mask counts)
    if statistics and math.prod(x.shape[i] for i in reduction_axes) == 0:
        raise ValueError(
            f"{function}: x of shape {x.shape} is a zero-size batch: with axis={axis!r} there are no elements "
            f"along the reduction axes {reduction_axes} to take batch statistics over. Skip the call for an "
            "empty batch, or normalize it with the running statistics (training=False, "
            "update_running_stats=False)."
        )
    single_value = False
    if statistics and mask is None:
        devices = stats.axis_size(axis_name, groups)
        single_value = math.prod(x.shape[i] for i in reduction_axes) * devices == 1
        if single_value:
            warnings.warn(
                f"{function}: an input of shape {x.shape} with axis={axis!r} has one value per feature "
                "(across all devices), so its batch variance is no estimate: the output is the bias (the "
                "normalized value is 0, as in flax), the running mean is updated and the running "
                "variance kept.",
                _validation.DegenerateBatchWarning,
                stacklevel=4,
            )
    if mask is not None and statistics:
        mask = _validation.check_mask(mask, x.shape)
    ghost = _ghost.check_ghost_batch_size(ghost_batch_size, x, reduction_axes, mask, statistics and not single_value)
    return _BatchNormCall(
        function, x, params, checked_state, state, mask if statistics else None, reduction_axes, training, update,
        momentum, unbiased_running_var, epsilon, axis_name, groups, compute_dtype,
        _validation.output_dtype(x, params, dtype), ghost, single_value, return_moments,
    )


def batch_norm(
    x: jax.Array,
    params: Params | None,
    state: State,
    *,
    training: bool,
    update_running_stats: bool | None = None,
    axis: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
    epsilon: float = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    dtype: Any = None,
    ghost_batch_size: int | None = None,
    return_moments: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]] | tuple[jax.Array, dict[str, jax.Array], stats.Moments | None]:
    r"""Batch normalization with explicit running statistics.

    Training normalizes with the statistics of the batch (every axis but
    ``axis``, and with ``axis_name`` every device: count-weighted, one
    collective; see :func:`jaxbn.moments`) and averages them into the state;
    inference normalizes with ``state`` and returns it unchanged:

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta,
        \qquad
        \text{state}' = m \cdot \text{state} + (1 - m) \cdot (\mu_B, \sigma_B^2)

    with flax's momentum convention (PyTorch's ``momentum`` is ``1 - m``) and
    the biased batch variance. ``update_running_stats`` decouples the update
    from ``training`` (see the README's table); ``momentum=None`` keeps the
    exact cumulative average (state from ``batch_norm_init(..., cumulative=True)``).
    A batch with a non-finite statistic leaves the state unchanged; a feature
    with no valid element under ``mask`` is normalized with the running
    statistics and keeps them; a batch with one value per feature outputs the
    bias, updates the running mean and keeps the running variance (with a
    :class:`jaxbn.DegenerateBatchWarning`). Training is a custom JVP that
    saves only ``x`` for reverse mode: forward and reverse mode to any order.

    Args:
      x: floating or complex input, e.g. NHWC (``axis=-1``) or NCHW (``axis=1``).
      params: ``{'scale', 'bias'}``, each optional, of the feature shape.
      state: ``{'mean', 'var'}`` of the feature shape (flax's ``batch_stats``),
        plus the scalar ``'count'`` for ``momentum=None``.
      training: a Python bool: batch statistics (True) or running ones.
      update_running_stats: a Python bool, or None for ``training``.
      axis: the feature axis or axes.
      momentum: in [0, 1], the weight of the old running statistics; None for
        the cumulative average.
      unbiased_running_var: average ``var * n / (n - 1)`` into the state.
      epsilon: > 0, added to the variance; may be traced.
      axis_name: device axis name(s) bound by ``pmap``/``shard_map``/``vmap``;
        None under plain ``jit`` (XLA reduces over a sharded batch itself).
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      mask: optional boolean array broadcastable to ``x``: the elements that
        count towards the statistics (all are normalized).
      dtype: output dtype; default: the promotion of ``x`` and the params.
      ghost_batch_size: None, or a divisor of the local batch: normalize each
        group of that many consecutive examples with its own statistics.
      return_moments: also return the batch's :class:`jaxbn.Moments` (None
        where no batch statistics were taken), e.g. to accumulate micro-batches
        with :func:`jaxbn.merge_moments` and :func:`update_running_stats`;
        differentiable as :func:`jaxbn.moments` is (the returned running
        statistics are not).

    Returns:
      ``(y, new_state)``, or ``(y, new_state, moments)``.

    Raises:
      TypeError / ValueError: at trace time, for any argument that does not
        fit, naming it (a zero-size batch where batch statistics are taken
        included); see ``docs/errors.md``.

    >>> import jax.numpy as jnp
    >>> params, state = batch_norm_init(2)
    >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
    >>> y, state = batch_norm(x, params, state, training=True, momentum=0.9)
    >>> y.round(4)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> state['mean']
    Array([0.1, 2. ], dtype=float32)
    >>> y, same = batch_norm(x, params, state, training=False)
    >>> same is state
    True
    """
    call = check_batch_norm_args(
        "batch_norm", x, params, state, training=training, update_running_stats=update_running_stats, axis=axis,
        momentum=momentum, unbiased_running_var=unbiased_running_var, epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, mask=mask, dtype=dtype, ghost_batch_size=ghost_batch_size,
        return_moments=return_moments,
    )
    with jax.named_scope("jaxbn.batch_norm"):
        y, new_state, moments = batch_norm_from_checked(call)
    return (y, new_state, moments) if return_moments else (y, new_state)


def batch_norm_from_checked(
    call: _BatchNormCall, correction: Any = None, correction_args: tuple = ()
) -> tuple[jax.Array, dict[str, jax.Array], stats.Moments | None]:
    """:func:`batch_norm` on validated arguments: ``(y, new_state, batch moments or None)``.

    ``correction`` is a batch-statistics variant:
    ``correction(batch, running_mean, running_var, epsilon, *correction_args)``
    gives per-feature ``(r, d)``: training computes ``γ (x̂ r + d) + β`` (see
    :class:`jaxbn._train_step.StepConfig`); inference is batch norm's.
    """
    x, params, state = call.x, call.params, call.state
    running_mean, running_var = state["mean"], state["var"]
    if call.single_value:
        return _single_value(call, correction, correction_args)
    mask, axes, shift = call.mask, call.reduction_axes, running_mean
    axis_name, axis_index_groups = call.axis_name, call.axis_index_groups
    x_stats, params_stats = x, params
    if call.ghost_batch_size:
        # Ghost groups as an extra feature axis: (B, ...) -> (B/g, g, ...), statistics
        # per group and device (no cross-device reduction normalizes).
        x_stats, mask, axes, params_stats, shift = _ghost.ghost_view(
            x, mask, axes, params, shift, call.ghost_batch_size
        )
        running_mean, running_var = (jnp.broadcast_to(v, shift.shape) for v in (running_mean, running_var))
        axis_name, axis_index_groups = None, None
    config = _train_step.StepConfig(
        axes, axis_name, axis_index_groups, jnp.dtype(call.compute_dtype), jnp.dtype(call.out_dtype),
        correction if call.training else None,
    )
    inputs = _train_step.StepInputs(
        shift, jnp.asarray(call.epsilon, call.compute_dtype), mask, running_mean, running_var,
        tuple(jnp.asarray(v) for v in correction_args) if call.training else (),
    )
    batch = None
    if call.training:
        y, batch = _train_with_batch_statistics(x_stats, params_stats, config, inputs)
        y = y.reshape(x.shape)
    else:
        y = _infer(call)
        if call.update or call.want_moments:  # empty features keep their state: no fallback needed
            batch = stats.moments(
                x_stats, axes, mask=mask, axis_name=axis_name,
                axis_index_groups=axis_index_groups, dtype=call.compute_dtype, shift=shift,
            )
    if not (call.update or call.want_moments):
        return y, call.given_state, None
    if call.ghost_batch_size:
        batch = _ghost.combine_ghost_moments(batch, state["mean"], call.axis_name, call.axis_index_groups)
    if not call.update:
        return y, call.given_state, batch
    return y, _update_running_stats(state, batch, call.momentum, call.unbiased_running_var), batch


def _single_value(
    call: _BatchNormCall, correction: Any = None, correction_args: tuple = ()
) -> tuple[jax.Array, dict[str, jax.Array], stats.Moments]:
    """One value per feature: the batch mean is ``x`` itself and there is no variance.

    Training outputs ``(x - x)``-normalized values, exactly the bias, with the
    gradients flax's autodiff gives (none into ``x`` or the scale); a
    ``correction`` (batch renorm's ``(r, d)``, constants) makes it
    ``scale * d + bias``, as for any batch whose normalized values are 0. The
    running mean averages ``x`` in; the running variance is kept.
    """
    x, state = call.x, call.state
    dtype = jnp.promote_types(x.dtype, call.compute_dtype)
    mean = x.reshape(state["mean"].shape).astype(dtype)  # differentiable: d mean / dx = 1
    shift = lax.stop_gradient(mean)
    zeros = jnp.zeros(mean.shape, jnp.finfo(dtype).dtype)
    batch = stats.Moments(mean=mean, var=zeros, count=zeros + 1, shift=shift, mean_minus_shift=mean - shift)
    if call.training:
        params = call.params
        if correction is not None:  # y = scale (x_hat r + d) + bias, as _train_step folds it
            epsilon = jnp.asarray(call.epsilon, call.compute_dtype)
            constants = jax.tree_util.tree_map(lax.stop_gradient, batch)  # (r, d) carry no gradient
            r, d = correction(constants, state["mean"], state["var"], epsilon, *map(jnp.asarray, correction_args))
            if "scale" in params:
                r, d = params["scale"].astype(r.dtype) * r, params["scale"].astype(d.dtype) * d
            params = {"scale": r, "bias": d + params["bias"].astype(d.dtype) if "bias" in params else d}
        # x - x in the compute dtype: the two cotangents cancel there, not as half-precision infinities
        wide = x.astype(call.compute_dtype)
        y = _train_step.affine_normalize(
            wide, wide.reshape(mean.shape), None, jnp.zeros_like(state["var"]), params, call.reduction_axes,
            call.epsilon, call.compute_dtype, call.out_dtype,
        )
    else:
        y = _infer(call)
    if not call.update:
        return y, call.given_state, batch
    # unbiased with n = 1: the variance is kept (n / (n - 1) has no value), the mean averaged
    return y, _update_running_stats(state, batch, call.momentum, unbiased=True), batch


def _infer(call: _BatchNormCall) -> jax.Array:
    """Normalization with the running statistics."""
    return _train_step.affine_normalize(
        call.x, call.state["mean"], None, call.state["var"], call.params, call.reduction_axes, call.epsilon,
        call.compute_dtype, call.out_dtype,
    )


def _train_with_batch_statistics(
    x: jax.Array, params: Params, config: _train_step.StepConfig, inputs: _train_step.StepInputs
) -> tuple[jax.Array, stats.Moments]:
    """Training-mode normalization: the custom-JVP step, or autodiff for complex ``x``.

    The step's hand-written backward assumes real inputs; complex ones are
    differentiated by JAX through :func:`jaxbn.stats.moments` and the same
    :func:`jaxbn._train_step.affine_normalize` (correct, at autodiff's memory
    traffic).
    """
    if not jnp.iscomplexobj(x):
        return _train_step.batch_norm_train(x, params, config, inputs)
    batch = stats.moments(
        x, config.axes, mask=inputs.mask, axis_name=config.axis_name, axis_index_groups=config.axis_index_groups,
        dtype=config.compute_dtype, shift=lax.stop_gradient(inputs.shift),
    )
    batch = _train_step.fill_empty_features(batch, inputs.running_mean, inputs.running_var)
    y = _train_step.affine_normalize(
        x, batch.shift, batch.mean_minus_shift, batch.var, params, config.axes, inputs.epsilon,
        config.compute_dtype, config.out_dtype, inputs.mask,
    )
    return y, batch
