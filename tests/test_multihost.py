"""Multi-host training for real: several local processes joined by jax.distributed on CPU.

``examples/multihost.py`` is launched as 2 processes x 4 CPU devices, and as
3 processes x 4 devices whose processes hold 16, 9 and 3 valid examples of 16
(masks). Each process trains the same BN model for a few steps in all three
styles (jit with shardings and ``axis_name=None``, on a mesh of Auto and of
explicit axes; shard_map and pmap with ``axis_name``) inside one JAX process start, and writes its results to
``tmp_path``. Every process and style must end with the parameters, running
statistics and losses of ONE process on ONE device training on the same global
batch (run here, in the test process), and the first step's running
statistics must be the count-weighted ones of a float64 NumPy reference.

Tolerance: rtol 1e-6, and atol 1e-6 times the larger of 1 and the array's
largest magnitude (the data, parameters and statistics are of order 1). The
distributed runs sum in another order than one device, so float32 rounding
differs (up to 1.3e-7 absolute measured after three steps). A purely relative
1e-6 per element would not be meaningful: some values are near 0 (the output
bias, -0.04, is a sum of cancelling errors: 8e-7 relative, 3.4e-8 absolute).
"""

import functools
import importlib.util
import os
import pathlib
import re

import jax
import numpy as np
import pytest

from tests import reference

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "multihost.py"
STEPS, BATCH = 3, 48
RTOL = 1e-6
# (processes, valid examples per process or None for no mask)
pytestmark = pytest.mark.slow  # every test launches jax.distributed processes

CASES = {"2_processes": (2, None), "3_processes_uneven_masks": (3, (16, 9, 3))}


@functools.cache
def _example():
    spec = importlib.util.spec_from_file_location("multihost", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _single_process(valid):
    """The reference: plain jit on one device of this process, the same global batch."""
    return _example().train(
        "jit", steps=STEPS, batch=BATCH, valid=valid, seed=0, devices=jax.devices()[:1]
    )


def _assert_close(actual, expected, msg):
    atol = RTOL * max(1.0, np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=msg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_process_and_style_matches_one_process(case, tmp_path):
    """2x4 and 3x4 (uneven masks) processes: jit (Auto and explicit axes), shard_map and pmap
    results equal one device's."""
    example = _example()
    num_processes, valid = CASES[case]
    argv = ["--steps", str(STEPS), "--batch", str(BATCH)]
    if valid is not None:
        argv += ["--valid", ",".join(map(str, valid))]
    results = example.launch(num_processes, argv, str(tmp_path), cpu_devices=4, timeout=120)

    for k in range(num_processes):
        printed = (tmp_path / f"process_{k}.out").read_text()
        assert (
            f"process {k}/{num_processes}: 4 local, {4 * num_processes} global cpu devices"
            in printed
        )

    # The first step's running statistics: count-weighted over all valid examples (float64).
    x, _, mask = example.global_batch(0, BATCH, valid, seed=0)
    kernel = np.asarray(
        example.init_variables(BATCH, valid, 0)["params"]["Dense_0"]["kernel"], np.float64
    )
    hidden = x.astype(np.float64) @ kernel
    mean, var = reference.batch_stats(hidden[mask] if mask is not None else hidden, -1)
    momentum = example.BN_MOMENTUM
    expected_step1 = {"mean": (1 - momentum) * mean, "var": momentum + (1 - momentum) * var}
    if valid is not None:
        # The data tell count weighting from averaging per-process means.
        blocks = np.split(hidden, num_processes)
        per_process = np.mean([b[:v].mean(0) for b, v in zip(blocks, valid)], 0)
        assert np.max(np.abs(per_process - mean)) > 0.1

    single = _single_process(valid)
    for key in ("mean", "var"):
        _assert_close(
            single[f"step1_batch_stats/BatchNorm_0/{key}"],
            expected_step1[key],
            f"one device: {key}",
        )
    assert single["loss"][-1] < single["loss"][0]  # it trains

    for k, per_style in enumerate(results):
        assert sorted(per_style) == sorted(example.MODES)
        for style, result in per_style.items():
            assert sorted(result) == sorted(single)
            for key, expected in single.items():
                _assert_close(
                    result[key], expected, f"process {k} of {num_processes}, {style}: {key}"
                )


def test_launch_timeout_kills_every_child(tmp_path):
    """A launch past its timeout raises with the children's stderr and leaves no process behind."""
    with pytest.raises(RuntimeError, match=r"exit codes \[-9, -9\]") as info:
        _example().launch(2, ["--steps", "1"], str(tmp_path), timeout=0.5)
    assert "process 1 stderr" in str(info.value)
    pids = [int(p) for p in re.search(r"pids \[([\d, ]+)\]", str(info.value)).group(1).split(",")]
    for pid in pids:  # each child led its own process group; the whole group is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
