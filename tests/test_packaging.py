"""jaxbn installs as a dependency of another project: a wheel built from the repository works outside it."""

import email
import pathlib
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow  # builds a wheel, installs it and runs it in a fresh interpreter

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_a_wheel_of_jaxbn_installs_and_runs_outside_the_repository(tmp_path):
    """What README's "Using jaxbn in another project" does: build, install (here into a folder), import, call."""
    # 900 s: building the wheel takes ~10 s quietly on 2 cores (setuptools from the test extra, no download)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("jaxbn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(
            archive.read(next(n for n in names if n.endswith("METADATA")))
        )
    assert (
        "jaxbn/__init__.py" in names
        and "jaxbn/linen.py" in names
        and "jaxbn/interop/torch/__init__.py" in names
    )
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
    required = {
        requirement.split(">")[0].split("=")[0].split(";")[0].strip()
        for requirement in metadata.get_all("Requires-Dist")
    }
    assert {"jax", "flax", "numpy"} <= required
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    script = (
        "import jaxbn, jax.numpy as jnp; print(jaxbn.__file__); "
        "p, s = jaxbn.batch_norm_init(2); print(jaxbn.batch_norm(jnp.ones((4, 2)), p, s, training=True)[1]['mean'])"
    )
    # the installed copy comes first on the path; jax and flax come from this environment, as a user's would
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={"PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0].startswith(str(target))
