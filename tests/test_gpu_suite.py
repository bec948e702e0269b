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

from tests import hlo

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
    assert set(results) == {
        "default", "reshift_loop", "narrow", "narrow_rows_off", "pass_two_apart", "per_example",
        "masked",
    }  # fmt: skip
    assert all("error" not in group for group in results.values()), results
    row = results["default"]["e2e"]["resnet20"]
    assert row["loss_check_passed"] and set(row["median_ms"]) == {"jaxbn", "flax", "none"}
    assert all(math.isfinite(ms) for ms in row["median_ms"].values())
    assert "initial variables identical: yes" in row["output"] and "): passed" in row["output"]
    assert "BN overhead jaxbn / flax" in row["output"]
    masked = results.pop("masked")["micro"]  # one micro run per mask, jaxbn timed with it
    assert [row["mask"] for row in masked] == ["positions", "elements"]
    for row in masked:
        assert f"mask (training modes): of {row['mask']}" in row["output"]
    per_example = results.pop("per_example")["per_example"]  # layer, RMS and group norm
    assert [row["norm"] for row in per_example] == ["layer_norm", "rms_norm", "group_norm"]
    assert all(row["agrees"] and row["dtype"] == "float32" for row in per_example), per_example
    for group in results.values():  # the smoke runs the install's path through the micro benchmark
        assert (
            group["micro"][0]["dtype"] == "float32"
            and "train forward" in group["micro"][0]["output"]
        )
    # each group's process measured the statistics it names: the install swapped them in its own process only
    rows = "jaxbn.stats._two_pass_statistics, narrow features in rows of 128"
    assert results["default"]["statistics"] == results["narrow"]["statistics"] == rows
    assert results["narrow_rows_off"]["statistics"] == "jaxbn.stats._two_pass_statistics, no rows"
    assert results["reshift_loop"]["statistics"] == "_reshift_loop.loop_statistics"
    assert results["pass_two_apart"]["statistics"] == rows + ", pass two in two reductions"
    # (smoke: e2e is the default's code)
    for name in ("reshift_loop", "narrow", "narrow_rows_off", "pass_two_apart"):
        assert results[name]["e2e"] == {}, name
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert (
        "| default | resnet20 |" in markdown
        and "## Micro: float32 (8, 4, 4, 8) NHWC (reshift_loop)" in markdown
    )
    assert "- statistics of `reshift_loop`: `_reshift_loop.loop_statistics`" in markdown
    assert "| rms_norm | float32 | (2, 8, 64) |" in markdown
    assert "## Micro: float32 (8, 4, 4, 8) NHWC, a mask of elements (masked)" in markdown
    assert markdown in done.stdout


def test_full_plan_times_both_statistics_designs():
    """Off smoke: the default and the replaced loop design, each micro (the loop: jaxbn and the copy) and end to
    end on both models; the narrow-feature rows on and off; the per-example norms; the command-buffer
    group; no group sets an
    environment variable jaxbn would read."""
    suite = _suite()
    plan = suite._plan(smoke=False)
    assert set(plan) == {
        "default",
        "reshift_loop",
        "narrow",
        "narrow_rows_off",
        "pass_two_apart",
        "per_example",
        "command_buffers",
        "masked",
    }
    assert list(plan)[-1] == "masked"  # (last: a run cut short loses the least)
    assert plan["masked"]["micro"] == suite.MICRO[:1] and plan["masked"]["masks"] == suite.MASKS
    assert plan["reshift_loop"]["install"] == "_reshift_loop" and "install" not in plan["default"]
    assert plan["reshift_loop"]["micro"] == suite.MICRO and plan["reshift_loop"]["micro_libs"] == [
        "jaxbn",
        "copy",
    ]
    assert set(plan["reshift_loop"]["e2e"]) == set(plan["default"]["e2e"]) == set(suite.E2E_MODELS)
    assert plan["command_buffers"]["env"] == {"XLA_FLAGS": suite.COMMAND_BUFFER_FLAG}
    # the narrow-feature rows (measured on XLA:CPU only) against the axis summed as it is: one
    # 16-feature layer each, and the ResNet-20 (16 to 64 features) beside the default group's
    assert plan["narrow"]["micro"] == plan["narrow_rows_off"]["micro"] == [suite.MICRO_NARROW]
    assert suite.MICRO_NARROW[0][-1] * 4 <= 128  # (narrow enough for the rows)
    assert (
        plan["narrow_rows_off"]["install"] == "_feature_rows_off"
        and "install" not in plan["narrow"]
    )
    assert set(plan["narrow_rows_off"]["e2e"]) == {"resnet20"} and plan["narrow"]["e2e"] == {}
    # pass two's sums in one reduction (measured on XLA:CPU only) against two: the micro shapes
    assert plan["pass_two_apart"]["install"] == "_pass_two_apart"
    assert plan["pass_two_apart"]["micro"] == suite.MICRO and plan["pass_two_apart"]["e2e"] == {}
    # the per-example norms at a transformer's shape, in both dtypes
    assert plan["per_example"]["per_example"] == suite.PER_EXAMPLE
    assert {dtype for _, dtype in suite.PER_EXAMPLE} == {"bfloat16", "float32"}
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


