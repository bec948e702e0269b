"""Sphinx configuration for jaxbn's documentation (MyST Markdown, API reference from the docstrings).

Build, warnings as errors (the command in the README and in .ci/run), from the repository root:

    python -m sphinx -W --keep-going -c docs -b html . docs/_build/html

The source directory is the repository root (this configuration directory is docs/), so that the
Markdown files the site shows from elsewhere in the repository (README.md, benchmarks/RESULTS.md,
examples/README.md, compat/README.md) are pages too, and a relative link such as
``../benchmarks/RESULTS.md`` works alike on GitHub and in the built site. ``include_patterns``
names every source file. The build needs no network: there is no intersphinx mapping.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the jaxbn of this checkout, installed or not

import jaxbn  # noqa: E402  (after the path insertion above)

project = "jaxbn"
author = "the jaxbn authors"
copyright = "the jaxbn authors"
release = jaxbn.__version__
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]

source_suffix = {".md": "markdown"}
root_doc = "docs/index"
include_patterns = [
    "docs/**",
    "README.md",
    "benchmarks/RESULTS.md",
    "examples/README.md",
    "compat/README.md",
]
# Pruned from the walk of the repository: hidden folders (.venv, .git, caches) and the build itself.
exclude_patterns = [".*", "**/.*", "docs/_build", "**/__pycache__", "*.egg-info"]

# MyST: anchors for "#heading" links within and across pages, as GitHub makes them. The API pages
# wrap autodoc's directives in ```{eval-rst}``` blocks: MyST would read the reStructuredText that
# autodoc generates from the docstrings as Markdown otherwise.
myst_heading_anchors = 3

# Google-style docstrings (Args:, Returns:, Raises:, Attributes:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# A class's "Attributes:" as fields of the class, not as separate attribute entries (which would
# duplicate the dataclass fields that autodoc lists).
napoleon_use_ivar = True

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"jaxbn {release}"

# The site's root page is docs/index.html (the source directory is the repository root): an
# index.html at the top of the build that forwards there.
html_extra_path = ["_extra"]
