"""Fixtures and markers shared by the tests.

The root ``conftest.py`` forces 8 CPU devices before JAX is imported; the
constants and markers here depend on that.
"""

import zlib

import jax
import numpy as np
import pytest

#: The forced host devices the multi-device tests spread a batch over.
N_DEVICES = 8

#: For tests that need every forced device (a run with other XLA flags skips them).
needs_devices = pytest.mark.skipif(
    jax.device_count() < N_DEVICES,
    reason=f"needs {N_DEVICES} devices (conftest.py forces 8 CPU devices), got {jax.device_count()}",
)

#: For pins of compiled structure (traffic, kernels): measured on XLA:CPU as
#: shipped with jax >= 0.10.2 (0.10.0's XLA:CPU fuses differently).
structural = pytest.mark.skipif(
    jax.__version_info__ < (0, 10, 2) or jax.default_backend() != "cpu",
    reason="compiled structure pinned for XLA:CPU of jax >= 0.10.2",
)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test's id: draws depend neither on test order nor on xdist's split."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
