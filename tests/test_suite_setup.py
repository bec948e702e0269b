"""The test run's own setup (the root ``conftest.py``): its shared compilation cache; and
``.ci/oldest``, the run against the oldest dependencies allowed."""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import jax
import pytest


def test_the_run_compiles_into_a_cache_of_its_own():
    """A new directory under the temporary directory, named for this purpose, with one cache per
    process of the run (each xdist worker): no process reads an entry another is writing."""
    cache = pathlib.Path(jax.config.jax_compilation_cache_dir)
    run = pathlib.Path(os.environ["JAXBN_TEST_COMPILATION_CACHE"])
    assert cache == run / os.environ.get("PYTEST_XDIST_WORKER", "main")
    assert cache.is_dir() and run.parent == pathlib.Path(tempfile.gettempdir())
    assert run.name.startswith("jaxbn-test-compilation-cache-")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0


@pytest.mark.slow  # starts a Python process
def test_processes_a_test_starts_do_not_use_the_cache():
    code = "import jax; print(jax.config.jax_compilation_cache_dir)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    assert result.stdout.strip() == "None", result.stdout


def test_the_oldest_run_pins_the_minimums_pyproject_allows():
    """``.ci/oldest`` installs each dependency's minimum in ``pyproject.toml`` (numpy's: the first
    release of its minor version that the package index holds), and jaxlib at jax's."""
    root = pathlib.Path(__file__).resolve().parent.parent
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    minimums = dict(re.fullmatch(r"([a-z]+)>=([\d.]+)", d).groups() for d in dependencies)
    pins = dict(re.findall(r'"([a-z]+)==([\d.]+)"', (root / ".ci" / "oldest").read_text()))
    assert set(pins) == {*minimums, "jaxlib"}, (pins, minimums)
    assert pins["jax"] == pins["jaxlib"] == minimums["jax"]
    assert pins["flax"] == minimums["flax"]
    assert pins["numpy"].startswith(minimums["numpy"] + "."), (pins, minimums)
