"""benchmarks/e2e.py --quick runs in-process: all three variants time, the loss check passes.

Nothing here looks at how long a step took: times are noise on a shared
machine. The benchmark only jits on the default device, so the 8 forced CPU
devices that conftest.py sets do not change what it runs.
"""

import importlib.util
import math
import pathlib
import sys

E2E = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "e2e.py"


def test_quick_run_times_every_variant_and_passes_the_loss_check(capsys, monkeypatch):
    """--quick returns a finite median per variant and a passed jaxbn-vs-flax loss check."""
    spec = importlib.util.spec_from_file_location("e2e", E2E)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks the module up there
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    printed = capsys.readouterr().out
    assert set(result["median_s"]) == {"jaxbn", "flax", "none"}
    assert all(math.isfinite(seconds) for seconds in result["median_s"].values())
    check = result["loss_check"]
    assert check["passed"] and check["same_init"]
    assert len(check["jaxbn"]) == len(check["flax"]) == module.CHECK_STEPS
    assert "initial variables identical: yes" in printed and "): passed" in printed
    assert "BN overhead jaxbn / flax" in printed