def test_a_run_cut_short_keeps_the_groups_it_finished(tmp_path, monkeypatch):
    """The files are written after every group: a device command killed at its time limit (10
    minutes) still leaves what the finished groups measured."""
    suite = _suite()
    finished = {"environment": {}, "statistics": "s", "micro": [], "e2e": {}}
    calls = []

    def run(command, **kwargs):
        calls.append(command[command.index("--group") + 1])
        if len(calls) > 1:
            raise KeyboardInterrupt  # (what a kill at the limit looks like to this process)
        line = "GPU_SUITE_RESULT " + json.dumps(finished)
        return subprocess.CompletedProcess(command, 0, stdout=line + "\n", stderr="")

    monkeypatch.setattr(suite.subprocess, "run", run)
    with pytest.raises(KeyboardInterrupt):
        suite.main([str(tmp_path)])
    assert calls == list(suite._plan(smoke=False))[:2]
    assert json.loads((tmp_path / "gpu_suite.json").read_text()) == {calls[0]: finished}
    assert f"- statistics of `{calls[0]}`: `s`" in (tmp_path / "gpu_suite.md").read_text()


def test_the_rows_off_install_sums_narrow_features_as_they_are(monkeypatch):
    """``benchmarks/_feature_rows_off.py`` (the ``narrow_rows_off`` group): a 16-feature batch norm's
    statistics read x as it is, where the default reads it as rows of 128 elements."""
    import jax
    import jax.numpy as jnp

    import jaxbn
    from jaxbn import stats

    params, state = jaxbn.batch_norm_init(16)
    x = jnp.zeros((8, 4, 4, 16))

    def row_reshapes():
        jax.clear_caches()
        forward = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True))
        return hlo.feature_rows(forward.lower(x).as_text(dialect="hlo"), x.shape)

    assert row_reshapes()  # the default: rows of 8 feature vectors
    monkeypatch.setattr(stats, "LANES", stats.LANES)  # (restored after the test)
    _suite()._load("_feature_rows_off").install()
    assert stats.LANES == 0 and not row_reshapes()
    jax.clear_caches()


@pytest.mark.parametrize("masked", [False, True])
def test_pass_two_apart_install_takes_two_reductions_of_the_same_statistics(masked, monkeypatch):
    """``benchmarks/_pass_two_apart.py`` (the ``pass_two_apart`` group): pass two's sums as two
    reductions, where the default takes one over the two stacked; the statistics, outputs and
    gradients are the default's (the same sums, each reduced in XLA's order)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn
    from jaxbn import stats

    params, state = jaxbn.batch_norm_init(32)
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 32)) * 3 + 1e4
    mask = jnp.arange(16).reshape(-1, 1, 1, 1) % 3 > 0 if masked else None

    def run():
        jax.clear_caches()

        def loss(x, p):
            y, new_state = jaxbn.batch_norm(x, p, state, training=True, mask=mask)
            return jnp.sum(jnp.sin(y)), new_state

        step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        return step(x, params), len(hlo.reduced_shapes(hlo.compiled_text(step, x, params)))

    default, default_reductions = run()
    monkeypatch.setattr(stats, "pass_two_apart", stats.pass_two_apart)  # (restored after)
    _suite()._load("_pass_two_apart").install()
    apart, apart_reductions = run()
    jax.clear_caches()
    assert stats.pass_two_apart and apart_reductions == default_reductions + 1
    for got, want in zip(jax.tree.leaves(apart), jax.tree.leaves(default), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
