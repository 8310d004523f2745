"""Fixtures of the kernel tests."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def build_cuda_emulation():
    """build(name, source): compiles tests/kernels/<source> (a CUDA kernel header run on the CPU through
    cuda_emulation.h) as a library of torch ops, cached with the extensions; its ops are in torch.ops.<namespace>."""
    from torch.utils.cpp_extension import load

    from rwkvctl.kernels import build as kernel_build

    def build(name: str, source: str) -> None:
        directory = kernel_build.extensions_dir() / name
        directory.mkdir(parents=True, exist_ok=True)
        load(
            name=f"rwkvctl_{name}",
            sources=[str(HERE / source)],
            extra_include_paths=[str(kernel_build.csrc_dir())],
            extra_cflags=["-O1", "-std=c++20"],
            build_directory=str(directory),
            is_python_module=False,
        )

    return build
