"""Pure normalization functions: ``(inputs, params, state) -> (outputs, new state)``.

No Flax here. Parameters are ``{'scale', 'bias'}`` and running statistics
``{'mean', 'var'}``: the dicts flax keeps in its ``params`` and ``batch_stats``
collections, so the Flax modules pass their variables straight through. A
cumulative running average (``momentum=None``) adds a scalar ``'count'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _ghost, _kernels, _validation, stats

__all__ = ["normalize", "batch_norm", "batch_norm_init"]

Params = Mapping[str, jax.Array]
State = Mapping[str, jax.Array]

_PARAM_KEYS = ("scale", "bias")
_STATE_KEYS = ("mean", "var")
_COUNT_KEY = "count"  # batches averaged by a cumulative running average (momentum=None)


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
      dtype: dtype of the parameters and statistics (float32, as flax).
      use_scale: include ``'scale'`` in the parameters.
      use_bias: include ``'bias'`` in the parameters.
      cumulative: add ``'count'``, a float32 scalar: the number of batches a
        cumulative average (``momentum=None``) has averaged.

    Returns:
      ``(params, state)``: ``{'scale', 'bias'}`` (those enabled) and
      ``{'mean', 'var'}`` (and ``'count'`` if cumulative).

    >>> params, state = batch_norm_init(3)
    >>> params['scale'], state['var']
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    >>> batch_norm_init(3, cumulative=True)[1]['count']
    Array(0., dtype=float32)
    """
    shape = (num_features,) if not isinstance(num_features, Sequence) else tuple(num_features)
    if not shape or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape
    ):
        raise ValueError(
            f"num_features must be a positive int or a tuple of them, got {num_features!r}."
        )
    _validation.check_dtype(dtype)
    params = {}
    if use_scale:
        params["scale"] = jnp.ones(shape, dtype)
    if use_bias:
        params["bias"] = jnp.zeros(shape, dtype)
    state = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}
    if cumulative:
        state[_COUNT_KEY] = jnp.zeros((), jnp.float32)
    return params, state


