"""jaxbn's statistics with pass two's two sums as two reductions, for measuring on a device only.

``install()`` sets :data:`jaxbn.stats.pass_two_apart`: pass two then sums the squared deviations
and their scaled copy in two reductions, as jaxbn did before 2026-12-07 (sixteenth), instead of
one reduction over the two stacked along a new axis. The stacking was
measured on XLA:CPU only (``benchmarks/RESULTS.md``, sixteenth), where each reduction reads ``x``
once; a GPU fuses sibling reductions into one read, and the stacked form computes each
deviation twice. ``benchmarks/gpu_suite.py`` times both on a GPU. Nothing else imports this file.
"""

from __future__ import annotations

import jax

from jaxbn import stats


def install() -> None:
    """Makes :mod:`jaxbn.stats` take pass two's sums apart (this process; benchmarks only)."""
    stats.pass_two_apart = True
    jax.clear_caches()
