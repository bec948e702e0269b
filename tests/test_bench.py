"""benchmarks/bench.py --quick runs every section; missing optional libraries are reported.

The bench runs in a subprocess on one CPU device (its collectives section
starts its own child with 8 forced devices), so the 8-device XLA flag that
conftest.py sets for this process is removed from the child's environment.
Nothing here looks at times: they are noise on a shared machine.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test runs benchmarks/bench.py --quick in a subprocess

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
E2E = BENCH.with_name("e2e.py")
MODES = ("train forward", "forward+backward", "inference")
TRAFFIC = re.compile(r"^\d+\.\d\dS$")


def _run(*args, pythonpath=None):
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
    )
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )  # a hang fails; a loaded machine does not
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _section(output, title):
    """The header and rows of the first table titled ``## {title}...``, split into cells."""
    lines = output.split("\n## " + title, 1)[1].split("\n\n")[0].splitlines()[1:]
    return [re.split(r"\s{2,}", line.strip()) for line in lines]


@pytest.fixture(scope="module")
def quick_output():
    return _run(
        "--layouts", "NHWC"
    )  # NCHW: in test_quick_reports_missing_libraries_instead_of_failing


def test_quick_prints_the_header_and_a_timing_table_per_mode_and_dtype(quick_output):
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in quick_output
    assert "versions: jaxbn" in quick_output and "command:" in quick_output
    tables = re.findall(r"^## (.*), (float32|bfloat16): ms per call", quick_output, re.M)
    assert [(title.split(" (")[0], dtype) for title, dtype in tables] == [
        (mode, dtype) for mode in MODES for dtype in ("float32", "bfloat16")
    ]


def test_quick_timing_tables_have_ratio_columns_and_every_row(quick_output):
    for title, _ in re.findall(
        r"^## ((.*), (?:float32|bfloat16): ms per call.*)$", quick_output, re.M
    ):
        header, *rows = _section(quick_output, title)
        assert header[:5] == ["implementation", "layout", "median", "min", "max"]
        assert {"/flax.linen", "/torch CL", "/copy"} <= set(header)
        names = {(row[0], row[1]) for row in rows}
        assert {("jaxbn", "NHWC"), ("flax.linen", "NHWC"), ("copy: jax x*1.0001", "NHWC")} <= names
        flax = next(row for row in rows if row[0] == "flax.linen")
        assert flax[header.index("/flax.linen")] == "1.00"


def test_quick_traffic_section_has_jaxbn_rows_for_every_dtype_and_layout(quick_output):
    header, *rows = _section(quick_output, "HLO traffic")
    assert header[:3] == ["implementation", "dtype", "layout"] and len(header) == 12
    jaxbn = {(row[1], row[2]): row[3:] for row in rows if row[0] == "jaxbn"}
    assert set(jaxbn) == {(d, "NHWC") for d in ("float32", "bfloat16")}
    for cells in jaxbn.values():
        assert len(cells) == 9
        for traffic, kernels, temp in zip(cells[0::3], cells[1::3], cells[2::3]):
            assert TRAFFIC.match(traffic) and TRAFFIC.match(temp) and kernels.isdigit()
    # flax.linen's float32 traffic is 4S / 15S at large shapes; at the quick
    # shape the C-sized parameters add a few hundredths, so only its presence is pinned.
    flax = {(row[1], row[2]): row[3:] for row in rows if row[0] == "flax.linen"}
    assert TRAFFIC.match(flax["float32", "NHWC"][0]) and TRAFFIC.match(flax["float32", "NHWC"][3])


def test_quick_collectives_section_counts_every_mapping(quick_output):
    header, *rows = _section(quick_output, "collectives per direction on 8 cpu devices")
    assert header[:5] == ["implementation", "mapping", "train fwd", "fwd+bwd", "bwd"]
    for name in ("jaxbn", "flax.linen"):
        mappings = {row[1]: row[2:5] for row in rows if row[0] == name}
        assert set(mappings) == {"pmap", "shard_map", "jit-sharded", "jit-auto"}
        assert all(cell.isdigit() for cells in mappings.values() for cell in cells), mappings
    # jaxbn: one collective forward and one backward, whatever the mapping but Auto axes (whose
    # global sums the partitioner reduces, one all-reduce per pass: docs/multi_device.md)
    jaxbn = {row[1]: row[2:5] for row in rows if row[0] == "jaxbn"}
    for mapping in ("pmap", "shard_map", "jit-sharded"):
        assert jaxbn[mapping] == ["1", "2", "1"], (mapping, jaxbn[mapping])


def test_quick_reports_missing_libraries_instead_of_failing(tmp_path):
    for name in ("equinox", "haiku"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('No module named {name}', name='{name}')\n"
        )
    output = _run(
        "--libs",
        "jaxbn",
        "equinox",
        "haiku",
        "copy",
        "--dtypes",
        "float32",
        "--layouts",
        "NCHW",
        pythonpath=tmp_path,
    )
    _, *rows = _section(output, "train forward (y + new running stats), float32")
    notes = {row[0]: row[-1] for row in rows if row[1] == "NCHW"}
    assert "jaxbn" in notes  # the NCHW path, timed
    assert notes["equinox"] == "equinox not installed" and notes["haiku"] == "haiku not installed"
    assert "## HLO traffic" in output and "## collectives per direction" in output


