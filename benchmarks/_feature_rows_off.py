"""jaxbn's statistics without their narrow-feature rows, for measuring on a device only.

``install()`` sets :data:`jaxbn.stats.LANES` to 0: the sums then read a narrow feature axis (at most
32 features) as it is, as jaxbn did before 2026-12-07, instead of as rows of at least 128 elements.
The rows were measured on XLA:CPU only (``benchmarks/RESULTS.md``, eleventh), where its library
reductions run 2-5x slower over rows of 16 features; ``benchmarks/gpu_suite.py`` times both on a
GPU. Nothing else imports this file.
"""

from __future__ import annotations

import jax

from jaxbn import stats


def install() -> None:
    """Makes :mod:`jaxbn.stats` sum narrow feature axes as they are (this process; benchmarks only)."""
    stats.LANES = 0
    jax.clear_caches()
