"""jaxbn: batch normalization for JAX and Flax.

Pure functions do the work: :func:`moments` reduces (count-weighted across
devices, stable at large offsets, one collective), :func:`normalize` and
:func:`batch_norm` normalize with explicit ``{'mean', 'var'}`` state;
:func:`layer_norm`, :func:`rms_norm`, :func:`group_norm` and
:func:`instance_norm` take per-example statistics from the same
:func:`moments`. The Flax modules in :mod:`jaxbn.linen` own variables and
call these functions.
"""

from jaxbn.alternatives import group_norm, instance_norm, layer_norm, rms_norm
from jaxbn.functional import batch_norm, batch_norm_init, normalize
from jaxbn.stats import Moments, moments

__version__ = "0.1.0"

__all__ = [
    "Moments",
    "batch_norm",
    "batch_norm_init",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "rms_norm",
]