def test_quick_masked_run_times_the_libraries_that_take_a_mask(quick_output):
    """--mask gives the training modes a mask (an argument of each jitted step): jaxbn and flax
    are timed with it, libraries without one say so, inference runs as without a mask."""
    output = _run(
        "--libs", "jaxbn", "flax", "nnx", "torch", "--dtypes", "float32", "--layouts", "NHWC",
        "--mask", "positions",
    )  # fmt: skip
    assert "mask (training modes): of positions, 90% valid" in output
    for mode in MODES:
        title = next(
            t for t in re.findall(r"^## (.*), float32: ms", output, re.M) if t.startswith(mode)
        )
        _, *rows = _section(output, f"{title}, float32")
        notes = {row[0]: row for row in rows}
        for name in ("jaxbn", "flax.linen", "flax.nnx"):
            assert float(notes[name][2]) > 0, notes[name]
        torch = notes["torch BatchNorm2d"]
        assert (torch[-1] == "takes no mask") == (mode != "inference"), torch
    # the mask reached jaxbn: its masked training forward moves more than its unmasked one
    traffic = [
        {row[0]: row[3] for row in _section(out, "HLO traffic")[1:] if row[1] == "float32"}
        for out in (quick_output, output)
    ]
    assert float(traffic[1]["jaxbn"][:-1]) > float(traffic[0]["jaxbn"][:-1]), traffic


@pytest.mark.slow  # runs benchmarks/e2e.py in a subprocess
def test_e2e_times_the_measuring_variants_of_jaxbn_beside_the_others():
    """--without-cpu-barriers and --compute-dtype-barrier-views add jaxbn variants compiled with
    stats.cpu_barrier the identity and with the barriers on float32 views: timed beside the others,
    the same computation (in float32, the same last loss), their ratios printed."""
    flags = ["--without-cpu-barriers", "--compute-dtype-barrier-views"]
    done = subprocess.run(
        [sys.executable, str(E2E), "--quick", "--reps", "2", *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )  # ~50 s quiet; a hang fails, a loaded machine does not
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("## train step")[1].splitlines()
    names = ("jaxbn, no barriers", "jaxbn, wide views", "jaxbn ", "flax ")
    rows = {line[:18].strip(): line.split() for line in table if line.startswith(names)}
    assert set(rows) == {"jaxbn", "flax", "jaxbn, no barriers", "jaxbn, wide views"}, done.stdout
    for name in ("jaxbn, no barriers", "jaxbn, wide views"):
        assert rows[name][-1] == rows["jaxbn"][-1]  # the last loss, as printed
        assert f"step time {name} / flax: " in done.stdout


@pytest.mark.slow  # compiles a model and clears JAX's caches in the test process
@pytest.mark.parametrize(
    "variant", ["compiled_without_cpu_barriers", "compiled_with_wide_barrier_views"]
)
def test_measuring_variants_restore_the_library(variant):
    """A measuring variant changes jaxbn.stats only while it compiles."""
    import argparse

    from benchmarks import e2e
    from jaxbn import stats

    before = (stats.cpu_barrier, stats.barrier_views_in_compute_dtype)
    args = argparse.Namespace(batch=2, image_size=4, width=2, blocks=1)
    built, _ = e2e.build("jaxbn", "bfloat16", args)
    compiled = getattr(e2e, variant)(built)
    assert (stats.cpu_barrier, stats.barrier_views_in_compute_dtype) == before
    assert compiled.step is not built.step
    compiled.run()
    assert np.isfinite(float(compiled.losses[-1]))


@pytest.mark.slow  # runs benchmarks/bench.py and benchmarks/kernels.py in subprocesses
def test_the_measuring_flags_of_bench_and_kernels_run():
    """bench.py --compute-dtype-barrier-views says so in its header and times jaxbn; kernels.py
    --e2e profiles every variant it is asked for, --compile both compilations (nothing here looks
    at the times)."""
    output = _run(
        "--libs", "jaxbn", "--dtypes", "bfloat16", "--layouts", "NHWC",
        "--compute-dtype-barrier-views",
    )  # fmt: skip
    assert "jaxbn: measuring variant, XLA:CPU's barriers on float32 views" in output
    _, *rows = _section(output, "forward+backward (y, dx, dscale, dbias; dy an argument), bfloat16")
    row = next(row for row in rows if row[0] == "jaxbn")
    assert float(row[2]) > 0, row
    kernels = BENCH.with_name("kernels.py")
    done = subprocess.run(
        [sys.executable, str(kernels), "--quick", "--e2e", "--dtype", "bfloat16",
         "--without-cpu-barriers", "--compute-dtype-barrier-views"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip  # ~30 s quiet
    assert done.returncode == 0, done.stderr[-3000:]
    header = "| kind | jaxbn | flax | none | jaxbn, no barriers | jaxbn, wide views |"
    assert header in done.stdout and "by module" in done.stdout, done.stdout[-3000:]
    done = subprocess.run(
        [sys.executable, str(kernels), "--quick", "--compile", "--top", "5"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # ~15 s quiet
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| event | jaxbn ms | flax ms | difference |" in done.stdout, done.stdout[-3000:]
    assert re.search(r"^compile, s: jaxbn \d+\.\d+, flax \d+\.\d+$", done.stdout, re.M), done.stdout
