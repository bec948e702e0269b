"""The documentation's code runs, and the site builds without a warning.

Each page of the site (``docs/**/*.md`` and the repository's Markdown files that ``docs/conf.py``
includes, but the README, whose blocks ``tests/test_readme.py`` runs) has its ``python`` blocks
executed in order in one fresh namespace, as a reader who copies them one after the other would.
The blocks run in this process, which has the 8 forced CPU devices of ``conftest.py`` that the
multi-device page needs. Pages that take more than a few seconds run in the slow tier.

Every fenced block on a ``docs/`` page names its language: ``python`` (run here), ``bash`` or
``text`` (not run), or a MyST directive such as ``{eval-rst}`` or ``{toctree}``.
"""

import ast
import glob
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: A fenced block: its indentation, fence, info string (language) and body.
FENCE = re.compile(
    r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ ]*$",
    re.M | re.S,
)

#: The languages a docs/ page may tag a block with, besides MyST directives ({eval-rst}, {toctree}, ...).
LANGUAGES = {"python", "bash", "text"}

#: The pages whose blocks together take at most a few seconds (2 busy cores); every other page with
#: Python blocks runs in the slow tier, pages added later included, until measured and listed here.
FAST = {"docs/multi_device.md"}


def _included_pages() -> list[str]:
    """The source pages ``docs/conf.py`` names in ``include_patterns``, relative to the repository root."""
    tree = ast.parse((DOCS / "conf.py").read_text())
    patterns = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "include_patterns" for t in node.targets)
    )
    pages = set()
    for pattern in patterns:
        pattern = pattern + "/*.md" if pattern.endswith("**") else pattern
        pages.update(glob.glob(pattern, root_dir=ROOT, recursive=True))
    return sorted(p for p in pages if p.endswith(".md") and not p.startswith("docs/_build"))


PAGES = _included_pages()
SITE_PAGES = [page for page in PAGES if page != "README.md"]


def blocks(page: str) -> list[tuple[str, int, str]]:
    """``(language, line of the body's first line, body)`` of each fenced block of a page."""
    text = (ROOT / page).read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        body = "".join(
            row[len(match["indent"]) :] for row in match["body"].splitlines(keepends=True)
        )
        found.append((match["info"].strip().split(" ")[0], line, body))
    return found


def run_page(page: str) -> None:
    """Runs a page's python blocks in order in one namespace; a failure names the page and line."""
    namespace = {"__name__": "__docs__"}
    for language, line, body in blocks(page):
        if language == "python":
            # padded so that a traceback names the line of the page
            exec(compile("\n" * (line - 1) + body, str(ROOT / page), "exec"), namespace)


def _python_pages(fast: bool) -> list[str]:
    return [
        page
        for page in SITE_PAGES
        if any(lang == "python" for lang, _, _ in blocks(page)) and (page in FAST) == fast
    ]


def test_the_site_has_its_pages():
    expected = {
        "docs/index.md",
        "docs/install.md",
        "docs/options.md",
        "docs/multi_device.md",
        "docs/tools.md",
        "docs/differences.md",
        "docs/modules_notes.md",
        "docs/torch.md",
        "docs/accuracy.md",
        "docs/errors.md",
        "docs/benchmarks.md",
        "docs/examples.md",
        "docs/api/index.md",
        "docs/api/functional.md",
        "docs/api/linen.md",
        "docs/api/nnx.md",
        "docs/api/tools.md",
        "docs/api/torch.md",
        "README.md",
        "benchmarks/RESULTS.md",
        "examples/README.md",
        "compat/README.md",
    }
    assert expected <= set(PAGES), sorted(expected - set(PAGES))
    assert set(FAST) <= set(PAGES)


@pytest.mark.parametrize("page", [page for page in SITE_PAGES if page.startswith("docs/")])
def test_every_block_names_its_language(page):
    for language, line, _ in blocks(page):
        assert language in LANGUAGES or re.fullmatch(r"\{[\w-]+\}", language), (
            f"{page}:{line}: a block tagged {language!r}; use python (run by the tests), bash or text"
        )


@pytest.mark.parametrize("page", _python_pages(fast=True))
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    run_page(page)


@pytest.mark.slow  # these pages trace and compile models: tens of seconds each on 2 busy cores
@pytest.mark.parametrize("page", _python_pages(fast=False))
def test_page_code_runs_slow(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_page(page)


def readme_docs_command() -> list[str]:
    """The README's command that builds the docs, from ``python`` on, as arguments."""
    (line,) = [
        row
        for lang, _, body in blocks("README.md")
        if lang == "bash"
        for row in body.splitlines()
        if "-m sphinx" in row
    ]
    return shlex.split(line.split("&&")[-1])


@pytest.mark.slow  # a full Sphinx build: about half a minute
@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("sphinx", "myst_parser", "furo")),
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_the_docs_build_without_warnings(tmp_path):
    """The README's build command (warnings are errors), into a temporary folder."""
    command = readme_docs_command()
    assert (
        command[1:3] == ["-m", "sphinx"] and "-W" in command and command[-1] == "docs/_build/html"
    )
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", *command[3:-1], str(tmp_path / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"the docs build failed or warned:\n{run.stderr[-5000:]}"
    assert (tmp_path / "html" / "docs" / "index.html").exists() and (
        tmp_path / "html" / "index.html"
    ).exists()
