"""Batch norm as pure functions ``(inputs, params, state) -> (outputs, new state)`` of flax's
``params`` and ``batch_stats`` dicts; ``docs/internals.md`` follows a training call."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _train_step, _validation, stats

__all__ = ["batch_norm", "batch_norm_init", "normalize", "update_running_stats"]

Params = Mapping[str, jax.Array]
State = Mapping[str, jax.Array]


def batch_norm_init(
    num_features: int | Sequence[int],
    *,
    dtype: Any = jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
    cumulative: bool = False,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(params, state)``: batch-norm parameters (``scale = 1``, ``bias = 0``) and running
    statistics (``mean = 0``, ``var = 1``, and ``count = 0`` if ``cumulative``), as flax's.

    Args:
      num_features: the size of the feature axis (or a tuple of sizes).
      dtype: float32 by default; a complex one makes the running mean complex (only).
      use_scale: include ``'scale'`` in the parameters.
      use_bias: include ``'bias'`` in the parameters.
      cumulative: add ``'count'``, the state of ``batch_norm(..., momentum=None)``.

    Raises:
      TypeError: a ``num_features`` or ``dtype`` of the wrong type.
      ValueError: a ``num_features`` that is not positive.

    >>> params, state = batch_norm_init(3)
    >>> params['scale'], state['var']
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    shape = _validation.check_init(num_features, dtype)
    real_dtype = jnp.finfo(dtype).dtype  # of the variance and the parameters: float32 for complex64
    params = {"scale": jnp.ones(shape, real_dtype)} if use_scale else {}
    if use_bias:
        params["bias"] = jnp.zeros(shape, real_dtype)
    state = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, real_dtype)}
    if cumulative:
        state["count"] = jnp.zeros((), jnp.float32)
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
    """Normalizes ``x`` with given statistics: ``(x - mean) / sqrt(var + epsilon) * scale + bias``
    per feature (along ``axis``), in at least float32, in one pass.

    Args:
      x: floating or complex input.
      mean: per-feature means (complex for complex ``x``).
      var: per-feature variances, real.
      scale: optional per-feature scale.
      bias: optional per-feature bias.
      axis: the feature axis or axes (``-1`` for NHWC, ``1`` for NCHW).
      epsilon: added to the variance, > 0.
      dtype: output dtype; default: the promotion of ``x``, ``scale`` and ``bias`` (flax's rule).

    Raises:
      TypeError: an argument of the wrong type or dtype (``docs/errors.md`` lists them).
      ValueError: an argument of the wrong value or shape.

    >>> import jax.numpy as jnp
    >>> normalize(jnp.array([[1.0, 10.0], [3.0, 30.0]]), jnp.array([2.0, 20.0]),
    ...           jnp.array([1.0, 100.0]), epsilon=1e-12)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    """
    x, mean, var, params, axes, compute, out = _validation.check_normalize(
        x, mean, var, scale, bias, axis, epsilon, dtype
    )
    with jax.named_scope("jaxbn.normalize"):
        return _train_step.affine_normalize(x, mean, var, params, axes, epsilon, compute, out)


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
) -> tuple[jax.Array, dict[str, jax.Array]] | tuple[jax.Array, dict, stats.Moments | None]:
    r"""Batch normalization with explicit running statistics: ``(y, new_state)``, and with
    ``return_moments`` the batch's :class:`jaxbn.Moments` (or None) too.

    Training normalizes with the batch's statistics (over every axis but ``axis``, and every
    device of ``axis_name``) and averages them into the state; inference uses ``state``:
    :math:`y = (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} \cdot \gamma + \beta` and
    :math:`\text{state}' = m \cdot \text{state} + (1 - m) \cdot (\mu_B, \sigma_B^2)`, with
    flax's momentum convention (PyTorch's is ``1 - m``). A non-finite batch leaves the state
    unchanged; ``docs/internals.md`` describes the other edge cases and the derivative, and
    ``docs/options.md`` the options flax does not have.

    Args:
      x: floating or complex input, e.g. NHWC (``axis=-1``) or NCHW (``axis=1``).
      params: ``{'scale', 'bias'}``, each optional, of the feature shape (or None).
      state: ``{'mean', 'var'}`` of the feature shape (and ``'count'`` for ``momentum=None``).
      training: a Python bool: batch statistics (True) or running ones.
      update_running_stats: a Python bool, or None for ``training``.
      axis: the feature axis or axes.
      momentum: in [0, 1], the old statistics' weight; None: the cumulative average.
      unbiased_running_var: average ``var * n / (n - 1)`` into the state.
      epsilon: > 0, added to the variance; may be traced.
      axis_name: device axis name(s) (``docs/multi_device.md``); None under ``jit``.
      axis_index_groups: optional subgroups of ``axis_name`` (pmap only).
      mask: optional boolean array broadcastable to ``x``: the elements the statistics count.
      dtype: output dtype; default: the promotion of ``x`` and the params.
      ghost_batch_size: None, or a divisor of the local batch: statistics per group of examples.
      return_moments: a Python bool: also return the batch's moments.

    Raises:
      TypeError: at trace time, an argument of the wrong type or dtype (``docs/errors.md``).
      ValueError: at trace time, an argument of the wrong value or shape, or a zero-size batch
        where statistics are taken.

    >>> import jax.numpy as jnp
    >>> params, state = batch_norm_init(2)
    >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
    >>> y, state = batch_norm(x, params, state, training=True, momentum=0.9)
    >>> y.round(4)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> state['mean']
    Array([0.1, 2. ], dtype=float32)
    """
    call = _validation.check_batch_norm("batch_norm", **locals())  # (the arguments, by name)
    with jax.named_scope("jaxbn.batch_norm"):
        return apply_checked(call)


def apply_checked(call: _validation.BatchNormCall) -> tuple:
    """:func:`batch_norm` (or batch_renorm) of checked arguments: ``(y, new_state[, moments])``."""
    x, params, state, epsilon, plan = call.x, call.params, call.state, call.epsilon, call.plan
    dtype, out, running, batch = plan.dtype, plan.out_dtype, (state["mean"], state["var"]), None
    update, want_moments = call.update_running_stats, call.return_moments
    if not call.training:  # normalized with the running statistics
        y = _train_step.affine_normalize(x, *running, params, plan.axes, epsilon, dtype, out)
    if call.single_value:
        y, batch = _single_value(call, None if call.training else y)
    elif call.training or update or want_moments:  # batch statistics
        x_stats, params_stats, mask, shift = x, params, call.mask, state["mean"]
        y_sharding = None  # (the output's, where a ghost view of x has its own)
        if ghost := call.ghost_batch_size:  # statistics per ghost batch (a feature axis), device
            groups, y_sharding = x.shape[0] // ghost, stats.explicit_sharding(x)
            split = _ghost_sharding(x, groups, ghost)  # (with sharding in types: where they lie)
            x_stats = jnp.reshape(x, (groups, ghost) + x.shape[1:], out_sharding=split)
            if mask is not None:  # (B/g, g, ...) as x, or (1, 1, ...)
                mask = jnp.reshape(mask, (1,) * (x_stats.ndim - 1 - mask.ndim) + mask.shape)
                lead = (groups, ghost) if mask.shape[0] != 1 else (1, 1)
                split = _ghost_sharding(mask, *lead)
                mask = jnp.reshape(mask, lead + mask.shape[1:], out_sharding=split)
            axes = (1,) + tuple(i + 1 for i in plan.axes if i != 0)
            params_stats = {k: _broadcast_to_groups(v, groups) for k, v in params.items()}
            shift = jnp.broadcast_to(shift, (groups,) + shift.shape)
            mean, var = (jnp.broadcast_to(v, shift.shape) for v in running)
            running = mean, var
            plan = plan._replace(axes=axes, axis_name=None, axis_index_groups=None)
        if not call.training:  # (empty features keep their state: no fallback needed)
            batch = stats.batch_moments(plan, x_stats, mask, jnp.asarray(shift, dtype))
        elif not jnp.iscomplexobj(x):  # the custom-JVP step
            limits = () if plan.correction is None else (call.r_max, call.d_max)
            args = tuple(map(jnp.asarray, limits))
            inputs = (shift, jnp.asarray(epsilon, dtype), mask, *running, args)
            y, batch = _train_step.batch_norm_train(x_stats, params_stats, plan, inputs)
            y = y.reshape(x.shape, out_sharding=y_sharding)
        else:  # complex: JAX's autodiff through the statistics and the normalization
            shift = jnp.asarray(lax.stop_gradient(shift), dtype)
            batch = stats.batch_moments(plan, x_stats, mask, shift)
            batch = _train_step.fill_empty_features(batch, *running)
            epsilon = jnp.asarray(epsilon, dtype)
            rest = (params_stats, plan.axes, epsilon, dtype, out, mask, batch.mean_minus_shift)
            y = _train_step.affine_normalize(x_stats, batch.shift, batch.var, *rest)
            y = y.reshape(x.shape, out_sharding=y_sharding)
    new_state = call.given_state
    if call.ghost_batch_size and (update or want_moments):
        batch = _combine_ghost_moments(batch, state["mean"], call.plan)
    if update:  # (one value per feature: unbiased, so that the variance is kept)
        unbiased = call.unbiased_running_var or call.single_value
        new_state = _average(state, batch, call.momentum, unbiased)
    return (y, new_state, batch) if want_moments else (y, new_state)


def _single_value(call: _validation.BatchNormCall, y: jax.Array | None) -> tuple:
    """One value per feature: the mean is ``x``, the variance 0. Training outputs ``(x - x)``
    normalized, exactly the bias, with flax's gradients: none into ``x`` or the scale."""
    x, state, params, plan, dtype = call.x, call.state, call.params, call.plan, call.plan.dtype
    mean = x.reshape(state["mean"].shape).astype(jnp.promote_types(x.dtype, dtype))  # d mean/dx = 1
    shift, zeros = lax.stop_gradient(mean), jnp.zeros(mean.shape, jnp.finfo(mean.dtype).dtype)
    batch = stats.Moments(mean, zeros, zeros + 1, shift, mean - shift)
    if y is not None:
        return y, batch
    if plan.correction is not None:  # y = scale (x_hat r + d) + bias, as the step folds it
        constants = jax.tree_util.tree_map(lax.stop_gradient, batch)  # (r, d) carry no gradient
        running = (state["mean"], state["var"], jnp.asarray(call.epsilon, dtype))
        limits = map(jnp.asarray, (call.r_max, call.d_max))
        r, d = plan.correction(constants, *running, *limits)
        affine = _train_step.corrected_affine(
            r, d, params.get("scale"), params.get("bias"), r.dtype
        )
        params = dict(zip(("scale", "bias"), affine))
    wide = x.astype(dtype)  # x - x in the compute dtype: the two cotangents cancel there
    centre, var = wide.reshape(mean.shape), jnp.zeros_like(state["var"])
    args = (params, plan.axes, call.epsilon, dtype, plan.out_dtype)
    return _train_step.affine_normalize(wide, centre, var, *args), batch


