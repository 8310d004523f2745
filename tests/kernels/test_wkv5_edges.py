"""Edge cases of the WKV5 entry point on both backends: flat (B, T, C) inputs, extreme decays,
double backward."""

import pytest
import torch

from rwkvctl.kernels import wkv5
from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_flat_channels_and_non_contiguous_inputs(backend, monkeypatch):
    monkeypatch.setenv("RWKVCTL_WKV", backend)
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(2, 40, 3 * 128, generator=g)  # a fused r|k|v projection: slices are non-contiguous
    r, k, v = fused.split(128, dim=-1)
    w, u = torch.randn(2, 64, generator=g) - 1, torch.randn(2, 64, generator=g)
    y, s = wkv5(r, k, v, w, u)
    y_ref, s_ref = wkv5_loop(*(x.reshape(2, 40, 2, 64) for x in (r, k, v)), w, u)
    assert y.shape == (2, 40, 128)
    assert torch.allclose(y, y_ref.reshape(2, 40, 128), atol=1e-4)
    assert torch.allclose(s, s_ref, atol=1e-4)


def test_decay_that_underflows_stays_finite():
    g = torch.Generator().manual_seed(1)
    r, k, v = (torch.randn(1, 70, 1, 16, generator=g) for _ in range(3))
    w = torch.full((1, 16), 100.0, requires_grad=True)  # exp(w) overflows fp32: the decay is exactly 0
    u = torch.zeros(1, 16)
    y, s = wkv5_chunked(r, k, v, w, u)
    y_loop, _ = wkv5_loop(r, k, v, w.detach(), u)
    assert torch.isfinite(y).all() and torch.allclose(y, y_loop, atol=1e-5)
    y.sum().backward()
    assert torch.isfinite(w.grad).all()
    y2, _ = wkv5(r, k, v, w.detach().requires_grad_(True), u)
    assert torch.isfinite(y2).all() and torch.allclose(y2, y_loop, atol=1e-5)


def test_double_backward_is_refused_not_silently_zero(monkeypatch):
    from rwkvctl.kernels import uses_compiled

    r = torch.randn(1, 5, 1, 64, requires_grad=True)
    if not uses_compiled(r):
        pytest.skip("compiled extension unavailable")
    k, v = torch.randn(1, 5, 1, 64), torch.randn(1, 5, 1, 64)
    w = torch.randn(1, 64, requires_grad=True)
    y, _ = wkv5(r, k, v, w, torch.randn(1, 64))
    (gw,) = torch.autograd.grad(y.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        gw.sum().backward()


def test_a_killed_builds_lock_is_cleared_but_a_live_build_is_waited_for(tmp_path, monkeypatch):
    """torch's own `lock` left in a build dir by a killed build is removed once we hold the build lock; while a
    live process holds that lock nothing is touched, and the wait ends in a clear KernelUnavailable."""
    import subprocess
    import sys

    from rwkvctl import native_build
    from rwkvctl.errors import KernelUnavailable
    from rwkvctl.kernels import build

    build_dir = tmp_path / "rwkvctl_wkv5_cpu-0123456789abcdef"
    build_dir.mkdir()
    (build_dir / "lock").touch()  # torch's FileBaton of a build killed mid-way
    monkeypatch.setattr(build, "_build_plan", lambda with_cuda: ("rwkvctl_wkv5_cpu", [], build_dir))
    monkeypatch.setattr(build, "want_cuda", lambda: False)
    monkeypatch.setattr(native_build, "LOCK_TIMEOUT_S", 0.3)
    monkeypatch.setenv("CXX", "no-such-compiler-rwkvctl")  # never actually compile here
    code = (
        "import sys, time; from pathlib import Path; from rwkvctl.native_build import build_lock\n"
        "with build_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(build_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KernelUnavailable, match=f"pid {holder.pid} .*building rwkvctl_wkv5_cpu-"):
            build._load(verbose=False)
        assert (build_dir / "lock").exists()  # a live build's lock is never touched
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):  # the holder died: taken over at once
        build._load(verbose=False)
    assert not (build_dir / "lock").exists()


def test_unsupported_head_size_falls_back_without_building(monkeypatch):
    from rwkvctl.kernels import build, uses_compiled

    monkeypatch.setattr(build, "load_extension", lambda *a, **k: pytest.fail("must not build for N=8"))
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_failure", None)
    assert uses_compiled(torch.zeros(1, 2, 1, 8)) is False


def test_empty_batch_gives_empty_outputs():
    y, s = wkv5(torch.zeros(0, 5, 2, 64), torch.zeros(0, 5, 2, 64), torch.zeros(0, 5, 2, 64), torch.zeros(2, 64),
                torch.zeros(2, 64))  # fmt: skip
    assert y.shape == (0, 5, 2, 64) and s.shape == (0, 2, 64, 64)


def test_integer_output_gradients_are_rejected():
    from rwkvctl.kernels import uses_compiled

    r = torch.randn(1, 3, 1, 64)
    if not uses_compiled(r):
        pytest.skip("compiled extension unavailable")
    w, u, s = torch.zeros(1, 64), torch.zeros(1, 64), torch.zeros(1, 1, 64, 64)
    with pytest.raises(RuntimeError, match="gy must be floating point"):
        torch.ops.rwkvctl.wkv5_bwd(r, r, r, w, u, s, torch.zeros(1, 3, 1, 64, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="g_s_out must be floating point"):
        torch.ops.rwkvctl.wkv5_bwd(r, r, r, w, u, s, r, torch.zeros(1, 1, 64, 64, dtype=torch.int64))
