"""Building, finding and choosing the WKV5 extension: lazy build, fallback, env switches, packaging."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import rwkvctl.kernels as kernels
from rwkvctl.errors import KernelUnavailable
from rwkvctl.kernels import build, reference

ROOT = Path(__file__).resolve().parents[2]
has_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the extension")


def small_inputs(N: int = 64, T: int = 9):
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(2, T, 2, N, generator=g) for _ in range(3))
    return r, k, v, torch.rand(2, N, generator=g) * 4 - 3, torch.randn(2, N, generator=g), None


def test_import_compiles_nothing():
    code = (
        "import rwkvctl, rwkvctl.kernels, rwkvctl.kernels.ops, rwkvctl.model.rwkv5\n"
        "from rwkvctl.kernels import build\n"
        "assert build.loaded() is None\n"
        "import torch\n"
        "try:\n    torch.ops.rwkvctl.wkv5_fwd\n"
        "except (AttributeError, RuntimeError):\n    pass\n"
        "else:\n    raise SystemExit('the op was loaded by an import')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_sources_found_in_checkout():
    src = build.csrc_dir()
    assert src == ROOT / "csrc"
    assert all((src / name).is_file() for name in build.CPU_SOURCES + build.CUDA_SOURCES + build.HEADERS)


def test_extensions_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RWKVCTL_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("RWKVCTL_CACHE_DIR", str(tmp_path / "cache"))  # the one root of every compiled part
    assert build.extensions_dir() == tmp_path / "cache" / "extensions"
    monkeypatch.setenv("RWKVCTL_EXTENSIONS_DIR", str(tmp_path / "ext"))  # the old name, still read (deprecated)
    assert build.extensions_dir() == tmp_path / "ext"
    monkeypatch.delenv("RWKVCTL_EXTENSIONS_DIR")
    monkeypatch.delenv("RWKVCTL_CACHE_DIR")
    assert build.extensions_dir() == Path.home() / ".cache" / "rwkvctl" / "extensions"


def test_skip_cuda_switch_and_its_old_name(monkeypatch):
    monkeypatch.delenv("RWKVCTL_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("RWKVCTL_WKV_SKIP_CUDA", "1")
    assert not build.want_cuda()
    monkeypatch.delenv("RWKVCTL_WKV_SKIP_CUDA")
    monkeypatch.setenv("RWKVCTL_SKIP_CUDA_BUILD", "1")
    assert not build.want_cuda()


def test_extra_cxxflags_change_the_build(monkeypatch):
    monkeypatch.delenv("RWKVCTL_WKV_CXXFLAGS", raising=False)
    plain = build.build_dir()
    monkeypatch.setenv("RWKVCTL_WKV_CXXFLAGS", "-DRWKVCTL_TEST_FLAG")
    assert build.cxx_flags()[-1] == "-DRWKVCTL_TEST_FLAG" and build.build_dir() != plain


@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    """A process state where nothing was loaded yet, building into an empty cache."""
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_failure", None)
    monkeypatch.setattr(kernels.SWITCH, "warned", set())
    monkeypatch.delenv("RWKVCTL_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("RWKVCTL_CACHE_DIR", str(tmp_path / "cache"))


def test_missing_compiler_is_a_clear_error(fresh_build_state, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-rwkvctl")
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler .*no-such-compiler-rwkvctl"):
        build.load_extension()
    with pytest.raises(KernelUnavailable):  # remembered: no second attempt
        build.load_extension()


def test_auto_falls_back_to_reference_and_says_so_once(fresh_build_state, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-rwkvctl")
    args = small_inputs()
    with caplog.at_level(logging.WARNING, logger="rwkvctl.kernels"):
        y1, s1 = kernels.wkv5(*args)
        y2, _ = kernels.wkv5(*args)
    warnings = [r for r in caplog.records if "pure-PyTorch reference" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    y_ref, s_ref = reference.wkv5_chunked(*args)
    assert torch.equal(y1, y_ref) and torch.equal(s1, s_ref) and torch.equal(y2, y_ref)
    monkeypatch.setenv("RWKVCTL_WKV", "compiled")
    with pytest.raises(KernelUnavailable, match="RWKVCTL_WKV=compiled but no C\\+\\+ compiler"):
        kernels.wkv5(*args)


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("RWKVCTL_WKV", "reference")
    assert not kernels.uses_compiled(small_inputs()[0])
    monkeypatch.setenv("RWKVCTL_WKV", "fastest")
    with pytest.raises(KernelUnavailable, match="RWKVCTL_WKV must be one of auto, compiled, reference"):
        kernels.wkv5(*small_inputs())


@has_compiler
def test_auto_uses_the_compiled_op(monkeypatch):
    monkeypatch.delenv("RWKVCTL_WKV", raising=False)
    args = small_inputs()
    assert kernels.uses_compiled(args[0])
    y, s = kernels.wkv5(*args)
    y_ref, s_ref = reference.wkv5_loop(*args)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5) and torch.allclose(s, s_ref, rtol=1e-5, atol=1e-5)


@has_compiler
def test_flat_channel_layout(monkeypatch):
    """r, k, v given as (B, T, C) with C = H*N give the same result, shaped (B, T, C)."""
    monkeypatch.delenv("RWKVCTL_WKV", raising=False)
    r, k, v, w, u, _ = small_inputs()
    y4, s4 = kernels.wkv5(r, k, v, w, u)
    y3, s3 = kernels.wkv5(*(x.flatten(2) for x in (r, k, v)), w, u)
    assert y3.shape == (2, 9, 128) and torch.equal(y3, y4.flatten(2)) and torch.equal(s3, s4)


@has_compiler
def test_unsupported_head_size_falls_back(monkeypatch, caplog):
    monkeypatch.delenv("RWKVCTL_WKV", raising=False)
    monkeypatch.setattr(kernels.SWITCH, "warned", set())
    args = small_inputs(N=8)
    with caplog.at_level(logging.WARNING, logger="rwkvctl.kernels"):
        y, _ = kernels.wkv5(*args)
    assert "head size 8" in caplog.text
    assert torch.equal(y, reference.wkv5_chunked(*args)[0])
    monkeypatch.setenv("RWKVCTL_WKV", "compiled")
    with pytest.raises(KernelUnavailable, match="head size 8"):
        kernels.wkv5(*args)


@has_compiler
def test_model_same_with_compiled_op_and_reference(monkeypatch, tiny_config, random_model):
    """The model's sequence forward (training and prompt ingestion) matches the reference kernel, grads included."""
    from rwkvctl.model.state import RecurrentState

    model = random_model(tiny_config).train()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))

    def run(backend: str):
        monkeypatch.setenv("RWKVCTL_WKV", backend)
        model.zero_grad()
        logits, state = model(idx[:, :25])
        logits2, state2 = model(idx[:, 25:], state=state)  # chained segment: BPTT through the carried state
        (logits.square().mean() + logits2.square().mean() + state2.wkv.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cat([logits, logits2], 1).detach(), state2, grads

    assert kernels.uses_compiled(torch.zeros(1, 1, 1, tiny_config.head_size))
    logits_c, state_c, grads_c = run("compiled")
    logits_r, state_r, grads_r = run("reference")
    assert isinstance(state_c, RecurrentState)
    assert rel_err(logits_c, logits_r) < 1e-4 and rel_err(state_c.wkv, state_r.wkv) < 1e-4
    assert grads_c.keys() == grads_r.keys()
    bad = {n: rel_err(grads_c[n], grads_r[n]) for n in grads_r if not rel_err(grads_c[n], grads_r[n]) < 1e-3}
    assert not bad, bad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude (fp32 sums in a different order differ ~1e-6)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.slow
def test_wheel_and_sdist_carry_all_kernel_sources(tmp_path):
    """`python -m build` (sdist, then a wheel from it) ships every file under csrc/, found after install."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.egg-info")
    for name in ("rwkvctl", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", str(dist)]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True)
    expected = sorted(p.relative_to(src / "csrc").as_posix() for p in (src / "csrc").rglob("*") if p.is_file())
    assert "cuda/wkv5_cuda.cu" in expected and "wkv5_op.cpp" in expected

    with tarfile.open(next(dist.glob("*.tar.gz"))) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {f"csrc/{p}" for p in expected} <= names

    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert {f"rwkvctl/_csrc/{p}" for p in expected} <= set(zf.namelist())
        zf.extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "from rwkvctl.kernels.build import csrc_dir; print(csrc_dir())"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(found) == tmp_path / "site" / "rwkvctl" / "_csrc"


@pytest.mark.skipif(shutil.which("c++") is None or sys.platform != "linux", reason="needs a C++ compiler on Linux")
def test_kernels_use_torchs_openmp_runtime() -> None:
    """ATen's parallel_for is inline OpenMP code: built without -fopenmp it runs every range on one thread. Built
    with it, the extension must share torch's own libgomp (one thread pool, torch.set_num_threads applies), not
    load a second runtime."""
    assert not build._links_openmp("no-such-compiler-here")  # a toolchain that cannot link it builds without it
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        assert build.openmp_flags() == ()
        return
    assert build.openmp_flags() == ("-fopenmp",) and "-fopenmp" in build.cxx_flags()
    # A fresh process: other libraries (sentencepiece's wheel vendors its own libgomp) may already have loaded a
    # runtime of their own here; what matters is that loading our extension adds none beside torch's.
    probe = """
import torch
from rwkvctl.kernels import build

def runtimes():
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}

before = runtimes()
build.load_extension()
print(sorted(before)); print(sorted(runtimes() - before))
"""
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    before_line, added_line = out.strip().splitlines()[-2:]
    assert "torch" in before_line, before_line  # torch's own runtime, loaded with torch
    assert added_line == "[]", f"the extension loaded another OpenMP runtime: {added_line}"
