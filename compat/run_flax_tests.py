#!/usr/bin/env python
"""Run flax's own normalization tests against jaxbn's drop-in classes.

flax's test files are taken from the sdist of the installed flax version on
PyPI (downloaded with pip once, cached under ~/.cache/jaxbn-flax-tests), or
from ``--flax-tests DIR`` (a flax source tree: ``DIR/tests``, ``DIR/examples``,
``DIR/pyproject.toml``). pytest runs them with the plugin in
``jaxbn_flax_plugin.py``, which replaces flax.linen's and flax.nnx's
BatchNorm, LayerNorm, RMSNorm, GroupNorm and InstanceNorm with jaxbn's before
the test modules are imported (``--no-swap``: flax's own classes, the
baseline). Only tests that construct at least one of those classes count.

Usage::

    python compat/run_flax_tests.py                 # jaxbn's classes
    python compat/run_flax_tests.py --no-swap       # flax's classes (baseline)
    python compat/run_flax_tests.py --json out.json -- -x   # args after -- go to pytest

The exit status is 0 when every normalization test passed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxbn-flax-tests"

# flax's test files that construct a normalization class directly or through
# a flax module that holds one (MultiHeadAttention(normalize_qk=True) builds
# LayerNorms). Each file runs whole: the plugin, not a -k filter, decides
# which of its tests count. `--all` runs all of tests/ to re-check this list.
TEST_FILES = (
    "tests/linen/linen_test.py",
    "tests/linen/linen_module_test.py",
    "tests/linen/linen_transforms_test.py",
    "tests/linen/summary_test.py",
    "tests/nnx/bridge/wrappers_test.py",
    "tests/nnx/graph_utils_test.py",
    "tests/nnx/helpers_test.py",
    "tests/nnx/integration_test.py",
    "tests/nnx/module_test.py",
    "tests/nnx/nn/attention_test.py",
    "tests/nnx/nn/linear_test.py",
    "tests/nnx/nn/normalization_test.py",
    "tests/nnx/summary_test.py",
    "tests/nnx/transforms_test.py",
)
# Examples' tests, one pytest session per example as flax's CI runs them (their
# module names collide, and imagenet's test changes a global jax option at import).
EXAMPLE_FILES = ("examples/gemma/helpers_test.py", "examples/imagenet/models_test.py")
# Tests jaxbn fails on purpose, each with the reason. They still run and are
# reported; they do not make the exit status non-zero.
_WORDING = (
    "asserts flax's exact error message; jaxbn raises the same ValueError with its own wording"
)
_ACCURACY = (
    "its expected values are a float32 formula less accurate than jaxbn (against float64 on the "
    "same input: jaxbn's error {ours}, the reference's {theirs}, the tolerance {tol})"
)
EXCLUDED = {
    "tests/linen/linen_test.py::NormalizationTest::test_instance_norm_raise_error0": _WORDING,
    "tests/linen/linen_test.py::NormalizationTest::test_instance_norm_raise_error1": _WORDING,
    "tests/linen/linen_test.py::NormalizationTest::test_instance_norm_raise_error2": _WORDING,
    "tests/linen/linen_test.py::NormalizationTest::test_instance_norm_raise_error3": _WORDING,
    "tests/linen/linen_test.py::NormalizationTest::test_layer_norm4": _ACCURACY.format(
        ours="1.2e-7", theirs="3.7e-2", tol="1e-3"
    ),
    "tests/linen/linen_test.py::NormalizationTest::test_instance_norm3": _ACCURACY.format(
        ours="3.5e-7", theirs="1.0e-3", tol="1e-6"
    ),
}
# flax's CI runs tests/ with 4 host devices (tests/run_all_tests.sh).
XLA_FLAGS = "--xla_force_host_platform_device_count=4"


def flax_sources(version: str) -> Path:
    """A directory with flax ``version``'s tests/, examples/ and pyproject.toml, from the PyPI sdist."""
    root = CACHE / f"flax-{version}"
    if (root / "tests").is_dir():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"flax=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("flax-*.tar.gz")
        staging = Path(tmp) / "extract"
        with tarfile.open(sdist) as tar:
            top = f"flax-{version}/"
            # Only what the tests need: not flax/ itself, so `import flax` stays the installed one.
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith((top + "tests/", top + "examples/"))
                or m.name == top + "pyproject.toml"
            ]
            tar.extractall(staging, members=members, filter="data")
        if not (staging / top / "tests").is_dir():
            sys.exit(
                f"the flax {version} sdist has no tests/; pass --flax-tests with a flax checkout"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging / top, root)
    return root


