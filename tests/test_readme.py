"""The README's Python examples run as written, in order, in one namespace.

They build on each other (the quick start defines ``x``, ``params`` and
``state``); the sub-group example needs the 8 devices conftest.py forces.
"""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    if jax.device_count() < 8:
        pytest.skip("the sub-group example shards over 8 devices (conftest.py forces them)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5, "the README lost its examples"
    namespace = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"README python block {index} failed:\n{block}") from err
