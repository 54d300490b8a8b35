"""Build step for jaxnets' one compiled piece: the oneDNN convolution (XLA FFI handlers).

Everything else is pure Python (pyproject.toml holds the metadata). The extension is
optional: where there is no C++ compiler, no oneDNN or no XLA FFI headers (macOS, ARM,
a machine without g++), setuptools reports the failure and installs jaxnets without it,
and ``jaxnets.ops.onednn.available()`` is False: convolutions then run on XLA.

oneDNN comes from the package index: ``onednn-devel-cpu-gomp`` (headers) and
``onednn-cpu-gomp`` (``libdnnl.so.3``, GNU OpenMP threading) are build requirements, and
the latter is also a run-time dependency, loaded by ``jaxnets.ops.onednn`` before the
extension. The XLA FFI headers come with jaxlib (what ``jax.ffi.include_dir()`` returns).
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _dist_dir(dist: str, suffix: str) -> str | None:
    """The folder holding the file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return str(Path(f.locate()).resolve().parent)
    return None


class OptionalBuild(build_ext):
    """Fills in the include and library folders at build time; a failure is reported once
    and leaves jaxnets on XLA's convolutions."""

    def run(self):
        try:  # the XLA FFI headers ship inside jaxlib (what jax.ffi.include_dir() returns)
            import jaxlib

            ffi_include = str(Path(jaxlib.__file__).resolve().parent / "include")
        except ImportError as e:
            print(f"jaxnets: not building the oneDNN convolution ({e}); XLA's are used")
            return
        if not Path(ffi_include, "xla", "ffi", "api", "ffi.h").exists():
            print(
                f"jaxnets: no XLA FFI headers in {ffi_include}; the oneDNN convolution is not built"
            )
            return
        dnnl_include = _dist_dir("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
        dnnl_lib = _dist_dir("onednn-cpu-gomp", "libdnnl.so.3")
        if dnnl_include is None or dnnl_lib is None:
            print(
                "jaxnets: oneDNN (onednn-cpu-gomp) not found; the oneDNN convolution is not built"
            )
            return
        for ext in self.extensions:
            ext.include_dirs += [ffi_include, str(Path(dnnl_include).parents[1])]
            ext.library_dirs += [dnnl_lib]
        super().run()


ext = Extension(
    "jaxnets.ops._onednn_conv",
    sources=["jaxnets/ops/csrc/onednn_conv.cc"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-w"],
    # libdnnl.so.3 is found at run time through jaxnets.ops.onednn's preload, not a path.
    extra_link_args=["-l:libdnnl.so.3"],
    optional=True,
)

setup(
    ext_modules=[ext] if sys.platform.startswith("linux") else [],
    cmdclass={"build_ext": OptionalBuild},
)
