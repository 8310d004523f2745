"""Finding, compiling and loading the extension of rwkvctl's CPU/CUDA ops (csrc/: WKV5, the packed-weight matmul)
with torch.utils.cpp_extension and ninja.

Nothing here runs at import time: `load_extension()` builds on first use, caches the result for the
process, and keeps the compiled library in a directory keyed by a hash of the sources, the flags and the
torch version, so a second process (or `rwkvctl kernels build` ahead of time) reuses it without compiling.
Cache root, settings and the build lock are those of every compiled part (rwkvctl/native_build.py):

    RWKVCTL_CACHE_DIR      builds are kept in its extensions/ (default ~/.cache/rwkvctl/extensions)
    RWKVCTL_WKV_SKIP_CUDA  =1 builds only the CPU part even where torch has CUDA
    RWKVCTL_WKV_CXXFLAGS   extra C++ compiler flags
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from rwkvctl import native_build
from rwkvctl.errors import BuildLockTimeout, KernelUnavailable

log = logging.getLogger("rwkvctl.kernels")

CPU_SOURCES = (
    "wkv5_op.cpp", "wkv5_cpu.cpp", "qmm_cpu.cpp", "rnn_step_cpu.cpp", "rnn_step_parts_cpu.cpp",
    "rnn_step_model_cpu.cpp",
)
CUDA_SOURCES = ("cuda/wkv5_cuda.cu", "cuda/qmm_cuda.cu")
HEADERS = (
    "wkv5.h", "wkv5_cpu_kernel.h", "static_switch.h", "cpu_isa.h", "rnn_step_kernel.h", "rnn_step_avx512.h",
    "rnn_step_layer.h", "cuda/wkv5_kernels.cuh", "cuda/qmm_kernels.cuh",
)
# Plain -O3 keeps the binary portable; wkv5_cpu.cpp adds AVX2/AVX-512 variants chosen at run time.
# -fopenmp-simd enables the `omp simd` reductions without linking an OpenMP runtime; -fno-trapping-math lets loops
# with float comparisons (relu, exp_f32's range checks) vectorize as selects (nothing reads the FP exception flags).
CXX_FLAGS = ("-O3", "-fopenmp-simd", "-fno-trapping-math")
CUDA_FLAGS = ("-O3", "-Xptxas", "-O3", "--extra-device-vectorization")


@dataclass(frozen=True)
class ExtensionInfo:
    """Where the loaded extension came from."""

    library: Path
    sources: Path
    with_cuda: bool
    built_now: bool


_loaded: ExtensionInfo | None = None
_failure: KernelUnavailable | None = None
_load_lock = threading.Lock()


def csrc_dir() -> Path:
    """The C++/CUDA sources: shipped as rwkvctl/_csrc in a wheel/sdist install, csrc/ in a source checkout."""
    package = Path(__file__).resolve().parent.parent  # .../rwkvctl
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in CPU_SOURCES):
            return candidate
    raise KernelUnavailable(
        f"WKV5 sources not found in {package / '_csrc'} or {package.parent / 'csrc'}; reinstall rwkvctl "
        "or set RWKVCTL_WKV=reference to use the pure-PyTorch kernel"
    )


def extensions_dir() -> Path:
    """Where WKV5 builds are kept: $RWKVCTL_CACHE_DIR/extensions (default ~/.cache/rwkvctl/extensions)."""
    return native_build.cache_dir("WKV")


def cxx_flags() -> tuple[str, ...]:
    return CXX_FLAGS + openmp_flags() + tuple(native_build.extra_flags("WKV"))


def openmp_flags() -> tuple[str, ...]:
    """-fopenmp where torch's intra-op threads are OpenMP (Linux wheels): ATen's `parallel_for` is inline
    `#pragma omp parallel` code, so a source compiled without it runs every range on the calling thread (our CPU
    kernels ignored `torch.set_num_threads`). Linked as libgomp.so.1, the soname torch's bundled runtime already
    loaded, so both share one thread pool and one thread count."""
    import torch

    if sys.platform != "linux" or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return ()
    return ("-fopenmp",) if _links_openmp(native_build.compiler()) else ()


@functools.cache
def _links_openmp(cxx: str) -> bool:
    """Whether `cxx -fopenmp` links a program here (~50 ms; a clang without libomp does not): without it the
    extension still builds, with serial parallel_for."""
    try:
        probe = subprocess.run([cxx, "-fopenmp", "-x", "c++", "-", "-o", os.devnull],
                               input=b"int main() { return 0; }\n", capture_output=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def want_cuda() -> bool:
    """Build the CUDA part only where torch has CUDA, nvcc is known and it is not switched off."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if native_build.flag("WKV_SKIP_CUDA"):
        return False
    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def _build_plan(with_cuda: bool) -> tuple[str, list[Path], Path]:
    import torch

    src = csrc_dir()
    sources = [src / name for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    # every kernel source and header (a new header can never leave a stale build behind) ...
    kernel_files = [
        p for p in src.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu") and "tokenizer" not in p.parts
    ]
    # ... and what decides the machine code: flags, torch, compiler, and for CUDA the target archs, so a
    # cache shared between nodes with different GPUs never serves a library without a kernel image
    toolchain = (cxx_flags(), torch.__version__, native_build.compiler())
    if with_cuda:
        toolchain += (CUDA_FLAGS, torch.version.cuda, os.environ.get("TORCH_CUDA_ARCH_LIST", ""), _gpu_archs())
    key = native_build.cache_key(kernel_files + sources + [src / name for name in HEADERS], src, toolchain)
    name = "rwkvctl_wkv5_cuda" if with_cuda else "rwkvctl_wkv5_cpu"
    return name, sources, extensions_dir() / f"{name}-{key}"


def _gpu_archs() -> tuple[str, ...]:
    import torch

    capabilities = (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    return tuple(sorted({f"{major}.{minor}" for major, minor in capabilities}))


def build_dir() -> Path:
    """The cache directory of the build this process would load (hash of sources, flags, torch)."""
    return _build_plan(want_cuda())[2]


def remove_build() -> None:
    """Delete the build this process would load (`kernels build --force`), never under a running build."""
    target = build_dir()
    try:
        with native_build.build_lock(target):
            shutil.rmtree(target, ignore_errors=True)
    except BuildLockTimeout as e:
        raise KernelUnavailable(str(e)) from e


def _check_toolchain(with_cuda: bool) -> None:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = native_build.compiler()
    if shutil.which(cxx) is None:
        raise KernelUnavailable(
            f"no C++ compiler ('{cxx}') on PATH to build the WKV5 extension; install g++ (e.g. build-essential) "
            "or set RWKVCTL_WKV=reference"
        )
    if not is_ninja_available():
        raise KernelUnavailable("ninja is not installed; `pip install ninja` to build the WKV5 extension")
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        if not (Path(CUDA_HOME or "") / "bin" / "nvcc").exists():
            raise KernelUnavailable(f"nvcc not found under CUDA_HOME={CUDA_HOME}; set RWKVCTL_WKV_SKIP_CUDA=1")


def load_extension(verbose: bool = False) -> ExtensionInfo:
    """Build (if needed) and load the extension into torch.ops.rwkvctl; once per process.

    Raises KernelUnavailable with a one-line reason when it cannot be built or loaded; the failure is
    remembered, so later calls fail fast instead of recompiling.
    """
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    with _load_lock:  # one build and one registration per process, however many threads ask at once
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
        try:
            info = _load(verbose)
        except KernelUnavailable as e:
            _failure = e
            raise
        from rwkvctl.kernels import ops

        # autograd and fake kernels must be attached before any caller can see the op as loaded
        ops.register_python_parts()
        _loaded = info
        return _loaded


def _clear_killed_build(build_dir: Path) -> bool:
    """Called holding our build lock, so no build runs in `build_dir`: torch's own lock file there was left by a
    build killed mid-way (OOM, kill -9). torch would wait on it forever; remove it. True if there was one (the
    library may then be half-written, so it is rebuilt, not loaded)."""
    lock = build_dir / "lock"
    if not lock.exists():
        return False
    log.warning("removing the lock of a killed WKV5 build: %s", lock)
    lock.unlink(missing_ok=True)
    return True


def _load(verbose: bool) -> ExtensionInfo:
    with_cuda = want_cuda()
    name, sources, build_dir = _build_plan(with_cuda)
    try:
        # one build per cache directory at a time, on this machine and on nodes sharing the cache; a library
        # is only loaded by whoever holds the lock, so never while another process is still writing it
        with native_build.build_lock(build_dir):
            return _load_locked(name, sources, build_dir, with_cuda, verbose)
    except BuildLockTimeout as e:
        raise KernelUnavailable(f"{e}; or set RWKVCTL_WKV=reference") from e


def _load_locked(name: str, sources: list[Path], build_dir: Path, with_cuda: bool, verbose: bool) -> ExtensionInfo:
    import torch

    library = build_dir / f"{name}.so"
    built_now = _clear_killed_build(build_dir) or not library.exists()
    if built_now:
        _check_toolchain(with_cuda)
        build_dir.mkdir(parents=True, exist_ok=True)
        what = "C++/CUDA" if with_cuda else "C++"
        log.warning("compiling the WKV5 %s extension (first use, about a minute) into %s", what, build_dir)
        from torch.utils.cpp_extension import load

        try:
            load(
                name=name,
                sources=[str(p) for p in sources],
                extra_cflags=list(cxx_flags()),
                extra_ldflags=list(openmp_flags()),
                extra_cuda_cflags=list(CUDA_FLAGS) if with_cuda else None,
                extra_include_paths=[str(sources[0].parent)],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        except (RuntimeError, OSError, ImportError) as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise KernelUnavailable(
                f"building the WKV5 extension in {build_dir} failed ({last}); rerun `rwkvctl kernels build --verbose` "
                "for the compiler output, or set RWKVCTL_WKV=reference"
            ) from e
        log.warning("WKV5 extension built: %s", library)
    else:
        try:
            torch.ops.load_library(str(library))
        except (RuntimeError, OSError) as e:
            raise KernelUnavailable(f"cannot load {library} ({e}); delete {build_dir} to rebuild it") from e
    return ExtensionInfo(library=library, sources=sources[0].parent, with_cuda=with_cuda, built_now=built_now)


def loaded() -> ExtensionInfo | None:
    """The extension loaded in this process, if any (never builds)."""
    return _loaded


def failure() -> KernelUnavailable | None:
    """Why building/loading failed in this process, if it was tried and failed."""
    return _failure
