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

import importlib
from typing import Any

from jaxbn._validation import DegenerateBatchWarning
from jaxbn.functional import batch_norm, batch_norm_init, normalize, update_running_stats
from jaxbn.per_example import group_norm, instance_norm, layer_norm, rms_norm
from jaxbn.renorm import batch_renorm, renorm_clipping
from jaxbn.stats import Moments, merge_moments, moments

__version__ = "0.1.0"

# The tools work on Flax models, so they import flax: loaded at first use; `import jaxbn` does not.
_TOOLS = {
    "fold_batch_norm": "jaxbn.folding",
    "inspect_batch_norms": "jaxbn.inspection",
    "recalibrate": "jaxbn.recalibration",
}


def __getattr__(name: str) -> Any:
    if name in _TOOLS:
        return getattr(importlib.import_module(_TOOLS[name]), name)
    raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_TOOLS})

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
