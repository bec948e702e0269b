"""pytest plugin: run flax's own tests with flax's normalization classes swapped for jaxbn's.

Loaded with ``-p jaxbn_flax_plugin`` (this directory on ``sys.path``); it is
not a conftest, so nothing outside flax's test files is collected. Options:

``--jaxbn-mode=swap`` (default)
    Before any test module is imported, every reference to
    ``flax.linen.{BatchNorm,LayerNorm,RMSNorm,GroupNorm,InstanceNorm}`` and
    ``flax.nnx.{...}`` held by a ``flax.*`` module (``flax.linen``,
    ``flax.linen.normalization``, ``flax.linen.attention``, ``flax.nnx``,
    ``flax.nnx.nn.normalization``, ``flax.nnx.nn.attention``, ...) is replaced
    by the class of the same name in :mod:`jaxbn.linen` / :mod:`jaxbn.nnx`.
    The jaxbn classes themselves are used, not subclasses, so their names
    (``BatchNorm_0``), ``isinstance`` checks and ``type(...) is`` checks are
    jaxbn's.
``--jaxbn-mode=flax``
    The baseline: flax's classes are left in place.
``--jaxbn-report=PATH``
    Where the controlling process writes the per-test results as JSON.

In both modes the constructor of every class that the tests should see (jaxbn's
when swapping, flax's otherwise) records each construction under the id of
the test that is running; a test that constructs none is not a normalization
test and is left out of the counts. When swapping, flax's original classes
record too, so a test that still reaches one through a path the swap missed
shows up in the report (``unswapped``).

One piece of isolation is added: ``flax.nnx.tabulate`` replaces methods on
the classes of the module it summarizes and puts them back only when the
summarized call succeeds. After a call that raises, every later test in that
process would run through tabulate's wrappers and fail
(``'RngStream' object has no attribute '_nnx_tabulate_id'``), so the class
attributes tabulate touched are restored after each test.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import pytest

NAMES = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")

# nodeid of the test whose setup/call/teardown is running in this process.
_current_test: str | None = None
# nodeid -> {"constructed": set of class labels, "unswapped": set of class labels}
_constructed: dict[str, dict[str, set[str]]] = {}
# flax's original class -> jaxbn's replacement (empty in baseline mode)
_replacements: dict[type, type] = {}
# (class, attribute) -> its value in the class's __dict__ before nnx.tabulate
# replaced it in the running test (_MISSING: it was inherited)
_tabulated: dict[tuple[type, str], Any] = {}
_MISSING = object()


def _label(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _record(kind: str, obj: Any) -> None:
    if _current_test is not None:
        entry = _constructed.setdefault(_current_test, {"constructed": set(), "unswapped": set()})
        entry[kind].add(_label(type(obj)))


def _record_constructions(cls: type, kind: str, *, linen: bool) -> None:
    """Make ``cls`` call :func:`_record` whenever an instance is constructed.

    The class object is patched in place (no wrapper class), so names and
    identity checks are unaffected. Linen modules are dataclasses whose
    generated ``__init__`` ends with ``__post_init__``, which subclasses
    inherit even when they regenerate ``__init__``; NNX modules run
    ``__init__``, which subclasses reach through ``super().__init__``.
    """
    method = "__post_init__" if linen else "__init__"
    original = getattr(cls, method)
    if getattr(original, "_jaxbn_compat_recorder", False):
        return  # already patched

    @functools.wraps(original)
    def recording(self, *args, **kwargs):
        _record(kind, self)
        return original(self, *args, **kwargs)

    recording._jaxbn_compat_recorder = True
    setattr(cls, method, recording)


def _guard_nnx_tabulate() -> None:
    """Note what ``flax.nnx.tabulate`` overwrites, so that :func:`_undo_nnx_tabulate` can restore it."""
    from flax.nnx import summary

    overwrite = summary._overwrite_methods

    @functools.wraps(overwrite)
    def noting_overwrite(env):
        for cls, name in env:
            _tabulated.setdefault((cls, name), cls.__dict__.get(name, _MISSING))
        return overwrite(env)

    summary._overwrite_methods = noting_overwrite


def _undo_nnx_tabulate() -> None:
    for (cls, name), value in _tabulated.items():
        if value is not _MISSING:
            setattr(cls, name, value)
        elif name in cls.__dict__:
            delattr(cls, name)
    _tabulated.clear()


def _swap_references() -> int:
    """Point every ``flax.*`` module attribute that holds an original class at its replacement.

    Scans all loaded flax modules rather than a fixed list of re-export sites,
    and is re-run before each test module is collected and before each test,
    so flax modules imported later (lazily, or by the tests) are covered too.
    Returns the number of attributes replaced.
    """
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "flax" or name.startswith("flax.")):
            continue
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for attr, value in list(namespace.items()):
            try:
                replacement = _replacements.get(value)
            except Exception:  # unhashable (or oddly hashing) attribute value
                continue
            if replacement is not None:
                setattr(module, attr, replacement)
                count += 1
    return count


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jaxbn", "jaxbn: flax's tests with jaxbn's normalization classes")
    group.addoption(
        "--jaxbn-mode",
        choices=("swap", "flax"),
        default="swap",
        help="swap: replace flax's normalization classes with jaxbn's (default); flax: baseline, no swap",
    )
    group.addoption(
        "--jaxbn-report", default=None, help="write per-test results as JSON to this path"
    )


def pytest_configure(config: pytest.Config) -> None:
    # Import everything that defines or re-exports the classes before any test
    # module can bind a name to flax's originals.
    import flax.linen
    import flax.linen.normalization as linen_norm
    import flax.nnx
    import flax.nnx.nn.normalization as nnx_norm

    import jaxbn.linen
    import jaxbn.nnx

    swap = config.getoption("--jaxbn-mode") == "swap"
    for name in NAMES:
        pairs = (
            (getattr(linen_norm, name), getattr(jaxbn.linen, name), True),
            (getattr(nnx_norm, name), getattr(jaxbn.nnx, name), False),
        )
        for original, replacement, linen in pairs:
            if swap:
                _record_constructions(replacement, "constructed", linen=linen)
                _record_constructions(original, "unswapped", linen=linen)
                _replacements[original] = replacement
            else:
                _record_constructions(original, "constructed", linen=linen)
    _guard_nnx_tabulate()
    if swap:
        _swap_references()
        # The swap is the point of the run: fail loudly if it did not take.
        assert (
            flax.linen.BatchNorm is jaxbn.linen.BatchNorm
            and flax.nnx.BatchNorm is jaxbn.nnx.BatchNorm
        )
        # flax's settings turn every warning into an error; jaxbn's one deliberate warning
        # (a batch or instance with one value per feature, where flax is silent) is a
        # documented difference, not a failure.
        config.addinivalue_line("filterwarnings", "ignore::jaxbn.DegenerateBatchWarning")

    if not hasattr(config, "workerinput"):  # the controlling process (or the only one)
        config.pluginmanager.register(_Collector(config), "jaxbn_compat_collector")


def pytest_collectstart(collector: pytest.Collector) -> None:
    if _replacements:
        _swap_references()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _current_test
    if _replacements:
        _swap_references()
    _current_test = item.nodeid
    try:
        return (yield)
    finally:
        _current_test = None
        _undo_nnx_tabulate()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # Reports travel from pytest-xdist workers to the controller with their
    # user_properties, so the constructions ride along on each phase's report.
    report = yield
    entry = _constructed.get(item.nodeid)
    if entry:
        report.user_properties.append(
            ("jaxbn_compat", {kind: sorted(labels) for kind, labels in entry.items()})
        )
    return report


def _crash_line(report: pytest.TestReport) -> str:
    """The error as pytest's short summary shows it: the first line of the exception.

    When that line is only the exception's type (numpy's ``assert_allclose``
    starts its message with a newline), the message's first line is added.
    """
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        lines = [line.strip() for line in crash.message.strip().splitlines() if line.strip()]
        if lines[0].endswith(":") and len(lines) > 1:
            return f"{lines[0]} {lines[1]}"
        return lines[0]
    lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[0].removeprefix("E").strip()


def _frames(report: pytest.TestReport) -> list[str]:
    """``path:line`` of every traceback entry, outermost first (chained exceptions in order)."""
    longrepr = report.longrepr
    chain = getattr(longrepr, "chain", None)
    tracebacks = [tb for tb, _, _ in chain] if chain else [getattr(longrepr, "reprtraceback", None)]
    frames = []
    for traceback in tracebacks:
        for entry in getattr(traceback, "reprentries", None) or ():
            location = getattr(entry, "reprfileloc", None)
            if location is not None:
                frames.append(f"{location.path}:{location.lineno}")
    return frames


class _Collector:
    """Gathers every phase's report in the controlling process and writes the JSON."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.tests: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = self.tests.setdefault(
            report.nodeid, {"outcome": "passed", "constructed": [], "unswapped": [], "failures": []}
        )
        for key, value in report.user_properties:
            if key == "jaxbn_compat":
                for kind in ("constructed", "unswapped"):
                    test[kind] = sorted(set(test[kind]) | set(value[kind]))
        if report.failed:
            test["outcome"] = "failed"
            test["failures"].append(
                {
                    "when": report.when,
                    "error": _crash_line(report),
                    "frames": _frames(report),
                    "longrepr": report.longreprtext,
                }
            )
        elif report.skipped and test["outcome"] == "passed":
            test["outcome"] = "skipped"

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:  # a test file that does not import: reported, never silently dropped
            self.tests[report.nodeid or "<collection>"] = {
                "outcome": "collection-error",
                "constructed": [],
                "unswapped": [],
                "failures": [
                    {
                        "when": "collect",
                        "error": _crash_line(report),
                        "frames": [],
                        "longrepr": report.longreprtext,
                    }
                ],
            }

    def pytest_terminal_summary(self, terminalreporter) -> None:
        norm = {k: v for k, v in self.tests.items() if v["constructed"]}
        counts = {
            o: sum(v["outcome"] == o for v in norm.values())
            for o in ("passed", "failed", "skipped")
        }
        terminalreporter.write_sep(
            "=",
            f"jaxbn ({self.config.getoption('--jaxbn-mode')}): {len(norm)} normalization tests, "
            + ", ".join(f"{n} {o}" for o, n in counts.items()),
        )

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        path = self.config.getoption("--jaxbn-report")
        if path:
            with open(path, "w") as f:
                json.dump(
                    {"mode": self.config.getoption("--jaxbn-mode"), "tests": self.tests},
                    f,
                    indent=1,
                )