def _feature_axes(x: jax.Array, axis: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    feature_axes = _validation.canonicalize_axes(x.ndim, axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[i] for i in feature_axes)
    return feature_axes, reduction_axes, feature_shape


def _compute_dtype(x: jax.Array, dtype: Any) -> Any:
    # At least float32, and never below the input or the requested dtype.
    requested = x.dtype if dtype is None else jnp.promote_types(x.dtype, dtype)
    return jnp.promote_types(requested, jnp.float32)


def _output_dtype(x: jax.Array, params: Params, dtype: Any) -> Any:
    # flax's rule: the requested dtype, else the promotion of input and params.
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(x, *params.values())


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
    _validation.check_epsilon(epsilon)
    _validation.check_output_dtype(x.dtype, dtype)
    _, reduction_axes, feature_shape = _feature_axes(x, axis)
    params = _validation.check_feature_arrays(
        {"scale": scale, "bias": bias}, _PARAM_KEYS, (), feature_shape, "params"
    )
    _validation.check_feature_arrays({"mean": mean, "var": var}, _STATE_KEYS, _STATE_KEYS, feature_shape, "state")
    return _kernels.affine_normalize(
        x, mean, None, var, params, reduction_axes, epsilon, _compute_dtype(x, dtype), _output_dtype(x, params, dtype)
    )


def _update_running_stats(
    state: State, batch: stats.Moments, momentum: Any, unbiased: bool
) -> dict[str, jax.Array]:
    """Averages ``batch`` into ``state``, guarded; the one place running stats change.

    Exponential (``momentum * old + (1 - momentum) * batch``) or, for
    ``momentum=None``, cumulative (``old + (batch - old) / (count + 1)``, and
    ``count + 1``). With ``unbiased`` the variance averaged is
    ``var * n / (n - 1)``, ``n`` the global count. Channels without a valid
    element (and, if unbiased, with only one) keep their old statistics; when
    any valid channel's batch statistics are not finite the whole state is kept
    and ``count`` does not advance (the decision depends only on globally
    reduced values, so every device takes it alike). Running statistics are not
    differentiated. For complex input the mean is complex (a real ``state['mean']``
    is promoted to the complex dtype of its precision) and the variance real.
    """
    mean, var, n = (lax.stop_gradient(v) for v in (batch.mean, batch.var, batch.count))
    has_data = n > 0
    all_finite = jnp.all(jnp.where(has_data, jnp.isfinite(mean) & jnp.isfinite(var), True))
    update = has_data & all_finite
    update_var = update
    if unbiased:
        var = var * n / jnp.maximum(n - 1, 1)
        update_var = update & (n > 1)
    new_state = {}
    for key, value, keep in (("mean", mean, update), ("var", var, update_var)):
        old = state[key]
        previous = old.astype(value.dtype)
        if momentum is None:
            averaged = previous + (value - previous) / (state[_COUNT_KEY].astype(value.dtype) + 1)
        else:
            averaged = momentum * previous + (1 - momentum) * value
        # Keep the state's dtype so it stays a stable jit/scan carry; a real
        # running mean becomes complex (same precision) for complex input, as in flax.
        target = jnp.result_type(old.dtype, jnp.complex64) if jnp.iscomplexobj(value) else old.dtype
        new_state[key] = jnp.where(keep, averaged, old).astype(target)
    if momentum is None:
        count = state[_COUNT_KEY]
        new_state[_COUNT_KEY] = jnp.where(jnp.any(update), count + 1, count).astype(count.dtype)
    return new_state


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


def _check_batch_norm_args(
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
    complex_ok: bool = False,
) -> tuple:
    """Validates :func:`batch_norm`'s arguments (shared with :func:`batch_renorm`).

    Returns ``(x, params, checked_state, mask, reduction_axes, update,
    compute_dtype, out_dtype)``; ``function`` names the caller in errors;
    ``complex_ok`` lets complex ``x`` (and a complex ``dtype``) through.
    """
    _validation.check_static_bool(training, "training")
    _validation.check_static_bool(update_running_stats, "update_running_stats", none_ok=True)
    _validation.check_static_bool(unbiased_running_var, "unbiased_running_var")
    update = training if update_running_stats is None else update_running_stats
    x = _validation.check_inexact(x) if complex_ok else _validation.check_floating(x)
    _validation.check_epsilon(epsilon)
    _validation.check_output_dtype(x.dtype, dtype)
    _, reduction_axes, feature_shape = _feature_axes(x, axis)
    params = _validation.check_feature_arrays(params, _PARAM_KEYS, (), feature_shape, "params")
    checked_state = _validation.check_feature_arrays(
        state, _STATE_KEYS, _STATE_KEYS, feature_shape, "state", scalars=(_COUNT_KEY,)
    )
    if momentum is not None:
        _validation.check_momentum(momentum)
    if update:
        _check_cumulative_state(checked_state, momentum)
    out_dtype = _output_dtype(x, params, dtype)
    compute_dtype = _compute_dtype(x, dtype)

    if (training or update) and mask is None:
        global_count = math.prod(x.shape[i] for i in reduction_axes) * stats.axis_size(
            axis_name, axis_index_groups
        )
        if global_count == 1:
            raise ValueError(
                f"{function} with batch statistics (training or update_running_stats) needs "
                f"more than one value per feature, but an input of shape {x.shape} with "
                f"axis={axis!r} has exactly one (across all devices): its variance is 0 (in "
                "training the output is all bias). Use a larger batch, training=False, or "
                "layer/group norm."
            )
    if mask is not None and (training or update):
        mask = _validation.check_mask(mask, x.shape)
    return x, params, checked_state, mask, reduction_axes, update, compute_dtype, out_dtype


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Batch normalization with explicit running statistics.

    Training (``training=True``) normalizes with the statistics of the batch,
    reduced over every axis but ``axis`` and, with ``axis_name``, over devices
    (count-weighted, one collective; see :func:`jaxbn.stats.moments`):

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta,
        \qquad
        \text{state}' = m \cdot \text{state} + (1 - m) \cdot (\mu_B, \sigma_B^2)

    with flax's momentum convention (``m = 0.99`` averages over ~100 steps;
    PyTorch's ``momentum`` is ``1 - m``) and the biased batch variance, as flax.
    The running mean is the shift of the statistics, so in the steady state the
    variance is exact at any offset with a single all-reduce.

    Inference (``training=False``) normalizes with ``state`` and returns it
    unchanged.

    **Which statistics, and whether to update.** ``training`` chooses the
    statistics that normalize; ``update_running_stats`` (default: the same as
    ``training``) whether the batch statistics are averaged into the state:

    ========  ====================  ===========  =====================================
    training  update_running_stats  normalizes   state returned
    ========  ====================  ===========  =====================================
    True      None / True           batch stats  updated (training)
    True      False                 batch stats  ``state`` itself (a train-mode eval)
    False     None / False          running      ``state`` itself (inference, frozen)
    False     True                  running      updated from the batch statistics
                                                 (precise-BN-style re-estimation)
    ========  ====================  ===========  =====================================

    The last row computes the batch statistics with :func:`jaxbn.stats.moments`
    (same ``mask``, ``axis_name``, shifted by the running mean) only to update.

    **Cumulative average** (``momentum=None``, PyTorch's ``momentum=None``):
    the running statistics are the exact mean of all batch statistics seen,

    .. math::
        \text{state}' = \text{state} + \frac{(\mu_B, \sigma_B^2) - \text{state}}{c + 1},
        \qquad c' = c + 1,

    with ``c = state['count']`` (a float32 scalar, exact to 2**24 batches);
    create such a state with ``batch_norm_init(..., cumulative=True)``. A
    ``'count'`` with a float momentum is an error (it would go stale); in
    inference it is simply returned. A channel without valid elements in a batch
    keeps its statistics although ``count`` advances, so with masks that empty
    some channels but not others their average weights later batches slightly
    more.

    **Unbiased running variance** (``unbiased_running_var=True``, PyTorch's
    convention): the variance averaged into the state is
    :math:`\sigma_B^2 \, n / (n - 1)`, with ``n`` the count of valid elements
    across all devices; normalization still uses the biased :math:`\sigma_B^2`.
    A channel with ``n == 1`` (possible only with a mask) keeps its running
    variance; its mean is updated.

    The training step is a ``jax.custom_vjp`` near the memory-traffic floor: it
    saves only ``x`` (in its own dtype) and per-feature vectors, and its
    backward makes one pass for ``Σdy``, ``Σdy·x̂`` (one cross-device sum) and
    one for ``dx``. It is differentiable in reverse mode to any order
    (``jax.grad``, ``jax.vjp``, ``jax.jacrev``); forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.hessian``) raises, as for every custom VJP. The
    running statistics it returns carry no gradient.

    The running statistics are never poisoned: if the batch statistics of any
    channel are not finite (a NaN or Inf in the batch), the state (``count``
    included) is returned unchanged; channels with no valid element (fully
    masked) keep theirs. The output is whatever the input deserves (non-finite
    for a non-finite batch).

    **Ghost batch norm** (``ghost_batch_size=g``; Hoffer et al., 2017, "Train
    longer, generalize better"; TensorFlow's ``virtual_batch_size``): axis 0
    (the batch; it must not be a feature axis) is split into ``B / g`` groups
    of ``g`` consecutive examples, and each group is normalized with its own
    statistics. ``g`` must divide the batch size on the device. Groups never
    span devices: with or without ``axis_name`` the statistics that normalize
    are local, so normalization and its backward need no collective, under
    ``pmap``/``shard_map`` and under ``jit`` with the batch sharded in
    multiples of ``g`` (the honest way to get per-device statistics there).
    For that, each group's statistics take two passes over ``x`` (mean, then
    centered sums; :func:`jaxbn.stats.moments` with ``reshift=True``) rather
    than a re-shift decision shared by all groups: one more read of ``x``
    than batch norm. The running statistics average the groups' statistics,
    weighted by their counts of valid elements (``mean = Σ n_k μ_k / Σ n_k``,
    ``var = Σ n_k σ²_k / Σ n_k``; without a mask, the plain average of the
    ghost means and of the ghost variances, as TensorFlow); ``axis_name``
    extends that average over the groups of all devices (one small
    collective), so a replicated state stays identical on every device.
    ``unbiased_running_var`` uses ``n = Σ n_k``. A non-finite value in any
    group leaves the whole state unchanged (as a non-finite batch does); a
    group without valid elements in a channel has weight 0 there. Inference
    ignores ``g``. ``g`` equal to the batch size (one group) is plain batch
    norm, bit for bit.

    **Complex input** (complex64/complex128): the mean is complex, the
    variance the real ``E[|x - μ|^2]``, and ``y = (x - μ) / sqrt(var + ε) · γ
    + β`` (flax's convention). The running mean becomes complex (a real
    ``state['mean']`` is promoted, keeping its precision), the running
    variance stays real. Training differentiates complex input with JAX's
    autodiff (through :func:`jaxbn.stats.moments`), not the custom VJP, which
    assumes real inputs.

    Args:
      x: floating input, e.g. NHWC (``axis=-1``) or NCHW (``axis=1``).
      params: ``{'scale': γ, 'bias': β}``, each optional, of the feature shape;
        ``None`` or ``{}`` for neither.
      state: ``{'mean', 'var'}`` of the feature shape (flax's ``batch_stats``),
        plus the scalar ``'count'`` for ``momentum=None``.
      training: a Python bool: normalize with batch statistics (and, by
        default, update the state), or with the running statistics.
      update_running_stats: a Python bool, or None for ``training``: whether
        the returned state averages in the batch statistics (see the table).
      axis: the feature axis or axes.
      momentum: in [0, 1], the weight of the old running statistics; or None
        for the cumulative average.
      unbiased_running_var: average ``var * n / (n - 1)`` into the state.
      epsilon: > 0, added to the variance.
      axis_name: device axis name(s) bound by ``pmap``/``shard_map``/``vmap``
        to synchronize statistics over; None under plain ``jit`` with a sharded
        batch (XLA reduces over the global batch itself).
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only; inside
        ``shard_map`` factor the mesh axis and name the sub-axis instead).
      mask: optional boolean array broadcastable to ``x``: elements that count
        towards the statistics (all elements are normalized).
      dtype: output dtype; default: the promotion of ``x`` and the params
        (complex for complex ``x``; a real dtype is then an error).
      ghost_batch_size: None, or a positive int dividing the (local) batch
        size: normalize each group of that many consecutive examples along
        axis 0 with its own statistics (ghost batch norm, see above).

    Returns:
      ``(y, new_state)``.

    >>> import jax, jax.numpy as jnp
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
    >>> _, cumulative = batch_norm_init(2, cumulative=True)
    >>> for batch in (x, x + 2.0):
    ...     _, cumulative = batch_norm(batch, params, cumulative, training=True,
    ...                                momentum=None, unbiased_running_var=True)
    >>> cumulative['mean'], cumulative['var'], cumulative['count']
    (Array([ 2., 21.], dtype=float32), Array([  2., 200.], dtype=float32), Array(2., dtype=float32))
    >>> y, same = batch_norm(x, params, state, training=True, update_running_stats=False)
    >>> same is state
    True
    >>> ghosts = jnp.array([[0.0], [2.0], [10.0], [14.0]])  # two ghost batches of 2
    >>> y, ghost_state = batch_norm(ghosts, {}, batch_norm_init(1)[1], training=True,
    ...                             ghost_batch_size=2, momentum=0.0, epsilon=1e-12)
    >>> y.ravel(), ghost_state['mean'], ghost_state['var']  # var: mean of 1 and 4
    (Array([-1.,  1., -1.,  1.], dtype=float32), Array([6.5], dtype=float32), Array([2.5], dtype=float32))
    >>> z = jnp.array([[1 + 1j], [-1 - 1j]])
    >>> y, complex_state = batch_norm(z, {}, batch_norm_init(1)[1], training=True,
    ...                               momentum=0.0, epsilon=1e-12)
    >>> y.ravel()  # (z - 0) / sqrt(E|z|^2), E|z|^2 = 2
    Array([ 0.70710677+0.70710677j, -0.70710677-0.70710677j], dtype=complex64)
    >>> complex_state['mean'].dtype, complex_state['var']
    (dtype('complex64'), Array([2.], dtype=float32))
    """
    return _batch_norm(
        "batch_norm", x, params, state, training=training, update_running_stats=update_running_stats, axis=axis,
        momentum=momentum, unbiased_running_var=unbiased_running_var, epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, mask=mask, dtype=dtype, ghost_batch_size=ghost_batch_size,
    )


def _batch_norm(
    function: str,
    x: Any,
    params: Any,
    state: Any,
    *,
    ghost_batch_size: Any,
    renorm_limits: tuple[Any, Any] | None = None,
    **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`batch_norm`, and with ``renorm_limits = (r_max, d_max)`` :func:`jaxbn.batch_renorm`.

    ``function`` names the caller in error messages; ``options`` are
    :func:`batch_norm`'s other keywords, validated by
    :func:`_check_batch_norm_args`. Renormalization applies in training only
    (inference is batch norm's) and to real inputs.
    """
    training, epsilon = options["training"], options["epsilon"]
    axis_name, axis_index_groups = options["axis_name"], options["axis_index_groups"]
    renorm = training and renorm_limits is not None
    x, params, checked_state, mask, reduction_axes, update, compute_dtype, out_dtype = _check_batch_norm_args(
        function, x, params, state, complex_ok=not renorm, **options
    )
    running_mean, running_var = checked_state["mean"], checked_state["var"]
    shift = running_mean
    if x.size >= stats.SKIP_ZERO_SHIFT_MIN_SIZE:  # where the statistics skip a zero shift's pass
        shift = _statistics_shift(running_mean, running_var)
    ghost = _ghost.check_ghost_batch_size(ghost_batch_size, x, reduction_axes, mask, training or update)
    if ghost:
        # Ghost groups as an extra feature axis: (B, ...) -> (B/g, g, ...), statistics
        # per group and device (no cross-device reduction normalizes).
        x_ghost, mask, stats_axes, params_ghost, shift = _ghost.ghost_view(x, mask, reduction_axes, params, shift, ghost)
        running_mean, running_var = (jnp.broadcast_to(v, shift.shape) for v in (running_mean, running_var))
        stats_axis_name, stats_axis_index_groups = None, None
        # Several groups: two passes, so that no re-shift decision spans groups
        # (under jit with the batch sharded it would span devices: a collective).
        reshift = True if x_ghost.shape[0] > 1 else None
    else:
        x_ghost, stats_axes, params_ghost = x, reduction_axes, params
        stats_axis_name, stats_axis_index_groups = axis_name, axis_index_groups
        reshift = None
    if training:
        y, batch = _train_with_batch_statistics(
            x_ghost, params_ghost, shift, mask, reduction_axes=stats_axes, epsilon=epsilon,
            axis_name=stats_axis_name, axis_index_groups=stats_axis_index_groups,
            compute_dtype=compute_dtype, out_dtype=out_dtype, reshift=reshift,
            renorm=(running_mean, running_var, *renorm_limits) if renorm else None,
        )
        if ghost:
            y = y.reshape(x.shape)
    else:
        y = _kernels.affine_normalize(
            x, checked_state["mean"], None, checked_state["var"], params, reduction_axes, epsilon,
            compute_dtype, out_dtype,
        )
        if update:
            batch = stats.moments(
                lax.stop_gradient(x_ghost), stats_axes, mask=mask, axis_name=stats_axis_name,
                axis_index_groups=stats_axis_index_groups, dtype=compute_dtype,
                shift=lax.stop_gradient(shift), reshift=reshift,
            )
    if not update:
        return y, state
    if ghost:
        batch = _ghost.combine_ghost_moments(batch, checked_state["mean"], axis_name, axis_index_groups)
    return y, _update_running_stats(checked_state, batch, options["momentum"], options["unbiased_running_var"])


def _statistics_shift(running_mean: jax.Array, running_var: jax.Array) -> jax.Array:
    """The shift ``K`` of the batch sums: the running mean, or exactly 0 where 0 is as good.

    Sums around ``K`` amplify rounding by ``E[(x - K)^2] / var``, and
    :func:`jaxbn.stats.moments` re-shifts where that exceeds 8. Around 0 it is
    ``1 + mean^2 / var``: at most 4 when the running statistics show
    ``mean^2 <= 3 var`` in every feature (typical activations; and the initial
    state), and then 0 is taken, since sums of ``x`` itself skip a subtraction
    pass (:func:`jaxbn.stats.sums_around_shift`). Far from 0 the running mean
    keeps the variance exact at any offset.
    """
    near_zero = jnp.all(jnp.square(jnp.abs(running_mean)) <= 3 * running_var)
    return jnp.where(near_zero, jnp.zeros_like(running_mean), running_mean)


def _train_with_batch_statistics(
    x: jax.Array, params: Params, shift: jax.Array, mask: jax.Array | None, *, reduction_axes: tuple[int, ...],
    epsilon: float, axis_name: Any, axis_index_groups: Any, compute_dtype: Any, out_dtype: Any,
    reshift: bool | None = None, renorm: tuple | None = None,
) -> tuple[jax.Array, stats.Moments]:
    """Training-mode normalization: the custom-VJP kernel, or autodiff for complex ``x``.

    The kernel's hand-written backward assumes real inputs; complex ones are
    differentiated by JAX through :func:`jaxbn.stats.moments` and the same
    :func:`jaxbn._kernels.affine_normalize` (correct, at autodiff's memory
    traffic). The statistics returned carry no gradient.
    """
    if not jnp.iscomplexobj(x):
        return _kernels.batch_norm_train(
            x, params, shift, mask, reduction_axes=reduction_axes, epsilon=epsilon, axis_name=axis_name,
            axis_index_groups=axis_index_groups, compute_dtype=compute_dtype, out_dtype=out_dtype,
            renorm=renorm, reshift=reshift,
        )
    batch = stats.moments(
        x, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
        dtype=compute_dtype, shift=lax.stop_gradient(shift), reshift=reshift,
    )
    y = _kernels.affine_normalize(
        x, batch.shift, batch.mean_minus_shift, batch.var, params, reduction_axes, epsilon, compute_dtype, out_dtype
    )
    return y, jax.tree_util.tree_map(lax.stop_gradient, batch)
