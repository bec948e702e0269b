"""Builds jaxbn's one C++ extension: the XLA:CPU sums kernels (jaxbn/_cpu_kernels.cc).

Everything else is in pyproject.toml. The extension is optional: where it does
not compile (no C++17 compiler), jaxbn installs without it and reduces with
XLA's own kernels on every backend (``jaxbn.stats.cpu_kernels_available()``).
"""

import importlib.util
import os

from setuptools import Extension, setup


def _xla_ffi_include_dir() -> str:
    # The XLA FFI headers ship inside jaxlib (a build requirement); jax.ffi.include_dir()
    # returns this folder, found here without importing jax.
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building jaxbn needs jaxlib (for the XLA FFI headers)")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


setup(
    ext_modules=[
        Extension(
            "jaxbn._cpu_kernels",
            sources=["jaxbn/_cpu_kernels.cc"],
            include_dirs=[_xla_ffi_include_dir()],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-Wno-psabi"],
            optional=True,
        )
    ]
)
