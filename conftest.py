"""Test configuration shared by tests/ and the doctests in jaxbn/.

Multi-device tests run on 8 forced CPU devices. XLA reads the flag once, when
JAX initialises its backends, so it is set here, before anything imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
