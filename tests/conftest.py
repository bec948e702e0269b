"""Fixtures and markers shared by the tests.

The root ``conftest.py`` forces 8 CPU devices before JAX is imported; the
constants and markers here depend on that.
"""

import zlib

import hypothesis
import jax
import numpy as np
import pytest

# Property tests: CI searches a modest, fixed set of examples (derandomized, so a run is repeatable and its time
# known); `pytest --hypothesis-profile=long` searches ten times as many, newly drawn each run.
hypothesis.settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)
hypothesis.settings.register_profile(
    "long",
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)
hypothesis.settings.load_profile("ci")

#: The forced host devices the multi-device tests spread a batch over.
N_DEVICES = 8

#: For tests that need every forced device (a run with other XLA flags skips them).
needs_devices = pytest.mark.skipif(
    jax.device_count() < N_DEVICES,
    reason=f"needs {N_DEVICES} devices (conftest.py forces 8 CPU devices), got {jax.device_count()}",
)

#: Whether pins of compiled structure (traffic, kernels) hold here: they were measured on XLA:CPU
#: as shipped with jax >= 0.10.2 (0.10.0's XLA:CPU fuses differently: forward traffic 10S
#: where the rows of narrow features take 4S).
STRUCTURE_PINNED = jax.__version_info__ >= (0, 10, 2) and jax.default_backend() == "cpu"
structural = pytest.mark.skipif(
    not STRUCTURE_PINNED, reason="compiled structure pinned for XLA:CPU of jax >= 0.10.2"
)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test's id: draws depend neither on test order nor on xdist's split."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def tiered(first, second, default_tier):
    """Every pair of ``first`` x ``second`` for a two-argument ``parametrize``, those not in
    ``default_tier`` marked slow: each behaviour keeps a case in the default tier."""
    return [
        pair if pair in default_tier else pytest.param(*pair, marks=pytest.mark.slow)
        for pair in ((a, b) for a in first for b in second)
    ]