def _averaged_into(state: State, batch: stats.Moments, momentum: Any, unbiased: bool) -> dict:
    """Averages ``batch`` into ``state``, the one place running statistics change: features without
    a valid element (unbiased: with one) keep theirs; a non-finite batch statistic keeps the whole
    state (and ``count``/``steps``); a non-finite old statistic is replaced. Dtypes are kept."""
    mean, var, n = (lax.stop_gradient(v) for v in (batch.mean, batch.var, batch.count))
    # explicitly sharded (stats.explicit_sharding's test, inline: a call is a function more on the
    # traced path): the statistics take the state's sharding (a select takes one)
    if any(getattr(getattr(jax.typeof(mean), "sharding", None), "spec", None) or ()):
        target = getattr(jax.typeof(state["mean"]), "sharding", None)
        mean, var, n = (stats.sharded_as(v, target) for v in (mean, var, n))
    has_data = n > 0
    # whether every statistic is finite: a variadic reduction, one kernel (XLA:CPU splits a plain
    # reduction of more than 32 values into two, besides the one that makes its operand)
    finite = (~has_data | jnp.isfinite(mean), ~has_data | jnp.isfinite(var))
    axes = tuple(range(jnp.ndim(mean)))
    all_finite = lax.reduce(finite, (np.True_, np.True_), _both, axes)
    update = has_data & all_finite[0] & all_finite[1]
    update_var = update
    if unbiased:
        var = var * n / jnp.maximum(n - 1, 1)
        update_var = update & (n > 1)
    new_state = dict(state)
    for key, value, keep in (("mean", mean, update), ("var", var, update_var)):
        old = state[key]
        previous = old.astype(value.dtype)
        if momentum is None:
            averaged = previous + (value - previous) / (state["count"].astype(value.dtype) + 1)
        else:
            averaged = momentum * previous + (1 - momentum) * value
        averaged = jnp.where(jnp.isfinite(previous), averaged, value)  # a bad state is replaced
        new_state[key] = jnp.where(keep, averaged, old).astype(old.dtype)
    for key in [key for key in ("count", "steps") if key in state]:  # advanced with an update
        advanced = jnp.where(jnp.any(update), state[key] + 1, state[key])
        new_state[key] = advanced.astype(state[key].dtype)
    return new_state


