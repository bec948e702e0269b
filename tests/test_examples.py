"""The examples run, learn, and show jaxbn matching flax where flax is right."""

import importlib.util
import math
import pathlib
import sys

import pytest

from tests.conftest import needs_devices

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared helpers: from common import ...


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_learns_and_jaxbn_matches_flax(capsys, tmp_path):
    """One epoch data-parallel over the 8 test devices: both BNs learn and agree; curves and table written."""
    pytest.importorskip("sklearn")
    results = _load("train_digits").main(["--norm", "all", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "8 cpu device(s)" in printed and "test accuracy" in printed
    assert results["jaxbn"]["test_accuracy"] > 0.85  # 0.95 measured after one epoch
    assert results["jaxbn"]["train_loss"] == pytest.approx(results["flax"]["train_loss"], rel=1e-3)
    assert results["jaxbn"]["test_accuracy"] == pytest.approx(results["flax"]["test_accuracy"], abs=3 / 360)
    assert set(results) == {"jaxbn", "flax", "none"}
    assert len(results["jaxbn"]["curves"]["test_accuracy"]) == 1
    assert (tmp_path / "train_digits.png").stat().st_size > 0
    assert "| jaxbn |" in (tmp_path / "train_digits.md").read_text()


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


def test_swa_recalibration_example_lowers_the_drift(capsys, tmp_path):
    """The SWA example runs; recalibrated statistics describe the averaged network better than stale ones."""
    pytest.importorskip("sklearn")
    results = _load("swa_recalibration").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert "SWA, recalibrated" in capsys.readouterr().out
    (rows,) = results.values()
    assert rows["SWA, recalibrated"]["drift"][0] < rows["SWA, stale statistics"]["drift"][0]
    assert all(row["test_accuracy"][0] > 0.8 for row in rows.values())
    assert (tmp_path / "swa_recalibration.png").stat().st_size > 0
    assert "What this shows" in (tmp_path / "swa_recalibration.md").read_text()


def test_convergence_and_learning_rate_example_runs_and_bn_learns(capsys, tmp_path):
    """The learning-rate sweep runs every setting: BatchNorm learns at the small lr, lr 30 diverges without it."""
    pytest.importorskip("sklearn")
    results = _load("convergence_and_learning_rate").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| lr | network |" in printed and "What this shows" in printed
    for setting in ("BatchNorm", "no BatchNorm"):
        for row in results[setting].values():
            assert len(row["final_accuracy"]) == 3  # the default seeds
            assert all(0.0 <= a <= 1.0 for a in row["final_accuracy"])
            assert all(s is None or s > 0 for s in row["steps_to_target"])
    small, large = sorted(results["BatchNorm"])
    assert min(results["BatchNorm"][small]["final_accuracy"]) > 0.7  # 0.94-0.97 measured
    assert not any(results["BatchNorm"][small]["diverged"])
    assert all(results["no BatchNorm"][large]["diverged"])  # lr 30, plain SGD
    for path in results["figures"]:
        assert path.parent == tmp_path and path.stat().st_size > 0
    report = (tmp_path / "convergence_and_learning_rate.md").read_text()
    assert "What this shows" in report and "](convergence_and_learning_rate_curves.png)" in report


def test_deep_network_example_runs_and_reports_gradients(capsys, tmp_path):
    """The deep-network example runs every setting; per-layer gradient norms come back, BatchNorm learns."""
    pytest.importorskip("sklearn")
    results = _load("deep_network").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| layers | network |" in printed and "What this shows" in printed
    (depth,) = [key for key in results if isinstance(key, int)]
    for network in ("BatchNorm", "no BatchNorm"):
        assert sorted(results[depth][network]) == [0.5, 1.0, 2.0]
        for row in results[depth][network].values():
            assert all(0.0 <= a <= 1.0 for a in row["test_accuracy"])
            assert all(len(norms) == depth + 1 for norms in row["grad_init"])  # the hidden layers and the head
            assert all(math.isfinite(n) and n > 0 for norms in row["grad_init"] for n in norms)
    bn = results[depth]["BatchNorm"][1.0]
    assert max(bn["final_loss"]) < 2.1 and min(bn["test_accuracy"]) > 0.3  # ~1.6 and ~0.55 measured
    for path in results["figures"]:
        assert path.parent == tmp_path and path.stat().st_size > 0
    report = (tmp_path / "deep_network.md").read_text()
    assert "What this shows" in report and "](deep_network_gradients.png)" in report


@needs_devices
def test_data_parallel_styles_equal_one_device_and_per_device_statistics_run(capsys, tmp_path):
    """--quick: jit, shard_map and pmap end where one device ends; synced and per-device runs, figure, report."""
    pytest.importorskip("sklearn")
    results = _load("data_parallel").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert "| pmap | 'data' |" in capsys.readouterr().out
    for style in ("jit", "shard_map", "pmap"):  # 10 steps: float32 rounding (measured 2e-7 relative)
        assert results["check"][style]["params_rel"] < 1e-5 and results["check"][style]["stats_rel"] < 1e-5
    assert results["check"]["pmap"]["loss"] == pytest.approx(results["check"]["one device"]["loss"], rel=1e-5)
    assert {synced for _, synced in results["sweep"]} == {True, False}
    for (_, synced), run in results["sweep"].items():
        assert len(run["accuracy"]) == 1 and len(run["curves"][0]) == 2  # 1 seed, 20 steps evaluated every 10
        assert 0.0 <= run["accuracy"][0] <= 1.0 and len(run["recalibrated"]) == (0 if synced else 1)
    assert results["sweep"][2, True]["accuracy"][0] > 0.5  # 0.9 measured after 20 steps
    assert (tmp_path / "data_parallel.png").stat().st_size > 0
    report = (tmp_path / "data_parallel.md").read_text()
    assert "](data_parallel.png)" in report and "What this shows" in report


def test_fold_for_inference_outputs_equal_and_timings_taken(capsys, tmp_path):
    """--quick: the folded CNN gives the unfolded eval-mode logits (float32) and predictions; both are timed."""
    pytest.importorskip("sklearn")
    results = _load("fold_for_inference").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert "speedup" in capsys.readouterr().out
    (check,) = results["check"]
    assert check["batch_norms_folded"] == 4
    assert check["max_abs_diff"] <= 1e-5 * max(check["max_abs_logit"], 1.0)  # 3e-7 of the largest logit measured
    assert check["same_predictions"] == check["n_test"]
    assert check["accuracy_folded"] == check["accuracy_unfolded"]
    assert set(results["timing"]) == {1, 16}
    for t in results["timing"].values():  # no speedup is asserted: timings depend on the machine
        assert t["unfolded_ms"] > 0 and t["folded_ms"] > 0 and t["speedup"] > 0
        assert t["folded_ops"][1] <= t["unfolded_ops"][1]  # no per-channel BatchNorm work added
    assert (tmp_path / "fold_for_inference.png").stat().st_size > 0
    report = (tmp_path / "fold_for_inference.md").read_text()
    assert "](fold_for_inference.png)" in report and "What this shows" in report


def test_small_batches_example_runs_every_normalization(capsys, tmp_path):
    """--quick (one batch size, one seed): every normalization trains; accuracies and train/inference gaps sane."""
    pytest.importorskip("sklearn")
    results = _load("small_batches").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| normalization | B=4 |" in printed and "| normalization | gap in | B=4 |" in printed
    assert set(results) == {"batch norm", "batch renorm", "ghost batches", "group norm", "layer norm", "none"}
    for norm, runs in results.items():
        (run,) = runs.values()
        assert all(0.0 <= a <= 1.0 for a in run["test_accuracy"])
        assert all(math.isfinite(v) for v in [*run["test_loss"], *run["final_train_loss"]])
        if norm in ("batch norm", "batch renorm", "ghost batches"):  # running averages minus batch statistics
            assert all(-1.0 <= g <= 1.0 for g in run["accuracy_gap"])
            assert all(math.isfinite(g) for g in run["loss_gap"])
        else:
            assert "accuracy_gap" not in run  # per-example statistics: nothing to compare
    assert results["batch norm"][4]["test_accuracy"][0] > 0.2  # 0.63 measured after 34 steps
    assert (tmp_path / "small_batches.png").stat().st_size > 0
    report = (tmp_path / "small_batches.md").read_text()
    assert "](small_batches.png)" in report and "What this shows" in report


def test_activations_example_runs_every_activation_and_placement(capsys, tmp_path):
    """--quick: relu/tanh/sigmoid x none/BN before/BN after train; drift, percentiles and figures come back."""
    pytest.importorskip("sklearn")
    rows = _load("activations").main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert "| activation | placement |" in capsys.readouterr().out
    assert set(rows) == {(a, p) for a in ("relu", "tanh", "sigmoid") for p in ("none", "BN before", "BN after")}
    for row in rows.values():
        assert all(0.0 <= a <= 1.0 for a in row["test_accuracy"])
        for key in ("shift", "scale", "late_shift", "late_scale"):
            assert all(math.isfinite(v) and v >= 0 for v in row[key])
        low, median, high = row["percentiles"][..., 0], row["percentiles"][..., 1], row["percentiles"][..., 2]
        assert (low <= median).all() and (median <= high).all()
    for activation in ("relu", "tanh", "sigmoid"):  # BN before pins the probe's mean: 0.003-0.009 vs 0.5-5 measured
        assert rows[activation, "BN before"]["shift"][0] < rows[activation, "none"]["shift"][0]
    report = (tmp_path / "activations.md").read_text()
    for name in ("activations_percentiles.png", "activations_training.png"):
        assert (tmp_path / name).stat().st_size > 0 and f"]({name})" in report
    assert "What this shows" in report


def test_common_helpers_examples_hold():
    """The >>> examples of examples/common.py (the helpers every example shares) give what they show."""
    import doctest

    import common

    result = doctest.testmod(common)
    assert result.attempted >= 3 and result.failed == 0
