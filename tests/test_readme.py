"""Each of the README's Python examples runs as copied alone: in a fresh namespace, in a fresh process.

A block that needs 8 devices says so and sets ``XLA_FLAGS`` before it imports JAX, so each block runs in its
own interpreter, with the environment a user has (no ``XLA_FLAGS`` set), not in this test process.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 10, "the README lost its examples"


@pytest.mark.slow  # a fresh interpreter per block
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_alone(index):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"  # the CI machine's platform; the blocks name no device
    # 600 s: a block's quiet time is under 30 s on 2 cores (a fresh interpreter importing jax and flax)
    run = subprocess.run([sys.executable, "-c", BLOCKS[index]], env=env, capture_output=True, text=True,
                         timeout=600, cwd=README.parent)
    assert run.returncode == 0, f"README python block {index} failed alone:\n{BLOCKS[index]}\n{run.stderr[-3000:]}"
