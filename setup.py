"""Build hook for rwkvctl: ship the C++/CUDA kernel sources inside the package.

Project metadata lives in pyproject.toml. The WKV5 extension is compiled lazily on first use
(rwkvctl/kernels/build.py) or ahead of time with `rwkvctl kernels build`, never at install time, so
installing stays fast and needs no compiler. For that, an installed rwkvctl must carry the sources:
this copies the top-level csrc/ tree (every subdirectory, e.g. csrc/cuda/ and csrc/tokenizer/) into the
wheel as rwkvctl/_csrc/. The sdist carries csrc/ itself (MANIFEST.in).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUILD_LEFTOVERS = ("*.o", "*.so", "*.pyd", "*.ninja", ".ninja_*", "build", "__pycache__")


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/ to <build_lib>/rwkvctl/_csrc (not for editable installs, which use csrc/)."""

    def run(self) -> None:
        super().run()
        src = ROOT / "csrc"
        if getattr(self, "editable_mode", False) or not src.is_dir():
            return
        dst = Path(self.build_lib) / "rwkvctl" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))


setup(cmdclass={"build_py": BuildPyWithCsrc})
