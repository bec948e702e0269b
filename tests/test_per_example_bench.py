"""benchmarks/per_example.py: every norm and dtype measured beside flax's, and its guard (jaxbn's
output against flax's) catches a norm that computes something else. Nothing here looks at a time
or a ratio's size."""

import json

import jax.numpy as jnp
import pytest

from benchmarks import per_example

NAMES = ("jaxbn", "flax")


@pytest.mark.slow  # compiles 24 small programs
def test_quick_run_measures_every_norm_and_dtype_beside_flax(tmp_path, capsys):
    path = tmp_path / "per_example.json"
    results = per_example.main(["--quick", "--json", str(path)])
    assert json.loads(path.read_text()) == results
    assert {(r["norm"], r["dtype"]) for r in results} == {
        (norm, dtype) for norm in per_example.NORMS for dtype in ("float32", "bfloat16")
    }
    for result in results:
        assert result["agrees"], result
        keys = {f"{mode} {name}" for mode in ("forward", "forward+backward") for name in NAMES}
        assert set(result["ms"]) == set(result["traffic_S"]) == keys
        assert all(value > 0 for value in [*result["ms"].values(), *result["traffic_S"].values()])
    table = capsys.readouterr().out.split("## per-example norms, jaxbn / flax.linen\n")[1]
    assert len(table.strip().splitlines()) == 1 + len(results)  # a header and a row each


def test_the_guard_catches_a_norm_that_is_not_flax(monkeypatch):
    norm, flax_module, names = per_example.NORMS["rms_norm"]
    wrong = lambda x, p, mask: norm(x, p, mask=mask) + jnp.asarray(0.01, x.dtype)  # noqa: E731
    monkeypatch.setitem(per_example.NORMS, "rms_norm", (wrong, flax_module, names))
    assert not per_example.measure("rms_norm", "float32", (2, 4, 32), reps=1)["agrees"]
    monkeypatch.undo()
    assert per_example.measure("rms_norm", "float32", (2, 4, 32), reps=1)["agrees"]


@pytest.mark.parametrize("norm", sorted(per_example.NORMS))
def test_a_masked_run_gives_both_libraries_one_mask(norm):
    result = per_example.measure(norm, "float32", (2, 4, 64), reps=1, masked=True)
    assert result["masked"] and result["agrees"], result
