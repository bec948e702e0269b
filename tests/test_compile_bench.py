"""benchmarks/compile.py --quick measures every row, for jaxbn and for flax.

The benchmark runs in this process (imported from its file). Nothing here
looks at how long anything took, nor at a ratio: they are noise on a shared
machine. Only that each measurement exists, is positive, and that the
benchmark's own loss check passed (jaxbn and flax compiled the same step).
"""

import importlib.util
import json
import logging
import pathlib
import sys

import jax
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "compile.py"
NORMS = ("jaxbn", "flax")
FAMILIES = ("linen", "nnx")
EAGER_ROWS = {
    "functional batch_norm vs flax.linen BatchNorm apply",
    "linen BatchNorm apply",
    "nnx BatchNorm call",
    "layer_norm vs flax.linen LayerNorm apply",
}


# A loop counting to 10: 3 instructions in ENTRY, 4 in the condition, 5 in the body.
LOOP_HLO = """HloModule loop

%body (p: (s32[])) -> (s32[]) {
  %p = (s32[]) parameter(0)
  %gte = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %add = s32[] add(%gte, %one)
  ROOT %t = (s32[]) tuple(%add)
}

%cond (p: (s32[])) -> pred[] {
  %p = (s32[]) parameter(0)
  %gte = s32[] get-tuple-element(%p), index=0
  %ten = s32[] constant(10)
  ROOT %lt = pred[] compare(%gte, %ten), direction=LT
}

ENTRY %main (x: s32[]) -> (s32[]) {
  %x = s32[] parameter(0)
  %t = (s32[]) tuple(%x)
  ROOT %w = (s32[]) while(%t), condition=%cond, body=%body
}
"""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compile_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_bench") / "results.json"
    log_compiles, propagate = jax.config.jax_log_compiles, logging.getLogger("jax").propagate
    results = bench.main(["--quick", "--json", str(path)])
    # the eager section switches JAX's compile log on for its own counting, and off again
    assert (
        jax.config.jax_log_compiles == log_compiles
        and logging.getLogger("jax").propagate == propagate
    )
    return results, json.loads(path.read_text())


def test_instruction_counter_counts_every_line_of_every_computation_and_those_in_loops(bench):
    opcodes = bench.hlo_instructions(LOOP_HLO)
    assert sum(opcodes.values()) == 12 and opcodes["while"] == 1 and opcodes["parameter"] == 3
    assert bench.loop_instructions(LOOP_HLO) == 9


@pytest.mark.slow  # runs benchmarks/compile.py --quick
def test_every_compile_row_has_positive_times_and_instruction_counts(quick):
    results, _ = quick
    for family in FAMILIES:
        rows = results["compile"][family]
        for norm in NORMS:
            row = rows[norm]
            assert row["lower_s"] > 0 and row["compile_s"] > 0, (family, norm, row)
            assert row["compile_cpu_s"] > 0, (family, norm, row)
            assert (
                len(row["lower_s_all"]) == len(row["compile_s_all"]) == 1
            )  # --quick: one repetition
            assert row["compile_cpu_s_all"] == [row["compile_cpu_s"]]
            assert row["instructions"] > 0 and row["instructions"] == sum(row["opcodes"].values())
            assert 0 <= row["in_loops"] < row["instructions"]
            assert row["whiles"] >= 0 and row["opcodes"].get("fusion", 0) > 0
        assert set(rows["ratios"]) == {"lower", "compile", "instructions"}
        assert all(ratio > 0 for ratio in rows["ratios"].values())
        # (one repetition: its own ratio is the ratio of the medians)
        readings = rows["compile_readings"]
        assert set(readings) == {"cpu", "paired"} and readings["cpu"] > 0
        assert readings["paired"] == pytest.approx(rows["ratios"]["compile"])
        check = rows["loss_check"]
        assert check["same_init"] and check["passed"], check


@pytest.mark.slow  # runs benchmarks/compile.py --quick
def test_every_eager_row_has_both_libraries_timed_and_counted(quick):
    results, _ = quick
    assert set(results["eager"]) == EAGER_ROWS
    for row in results["eager"].values():
        for norm in NORMS:
            assert row[norm]["ms"] > 0 and row[norm]["ms_min"] > 0
            for misses in ("warmup_traces", "warmup_compiles", "traces", "compiles"):
                assert isinstance(row[norm][misses], int) and row[norm][misses] >= 0
        assert row["ratio"] > 0


@pytest.mark.slow  # runs benchmarks/compile.py --quick
def test_targets_cover_every_ratio_and_the_json_holds_the_results(quick):
    results, written = quick
    assert [t["metric"] for t in results["targets"]] == ["compile", "lower", "instructions"] * 2 + [
        "eager"
    ] * 4
    assert all(t["ratio"] > 0 and isinstance(t["held"], bool) for t in results["targets"])
    assert written["targets"] == results["targets"]
    assert set(written["compile"]) == set(FAMILIES) and set(written["eager"]) == EAGER_ROWS
    environment = written["environment"]
    assert {"jax", "jaxlib", "flax"} <= set(environment["versions"])
    assert (
        environment["backend"]
        and environment["device"]
        and environment["cpus"]
        and environment["date"]
    )
    assert written["model"]["batch_norms"] == 17  # --quick: one bottleneck block per stage