_both = functools.partial(jax.tree.map, lax.bitwise_and)  # (no jaxbn function on the traced path)

# One cached jitted call; a Python momentum stays static (1 - momentum in double precision).
_averaged_into_static_momentum = jax.jit(_averaged_into, static_argnums=(2, 3))
_averaged_into_jitted = jax.jit(_averaged_into, static_argnums=(3,))


def _average(state: State, batch: Any, momentum: Any, unbiased: bool) -> dict:
    static = momentum is None or isinstance(momentum, (int, float))
    average = _averaged_into_static_momentum if static else _averaged_into_jitted
    return average(state, batch, momentum, unbiased)


def update_running_stats(
    state: State,
    batch: stats.Moments,
    *,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
) -> dict[str, jax.Array]:
    """The running statistics with batch moments averaged in (the old state's keys and dtypes), as
    :func:`batch_norm`'s training step does: after :func:`jaxbn.merge_moments`, one update per
    optimizer step.

    Args:
      state: ``{'mean', 'var'}`` (and ``'count'`` for ``momentum=None``).
      batch: the batch's :class:`jaxbn.Moments` of the state's shape.
      momentum: in [0, 1], or None for the cumulative average.
      unbiased_running_var: average ``var * n / (n - 1)`` into the state.

    Raises:
      TypeError: a state, momentum or moments of the wrong type or dtype.
      ValueError: a state, momentum or moments of the wrong value, keys or shape.

    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> params, state = jaxbn.batch_norm_init(2)
    >>> kw = dict(training=True, momentum=0.9, update_running_stats=False, return_moments=True)
    >>> micro = [jaxbn.batch_norm(x[i:i + 2], params, state, **kw)[2] for i in (0, 2)]
    >>> update_running_stats(state, jaxbn.merge_moments(micro), momentum=0.9)['mean']
    Array([0.3, 0.4], dtype=float32)
    """
    unbiased = unbiased_running_var
    checked = _validation.check_running_update(stats.Moments, state, batch, momentum, unbiased)
    return _average(checked, batch, momentum, unbiased)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _broadcast_to_groups(value: jax.Array, groups: int) -> jax.Array:
    """``value`` repeated along a new leading axis of size ``groups`` (transposed: a sum)."""
    return jnp.broadcast_to(value, (groups,) + value.shape)


