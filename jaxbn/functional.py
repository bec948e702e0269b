"""Pure normalization functions: ``(inputs, params, state) -> (outputs, new state)``.

No Flax here. Parameters are ``{'scale', 'bias'}`` and running statistics
``{'mean', 'var'}``: the dicts flax keeps in its ``params`` and ``batch_stats``
collections, so the Flax modules pass their variables straight through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _kernels, _validation, stats

__all__ = ["normalize", "batch_norm", "batch_norm_init"]

Params = Mapping[str, jax.Array]
State = Mapping[str, jax.Array]

_PARAM_KEYS = ("scale", "bias")
_STATE_KEYS = ("mean", "var")


def batch_norm_init(
    num_features: int | Sequence[int],
    *,
    dtype: Any = jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Creates batch-norm parameters and running statistics, as flax initializes them.

    ``scale = 1``, ``bias = 0``, running ``mean = 0`` and ``var = 1``.

    Args:
      num_features: the size of the feature axis (or a tuple of sizes when
        normalizing over several feature axes).
      dtype: dtype of the parameters and statistics (float32, as flax).
      use_scale: include ``'scale'`` in the parameters.
      use_bias: include ``'bias'`` in the parameters.

    Returns:
      ``(params, state)``: ``{'scale', 'bias'}`` (those enabled) and
      ``{'mean', 'var'}``.

    >>> params, state = batch_norm_init(3)
    >>> params['scale'], state['var']
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
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
      x: floating input.
      mean, var: per-feature statistics (shape: ``x``'s sizes along ``axis``).
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
    """
    x = _validation.check_floating(x)
    _validation.check_epsilon(epsilon)
    _validation.check_dtype(dtype)
    _, reduction_axes, feature_shape = _feature_axes(x, axis)
    params = _validation.check_feature_arrays(
        {"scale": scale, "bias": bias}, _PARAM_KEYS, (), feature_shape, "params"
    )
    _validation.check_feature_arrays({"mean": mean, "var": var}, _STATE_KEYS, _STATE_KEYS, feature_shape, "state")
    return _kernels.affine_normalize(
        x, mean, None, var, params, reduction_axes, epsilon, _compute_dtype(x, dtype), _output_dtype(x, params, dtype)
    )


def _update_running_stats(state: State, batch: stats.Moments, momentum: Any) -> dict[str, jax.Array]:
    """Exponential average ``momentum * old + (1 - momentum) * batch``, guarded.

    Channels without a valid element keep their old statistics; when any valid
    channel's batch statistics are not finite the whole state is kept (the
    decision depends only on globally reduced values, so every device takes it
    alike). Running statistics are not differentiated.
    """
    mean, var = lax.stop_gradient(batch.mean), lax.stop_gradient(batch.var)
    has_data = batch.count > 0
    all_finite = jnp.all(jnp.where(has_data, jnp.isfinite(mean) & jnp.isfinite(var), True))
    update = has_data & all_finite
    new_state = {}
    for key, value in (("mean", mean), ("var", var)):
        old = state[key]
        averaged = momentum * old.astype(value.dtype) + (1 - momentum) * value
        # Keep the state's dtype so it stays a stable jit/scan carry.
        new_state[key] = jnp.where(update, averaged, old).astype(old.dtype)
    return new_state


def batch_norm(
    x: jax.Array,
    params: Params | None,
    state: State,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    dtype: Any = None,
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

    The training step is a ``jax.custom_vjp`` near the memory-traffic floor: it
    saves only ``x`` (in its own dtype) and per-feature vectors, and its
    backward makes one pass for ``Σdy``, ``Σdy·x̂`` (one cross-device sum) and
    one for ``dx``. It is differentiable in reverse mode to any order
    (``jax.grad``, ``jax.vjp``, ``jax.jacrev``); forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.hessian``) raises, as for every custom VJP. The
    running statistics it returns carry no gradient.

    The running statistics are never poisoned: if the batch statistics of any
    channel are not finite (a NaN or Inf in the batch), the state is returned
    unchanged; channels with no valid element (fully masked) keep theirs. The
    output is whatever the input deserves (non-finite for a non-finite batch).

    Args:
      x: floating input, e.g. NHWC (``axis=-1``) or NCHW (``axis=1``).
      params: ``{'scale': γ, 'bias': β}``, each optional, of the feature shape;
        ``None`` or ``{}`` for neither.
      state: ``{'mean', 'var'}`` of the feature shape (flax's ``batch_stats``).
      training: a Python bool: batch statistics and an updated state, or the
        running statistics.
      axis: the feature axis or axes.
      momentum: in [0, 1]; weight of the old running statistics.
      epsilon: > 0, added to the variance.
      axis_name: device axis name(s) bound by ``pmap``/``shard_map``/``vmap``
        to synchronize statistics over; None under plain ``jit`` with a sharded
        batch (XLA reduces over the global batch itself).
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      mask: optional boolean array broadcastable to ``x``: elements that count
        towards the statistics (all elements are normalized).
      dtype: output dtype; default: the promotion of ``x`` and the params.

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
    """
    if not isinstance(training, bool):
        raise TypeError(
            f"training must be a Python bool, got {training!r}. It selects the code "
            "path at trace time; to switch inside jit, use lax.cond over two calls."
        )
    x = _validation.check_floating(x)
    _validation.check_epsilon(epsilon)
    _validation.check_momentum(momentum)
    _validation.check_dtype(dtype)
    _, reduction_axes, feature_shape = _feature_axes(x, axis)
    params = _validation.check_feature_arrays(params, _PARAM_KEYS, (), feature_shape, "params")
    checked_state = _validation.check_feature_arrays(state, _STATE_KEYS, _STATE_KEYS, feature_shape, "state")
    out_dtype = _output_dtype(x, params, dtype)
    compute_dtype = _compute_dtype(x, dtype)

    if not training:
        y = _kernels.affine_normalize(
            x, checked_state["mean"], None, checked_state["var"], params, reduction_axes, epsilon,
            compute_dtype, out_dtype,
        )
        return y, state

    if mask is None:
        global_count = math.prod(x.shape[i] for i in reduction_axes) * stats.axis_size(
            axis_name, axis_index_groups
        )
        if global_count == 1:
            raise ValueError(
                f"batch_norm in training needs more than one value per feature, but "
                f"an input of shape {x.shape} with axis={axis!r} has exactly one "
                "(across all devices): its variance is 0 and its output is all "
                "bias. Use a larger batch, training=False, or layer/group norm."
            )
    y, batch = _kernels.batch_norm_train(
        x,
        params,
        checked_state["mean"],
        mask if mask is None else _validation.check_mask(mask, x.shape),
        reduction_axes=reduction_axes,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
    )
    return y, _update_running_stats(checked_state, batch, momentum)
