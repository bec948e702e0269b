"""The examples run, learn, and show jaxbn matching flax where flax is right."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_learns_and_jaxbn_matches_flax(capsys):
    """One epoch data-parallel over the 8 test devices: both BNs learn and agree."""
    pytest.importorskip("sklearn")
    results = _load("train_digits").main(["--norm", "all", "--epochs", "1"])
    printed = capsys.readouterr().out
    assert "8 cpu device(s)" in printed and "test accuracy" in printed
    assert results["jaxbn"]["test_accuracy"] > 0.85  # 0.95 measured after one epoch
    assert results["jaxbn"]["train_loss"] == pytest.approx(results["flax"]["train_loss"], rel=1e-3)
    assert results["jaxbn"]["test_accuracy"] == pytest.approx(results["flax"]["test_accuracy"], abs=3 / 360)
    assert set(results) == {"jaxbn", "flax", "none"}


def test_accuracy_benchmark_runs_and_jaxbn_meets_the_bounds(capsys):
    """benchmarks/accuracy.py runs; jaxbn's rows meet the accuracy bounds at every offset."""
    spec = importlib.util.spec_from_file_location("accuracy", EXAMPLES.parent / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--shape", "16", "4", "4", "8"])
    assert "var rel. error" in capsys.readouterr().out
    for offset in module.OFFSETS:
        var_error, output_error = rows[("jaxbn", offset)]
        assert var_error <= 1e-5 and output_error <= 1e-4


def test_swa_recalibration_example_lowers_the_drift(capsys):
    """The SWA example runs; recalibrated statistics describe the averaged network better than stale ones."""
    pytest.importorskip("sklearn")
    results = _load("swa_recalibration").main(["--quick"])
    assert "SWA, recalibrated" in capsys.readouterr().out
    assert results["SWA, recalibrated"]["drift"] < results["SWA, stale statistics"]["drift"]
    assert all(row["test_accuracy"] > 0.8 for row in results.values())
