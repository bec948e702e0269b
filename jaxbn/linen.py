"""Flax linen modules: drop-in replacements that call the functional core.

A module here owns its variables (the same names and collections as flax's)
and passes them to :mod:`jaxbn.functional`; it computes nothing itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from jaxbn import functional

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """Drop-in replacement for :class:`flax.linen.BatchNorm`.

    Same fields and defaults, same call signature, same variables
    (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), so a
    model swaps the import and keeps its checkpoints. Beyond flax it inherits
    the functional core (:func:`jaxbn.batch_norm`): statistics synchronized
    over ``axis_name`` are weighted by counts (exact with masks and uneven
    shards; flax averages per-device means), the variance is exact at large
    offsets with one all-reduce (``use_fast_variance`` is accepted and ignored:
    jaxbn has no unstable mode), a non-finite batch leaves the running
    statistics unchanged, and bad arguments raise at trace time.

    During ``init`` (as flax) statistics are neither synchronized nor written;
    a batch with a single element per feature is then normalized with the
    initial running statistics, since its batch variance is meaningless.

    Attributes:
      use_running_average: normalize with ``batch_stats`` (inference) instead
        of batch statistics; may also be passed to ``__call__``.
      axis: the feature axis (or axes).
      momentum: decay of the running average, in [0, 1].
      epsilon: added to the variance, > 0.
      dtype: output dtype (default: promotion of input and params).
      param_dtype: dtype of ``scale`` and ``bias``.
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

    >>> import jax, jax.numpy as jnp
    >>> bn = BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    >>> variables = bn.init(jax.random.key(1), x)
    >>> jax.tree_util.tree_map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> bool(jnp.allclose(updates['batch_stats']['mean'], 0.1 * x.mean(0)))
    True
    """

    use_running_average: bool | None = None
    axis: int | Any = -1
    momentum: float = 0.99
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
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x) if not hasattr(x, "dtype") else x
        feature_axes = functional._feature_axes(x, self.axis)[0]
        feature_shape = tuple(x.shape[i] for i in feature_axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        state = {"mean": ra_mean.value, "var": ra_var.value}

        training = not use_running_average
        initializing = self.is_initializing()
        if training and initializing and mask is None and x.size == len(ra_mean.value.ravel()):
            training = False  # one element per feature: see the class docstring
        y, new_state = functional.batch_norm(
            x,
            params,
            state,
            training=training,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
        )
        if training and not initializing:
            ra_mean.value = new_state["mean"]
            ra_var.value = new_state["var"]
        return y
