"""jaxbn: batch normalization for JAX and Flax.

Pure functions do the work: :func:`moments` reduces (count-weighted across
devices, stable at large offsets, one collective), :func:`normalize` and
:func:`batch_norm` normalize with explicit ``{'mean', 'var'}`` state, and
:func:`batch_renorm` (with the :func:`renorm_clipping` schedule) corrects
batch norm towards that state; :func:`layer_norm`, :func:`rms_norm`,
:func:`group_norm` and :func:`instance_norm` take per-example statistics from
the same :func:`moments`. The Flax modules in :mod:`jaxbn.linen` and
:mod:`jaxbn.nnx` own variables and call these functions. Around a trained
model: :func:`recalibrate` re-estimates running statistics from data and
:func:`fold_batch_norm` folds eval-mode BatchNorms into the preceding
``Conv``/``Dense`` for inference, :func:`inspect_batch_norms` compares batch
and running statistics per layer.
"""

from jaxbn.per_example import group_norm, instance_norm, layer_norm, rms_norm
from jaxbn._validation import DegenerateBatchWarning
from jaxbn.functional import batch_norm, batch_norm_init, normalize, update_running_stats
from jaxbn.fold import fold_batch_norm
from jaxbn.inspect import inspect_batch_norms
from jaxbn.recalibrate import recalibrate
from jaxbn.renorm import batch_renorm, renorm_clipping
from jaxbn.stats import Moments, merge_moments, moments

__version__ = "0.1.0"

__all__ = [
    "DegenerateBatchWarning",
    "Moments",
    "batch_norm",
    "batch_norm_init",
    "batch_renorm",
    "fold_batch_norm",
    "group_norm",
    "inspect_batch_norms",
    "instance_norm",
    "layer_norm",
    "merge_moments",
    "moments",
    "normalize",
    "recalibrate",
    "renorm_clipping",
    "rms_norm",
    "update_running_stats",
]
