"""Batch renormalization (Ioffe, 2017): batch norm's step with a per-feature correction ``(r, d)``
towards the running statistics (:func:`renorm_correction`), and its clipping schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _validation, functional, stats
from jaxbn.functional import Params, State

__all__ = ["batch_renorm", "renorm_clipping"]


def renorm_correction(batch: stats.Moments, running_mean, running_var, epsilon, r_max, d_max):
    """Batch renormalization's ``(r, d)``, constants for autodiff: ``r = clip(σ_B / σ, 1/r_max,
    r_max)`` and ``d = clip((μ_B - μ) / σ, -d_max, d_max)``, with ``σ_B, σ = sqrt(var + eps)`` of
    the batch and the running statistics and ``μ_B - μ`` taken as ``(K - μ) + (μ_B - K)`` (``K``:
    the batch's shift), exact at a large offset."""
    limits = (running_mean, running_var, r_max, d_max)
    running_mean, running_var, r_max, d_max = (jnp.asarray(v, batch.var.dtype) for v in limits)
    running_std = jnp.sqrt(running_var + epsilon)
    r = jnp.sqrt((batch.var + epsilon) / (running_var + epsilon))
    d = ((batch.shift - running_mean) + batch.mean_minus_shift) / running_std
    r = jnp.minimum(jnp.maximum(r, 1 / r_max), r_max)
    # A batch variance beyond the dtype normalizes to x_hat = 0, which r multiplies: 1, not an
    # unclipped inf (r_max=inf) that would meet the 0 of rsqrt(inf) as inf * 0 = NaN.
    r = jnp.where(jnp.isposinf(batch.var), 1, r)
    d = jnp.minimum(jnp.maximum(d, -d_max), d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def renorm_clipping(
    step: Any,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_steps: int = 40000,
    d_max_steps: int = 25000,
) -> tuple[jax.Array, jax.Array]:
    r"""Batch renormalization's clipping schedule (Ioffe, 2017): ``(r_max, d_max)`` at ``step``,
    plain batch norm (``r_max = 1``, ``d_max = 0``) up to ``warmup_steps``, then each limit relaxed
    linearly to its final value at ``r_max_steps`` / ``d_max_steps``; the defaults are the paper's.

    Args:
      step: the training step (0 for the first), an int or float scalar or array, maybe traced;
        the limits returned are float32 arrays of its shape.
      r_max: final ``r_max``, finite and >= 1.
      d_max: final ``d_max``, finite and >= 0.
      warmup_steps: steps of plain batch norm, >= 0.
      r_max_steps: the step at which ``r_max`` is reached, >= ``warmup_steps``.
      d_max_steps: the step at which ``d_max`` is reached, >= ``warmup_steps``.

    Raises:
      TypeError: a ``step`` that is not an integer or float scalar or array, or limits that are
        not real numbers.
      ValueError: limits or step counts out of range, or not Python numbers.

    >>> import jax.numpy as jnp
    >>> r_max, d_max = renorm_clipping(jnp.array([0, 5000, 15000, 25000, 40000, 10**6]))
    >>> [round(float(v), 4) for v in r_max]
    [1.0, 1.0, 1.5714, 2.1429, 3.0, 3.0]
    """
    for name, value, lower in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        number = _validation.static_float(value, name, f"a finite number >= {lower:g}")
        if number is None or not (np.isfinite(number) and number >= lower):
            raise ValueError(
                f"renorm_clipping's {name} must be a finite Python number >= {lower:g}, got "
                f"{value!r}."
            )
    steps = {"warmup_steps": warmup_steps, "r_max_steps": r_max_steps, "d_max_steps": d_max_steps}
    for name, value in steps.items():
        integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if not integer or value < 0:
            raise ValueError(f"{name} must be a non-negative Python int, got {value!r}.")
        if value < warmup_steps:
            raise ValueError(
                f"{name}={value} is before warmup_steps={warmup_steps}: the limit is relaxed only "
                f"after warm-up, so {name} must be >= warmup_steps."
            )
    dtype = getattr(step, "dtype", None)
    if dtype is None:
        dtype = (np.asarray if isinstance(step, (str, bytes)) else jnp.asarray)(step).dtype
    if not _validation.is_real_dtype(dtype):
        raise TypeError(
            f"step must be an integer or float scalar or array, got {step!r} of dtype {dtype}."
        )
    t = jnp.asarray(step).astype(jnp.float32)

    def progress(end):
        if end == warmup_steps:
            return (t > warmup_steps).astype(jnp.float32)
        return jnp.clip((t - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

    return 1.0 + (float(r_max) - 1.0) * progress(r_max_steps), float(d_max) * progress(d_max_steps)


def batch_renorm(
    x: jax.Array,
    params: Params | None,
    state: State,
    *,
    training: bool,
    r_max: Any,
    d_max: Any,
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
    r"""Batch renormalization (Ioffe, 2017) with explicit running statistics.

    Training normalizes with the batch statistics, then corrects towards the running ones (for
    small or non-i.i.d. batches): :math:`y = \gamma\,(\hat x\, r + d) + \beta` with
    :math:`r = \mathrm{sg}(\mathrm{clip}_{[1/r_{max},\, r_{max}]}\, \sigma_B / \sigma)` and
    :math:`d = \mathrm{sg}(\mathrm{clip}_{[-d_{max},\, d_{max}]}\, (\mu_B - \mu) / \sigma)`,
    :math:`\hat x` batch norm's, :math:`\mu, \sigma` from ``state`` and ``sg`` a
    stop-gradient; ``r_max = 1, d_max = 0`` is :func:`jaxbn.batch_norm`. The other arguments, the
    outputs, the running statistics and inference are batch norm's (``x`` real in training);
    ``state`` may hold an int scalar ``'steps'``, advanced with every update (for schedules).

    Args:
      r_max: >= 1, the bound of ``r`` (``inf``: unbounded); a number or a scalar array,
        possibly traced (e.g. ``renorm_clipping(step)[0]``), which cannot be checked.
      d_max: >= 0, the bound of ``|d|``; as ``r_max``.

    Raises:
      TypeError: as :func:`jaxbn.batch_norm`, and for limits that are not real scalars.
      ValueError: as :func:`jaxbn.batch_norm`, and for limits out of range.

    >>> import jax.numpy as jnp
    >>> from jaxbn import batch_norm_init
    >>> params, state = batch_norm_init(2)
    >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
    >>> y, new_state = batch_renorm(x, params, state, training=True, r_max=3.0, d_max=5.0,
    ...                             momentum=0.9)
    >>> y.round(3) + 0.0  # r = (1, 3), d = (1, 5): clipped in the second channel
    Array([[0., 2.],
           [2., 8.]], dtype=float32)
    """
    call = _validation.check_batch_norm("batch_renorm", renorm_correction, **locals())
    with jax.named_scope("jaxbn.batch_renorm"):
        return functional.apply_checked(call)


def batch_renorm_scheduled(
    x: jax.Array, params: Any, state: State, r_max: Any, d_max: Any, **kwargs
):
    """:func:`batch_renorm` with each limit a number or a schedule ``limit(step)``, evaluated at
    ``state['steps']`` (the linen and nnx ``BatchRenorm`` modules' call)."""
    step = state.get("steps")
    r_max, d_max = (limit(step) if callable(limit) else limit for limit in (r_max, d_max))
    return batch_renorm(x, params, state, r_max=r_max, d_max=d_max, **kwargs)