@_broadcast_to_groups.defjvp
def _broadcast_to_groups_jvp(groups, primals, tangents):
    # The barrier (transposed: on the cotangent, before the sum) keeps XLA from folding this sum
    # into the per-group reduction that made the cotangent, which would read dy once more (1S).
    (value,), (tangent,) = primals, tangents
    tangent = lax.optimization_barrier(jnp.broadcast_to(tangent, (groups,) + tangent.shape))
    return _broadcast_to_groups(value, groups), tangent


def _ghost_sharding(x: jax.Array, groups: int, ghost: int) -> Any:
    """With sharding in types, the sharding of ``x`` (``(B, ...)``, or a mask of its rank) read as
    ``(groups, ghost, ...)``: the groups split as the batch was where each device holds whole ghost
    batches, else each ghost batch split over the devices (XLA moves the rows there), else
    neither; None without."""
    sharding = stats.explicit_sharding(x)
    if sharding is None:
        return None
    spec = stats.axis_parts(sharding, x.ndim)
    devices = stats.devices_along(sharding.mesh, spec[0])
    if groups % devices == 0:
        lead = (spec[0], None)
    elif ghost % devices == 0:
        lead = (None, spec[0])
    else:
        lead = (None, None)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*lead, *spec[1:]))


def _combine_ghost_moments(batch, shift, plan: stats.Plan) -> stats.Moments:
    """The ghost batches' moments, count-weighted (with ``plan.axis_name`` over every device's, in
    one collective): ``mean = Σ n_k μ_k / Σ n_k``, ``var = Σ n_k σ²_k / Σ n_k``, count ``Σ n_k``."""
    axis_name, groups = plan.axis_name, plan.axis_index_groups
    count = jnp.sum(batch.count, 0)
    if axis_name is None:
        # weights n_k / N: one group (g = B) gives its own statistics (to rounding)
        weight = batch.count / jnp.maximum(count, 1)
        mean, var = jnp.sum(weight * batch.mean, 0), jnp.sum(weight * batch.var, 0)
    else:
        dtype = batch.mean.dtype  # one stacked collective: complex if the mean is
        weighted_mean = jnp.sum(batch.count * batch.mean, 0)
        weighted_var = jnp.sum(batch.count * batch.var, 0).astype(dtype)
        sums = [count.astype(dtype), weighted_mean, weighted_var]
        count, weighted_mean, weighted_var = stats.cross_device_sum(sums, axis_name, groups)
        count, safe = count.real, jnp.maximum(count.real, 1)
        mean, var = weighted_mean / safe, weighted_var.real / safe
    return stats.Moments(mean, var, count, shift, mean - shift)