def run_session(root: Path, files: list[str], mode: str, workers: int, extra: list[str]) -> dict:
    """One pytest process over ``files`` (paths relative to ``root``); returns the plugin's per-test results."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = Path(f.name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "jaxbn_flax_plugin",
        f"--jaxbn-mode={mode}",
        f"--jaxbn-report={report}",
        # flax's own pytest settings (filterwarnings=error among them), nothing of jaxbn's
        "-c",
        str(root / "pyproject.toml"),
        "--rootdir",
        str(root),
        "-p",
        "no:cacheprovider",
        "-q",
        "--tb=short",
        *(["-n", str(workers)] if workers > 1 else []),
        *extra,
        *(str(root / f) for f in files),
    ]
    print("$", " ".join(command), flush=True)
    # Run from tests/, not the tree's root: the working directory goes on
    # sys.path, and a flax checkout's flax/ there would shadow the installed flax.
    subprocess.run(
        command, cwd=root / "tests", env=env
    )  # a failing test is a result, not an error here
    try:
        return json.loads(report.read_text())["tests"] if report.stat().st_size else {}
    finally:
        report.unlink()


def summarize(tests: dict, mode: str) -> bool:
    """Print the counts and each failure; True when every normalization test passed."""
    norm = {nodeid: t for nodeid, t in tests.items() if t["constructed"]}
    outcomes = [t["outcome"] for t in norm.values()]
    print(
        f"\n=== flax's tests with {'jaxbn' if mode == 'swap' else 'flax'}'s normalization classes ==="
    )
    print(f"normalization tests: {len(norm)}")
    for outcome in ("passed", "failed", "skipped"):
        print(f"  {outcome}: {outcomes.count(outcome)}")
    failed = [(nodeid, t) for nodeid, t in sorted(norm.items()) if t["outcome"] == "failed"]
    if mode == "swap":
        excluded = [nodeid for nodeid, _ in failed if nodeid in EXCLUDED]
        failed = [(nodeid, t) for nodeid, t in failed if nodeid not in EXCLUDED]
        print(f"  of the failed, excluded on purpose: {len(excluded)}")
        for nodeid in excluded:
            print(f"EXCLUDED {nodeid}: {EXCLUDED[nodeid]}")
    for nodeid, test in failed:
        print(f"FAILED {nodeid}")
        for failure in test["failures"]:
            jaxbn_frames = [f for f in failure["frames"] if "/jaxbn/" in f]
            where = f"  [raised in {jaxbn_frames[-1]}]" if jaxbn_frames else ""
            phase = "" if failure["when"] == "call" else f"({failure['when']}) "
            print(f"    {phase}{failure['error']}{where}")
    broken = sorted(nodeid for nodeid, t in tests.items() if t["outcome"] == "collection-error")
    for nodeid in broken:  # a file that did not import hides its tests from the counts
        print(f"COLLECTION ERROR {nodeid}: {tests[nodeid]['failures'][0]['error']}")
    # Tests that construct no normalization class are not counted, but one of
    # them failing means a failure leaked state into the rest of its process.
    others = sorted(
        nodeid for nodeid, t in tests.items() if not t["constructed"] and t["outcome"] == "failed"
    )
    for nodeid in others:
        print(f"OTHER FAILED {nodeid}: {tests[nodeid]['failures'][0]['error']}")
    unswapped = sorted(nodeid for nodeid, t in tests.items() if t["unswapped"])
    for nodeid in unswapped:
        print(f"UNSWAPPED {nodeid}: constructed {', '.join(tests[nodeid]['unswapped'])}")
    return not failed and not broken and not others and not unswapped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--flax-tests", type=Path, help="flax source tree with tests/ (default: the PyPI sdist)"
    )
    parser.add_argument("--no-swap", action="store_true", help="baseline: keep flax's own classes")
    parser.add_argument(
        "-n", "--workers", type=int, default=2, help="pytest-xdist workers (1: serial)"
    )
    parser.add_argument(
        "--all", action="store_true", help="run all of flax's tests/, not only the listed files"
    )
    parser.add_argument("--no-examples", action="store_true", help="skip the examples' tests")
    parser.add_argument("--json", type=Path, help="also write the per-test results here")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()

    root = args.flax_tests or flax_sources(importlib.metadata.version("flax"))
    if not (root / "tests").is_dir():
        parser.error(f"{root} has no tests/ directory")
    mode = "flax" if args.no_swap else "swap"
    workers = args.workers
    if workers > 1 and importlib.util.find_spec("xdist") is None:
        print("pytest-xdist is not installed: running serially")
        workers = 1

    tests = run_session(
        root, ["tests"] if args.all else list(TEST_FILES), mode, workers, args.pytest_args
    )
    if not args.no_examples:
        for example in EXAMPLE_FILES:
            if (root / example).exists():
                tests |= run_session(root, [example], mode, 1, args.pytest_args)

    if args.json:
        args.json.write_text(json.dumps({"mode": mode, "tests": tests}, indent=1))
    return 0 if summarize(tests, mode) else 1


if __name__ == "__main__":
    sys.exit(main())
