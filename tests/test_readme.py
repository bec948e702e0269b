"""The README stays short, its commands are the ones CI runs, and each of its Python examples runs as copied
alone: in a fresh namespace, in a fresh process.

Each block runs in its own interpreter, with the environment a user has (no ``XLA_FLAGS`` set), not in this
test process. The guides' longer examples are in docs/, run by tests/test_docs.py.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
CI = README.parent / ".ci" / "run"

#: The two setup commands the project promises, character for character.
SETUP_COMMANDS = (
    'python3 -m venv .venv && .venv/bin/pip install -e ".[examples]" && .venv/bin/python examples/train_digits.py',
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -n 2',
)


def test_the_readme_has_its_examples():
    # the quick start: the functional API, linen and nnx; the guides' examples live in docs/
    assert len(BLOCKS) >= 3, "the README lost its quick start"


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail into a page of docs/"


def test_the_readme_keeps_its_setup_commands():
    bash = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = {line for block in bash for line in block.splitlines()}
    for command in SETUP_COMMANDS:
        assert command in lines, f"the README lost its setup command {command!r}"


def test_ci_runs_the_readme_commands():
    """.ci/run installs and runs exactly what the README's test, slow-tier and docs commands do, in its own venv."""
    bash = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line for block in bash for line in block.splitlines()]
    commands = [SETUP_COMMANDS[1]]
    commands += [
        line for line in lines if line.startswith(".venv/bin/python -m pytest -n 2 -m slow")
    ][:1]
    commands += [line for line in lines if "-m sphinx" in line]
    assert len(commands) == 3, commands
    ci = CI.read_text()
    for command in commands:
        for step in command.split(" && "):
            if step.startswith("python3 -m venv"):
                continue  # CI makes a fresh venv of its own
            assert step.startswith(".venv/bin/"), step
            in_ci = re.sub(r"^\.venv/bin/(\S+)", r'"$venv/bin/\1"', step)
            assert in_ci in ci, f".ci/run does not run the README's {step!r} (as {in_ci!r})"


@pytest.mark.slow  # a fresh interpreter per block
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_alone(index):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"  # the CI machine's platform; the blocks name no device
    # 600 s: a block's quiet time is under 30 s on 2 cores (a fresh interpreter importing jax and flax)
    run = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=README.parent,
    )
    assert run.returncode == 0, (
        f"README python block {index} failed alone:\n{BLOCKS[index]}\n{run.stderr[-3000:]}"
    )
