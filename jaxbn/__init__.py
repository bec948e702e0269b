"""jaxbn: batch normalization for JAX and Flax.

Pure functions normalize with explicit ``{'mean', 'var'}`` state; :mod:`jaxbn.linen` and
:mod:`jaxbn.nnx` hold the Flax modules; the tools for trained models load at first use.
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
