"""The batch-norm suites again, in a process with one CPU device.

conftest.py forces 8 CPU devices, and under plain ``jit`` with several devices
jaxbn keeps XLA's reductions (XLA cannot partition its C++ sums, see
:mod:`jaxbn._cpu`). Most users of the CPU backend have one device, where plain
``jit`` does use the C++ sums; this test runs the suites that pin batch norm's
values, gradients and compiled structure in such a process, so both paths are
tested on every run.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from jaxbn import _cpu

REPO = pathlib.Path(__file__).resolve().parent.parent
SUITES = [
    "tests/test_cpu_kernels.py",
    "tests/test_performance.py",
    "tests/test_functional.py",
    "tests/test_stats.py",
    "tests/test_running_stats.py",
    "tests/test_renorm.py",
    "tests/test_alternatives.py",
    "tests/test_linen.py",
]


@pytest.mark.skipif(not _cpu.available(), reason="jaxbn._cpu_kernels is not built: one path only")
def test_suites_pass_on_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-x", *SUITES]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1], out.stdout[-2000:]
