"""benchmarks/gpu_suite.py --smoke: the GPU suite's code runs on CPU, so it cannot rot between device sessions.

The smoke run also runs benchmarks/e2e.py --quick (in each group's process): its
checks here cover e2e.py too. Nothing looks at how long a step took.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

SUITE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow  # runs benchmarks/gpu_suite.py --smoke in subprocesses
def test_smoke_run_writes_markdown_and_json(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SUITE), str(tmp_path), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )  # ~30 s quiet; a hang fails, a loaded machine does not
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert set(results) == {"default", "reshift_loop"}
    assert all("error" not in group for group in results.values()), results
    row = results["default"]["e2e"]["resnet20"]
    assert row["loss_check_passed"] and set(row["median_ms"]) == {"jaxbn", "flax", "none"}
    assert all(math.isfinite(ms) for ms in row["median_ms"].values())
    assert "initial variables identical: yes" in row["output"] and "): passed" in row["output"]
    assert "BN overhead jaxbn / flax" in row["output"]
    for group in results.values():  # the smoke runs the install's path through the micro benchmark
        assert (
            group["micro"][0]["dtype"] == "float32"
            and "train forward" in group["micro"][0]["output"]
        )
    # each group's process measured the statistics it names: the install swapped them in its own process only
    assert results["default"]["statistics"] == "jaxbn.stats._two_pass_statistics"
    assert results["reshift_loop"]["statistics"] == "_reshift_loop.loop_statistics"
    assert results["reshift_loop"]["e2e"] == {}  # smoke: the e2e code is the default group's
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert (
        "| default | resnet20 |" in markdown
        and "## Micro: float32 (8, 4, 4, 8) NHWC (reshift_loop)" in markdown
    )
    assert "- statistics of `reshift_loop`: `_reshift_loop.loop_statistics`" in markdown
    assert markdown in done.stdout


def test_full_plan_times_both_statistics_designs():
    """Off smoke: the default and the replaced loop design, each micro (the loop: jaxbn and the copy) and end to
    end on both models; the command-buffer group; no group sets an environment variable jaxbn would read."""
    suite = _suite()
    plan = suite._plan(smoke=False)
    assert set(plan) == {"default", "reshift_loop", "command_buffers"}
    assert plan["reshift_loop"]["install"] == "_reshift_loop" and "install" not in plan["default"]
    assert plan["reshift_loop"]["micro"] == suite.MICRO and plan["reshift_loop"]["micro_libs"] == [
        "jaxbn",
        "copy",
    ]
    assert set(plan["reshift_loop"]["e2e"]) == set(plan["default"]["e2e"]) == set(suite.E2E_MODELS)
    assert plan["command_buffers"]["env"] == {"XLA_FLAGS": suite.COMMAND_BUFFER_FLAG}
    assert not any(name.startswith("JAXBN") for group in plan.values() for name in group["env"])


def _suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite


def test_markdown_writes_n_a_for_a_ratio_that_does_not_exist():
    # Under load a quick run can time flax's step at or below the no-norm step: e2e gives None for its ratio.
    suite = _suite()
    row = {
        "median_ms": {"jaxbn": 2.0, "flax": 1.0, "none": 1.5},
        "step_ratio": 2.0,
        "overhead_ratio": None,
    }
    markdown = suite._markdown(
        {"default": {"environment": {}, "micro": [], "e2e": {"resnet20": row}}}, smoke=True
    )
    assert "| default | resnet20 | 2.000 | 1.000 | 1.500 | 2.000 | n/a |" in markdown
