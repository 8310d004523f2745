"""The CUDA kernels (csrc/cuda/wkv5_kernels.cuh) run on the CPU, one std::thread per CUDA thread, against the
float64 reference: their indexing, thread roles, state in/out and every gradient, without a GPU."""

from __future__ import annotations

import shutil

import pytest
import torch

from rwkvctl.kernels.check import NAMES, _error, forward_backward, random_inputs
from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulated(build_cuda_emulation):
    """The emulated op as an autograd-capable function with the reference's signature."""
    build_cuda_emulation("wkv5_cuda_emulation", "wkv5_cuda_emulation.cpp")
    ops = torch.ops.rwkvctl_cuda_emulation

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, k, v, w, u, s, chunk, sms):
            ctx.save_for_backward(r, k, v, w, u, s)
            ctx.chunking = (chunk, sms)
            return ops.wkv5_fwd(r, k, v, w, u, s, chunk, sms)

        @staticmethod
        def backward(ctx, gy, gs):
            return *ops.wkv5_bwd(*ctx.saved_tensors, gy.contiguous(), gs, *ctx.chunking), None, None

    def run(r, k, v, w, u, s, chunk: int = 0, sms: int = 132):
        """chunk=0: the automatic chunking wkv5_fwd_cuda/wkv5_bwd_cuda would use on a GPU with `sms` SMs."""
        return Emulated.apply(r, k, v, w, u, s, chunk, sms)

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "B, T, H, N", [(1, 1, 1, 64), (2, 2, 1, 16), (1, 17, 2, 64), (2, 64, 2, 16), (2, 40, 3, 16), (1, 129, 1, 64)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_cuda_kernels_against_reference(emulated, B, T, H, N, dtype):
    x = random_inputs(B, T, H, N, seed=T)
    if dtype == torch.bfloat16:
        x.update({n: x[n].to(dtype).double() for n in ("r", "k", "v")})
    want = forward_backward(wkv5_loop if T <= 64 else wkv5_chunked, x, torch.float64)
    got = forward_backward(emulated, x, dtype)
    metric, tol = ("rel max", 2e-5) if dtype == torch.float32 else ("rel rms", 5e-3)
    errors = {"y": _error(got[0], want[0], metric), "s_out": _error(got[1], want[1], metric)}
    errors |= {f"g{n}": _error(got[2][n], want[2][n], metric) for n in NAMES}
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"{metric} errors above {tol}: {bad}"
    assert got[0].dtype == dtype and got[2]["r"].dtype == dtype and got[2]["s_in"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("T, chunk, sms", [(130, 0, 132), (130, 64, 1), (100, 7, 1), (5, 2, 1), (64, 64, 1), (1, 0, 1)])
def test_emulated_chunked_forward_and_backward(emulated, T, chunk, sms):
    """The state-passing chunked forward and backward (automatic or forced chunk lengths, uneven last chunk)."""
    x = random_inputs(1, T, 2, 16, seed=T + chunk)
    want = forward_backward(wkv5_loop, x, torch.float64)
    got = forward_backward(lambda *a: emulated(*a, chunk=chunk, sms=sms), x, torch.float32)
    for name, a, b in [("y", got[0], want[0]), ("s_out", got[1], want[1])] + [
        (f"g{n}", got[2][n], want[2][n]) for n in NAMES
    ]:
        if b.numel():
            assert _error(a, b, "rel max") < 2e-5, name


@pytest.mark.slow
def test_emulated_without_state_gradient(emulated):
    """g_s_out = None path (only y used): same as passing zeros."""
    x = random_inputs(2, 9, 2, 16, seed=1)
    args = [x[n].float() for n in NAMES]
    gy = x["gy"].float()
    ops = torch.ops.rwkvctl_cuda_emulation
    for chunk in (0, 4):
        none = ops.wkv5_bwd(*args, gy, None, chunk, 1)
        zeros = ops.wkv5_bwd(*args, gy, torch.zeros_like(args[-1]), chunk, 1)
        for a, b in zip(none, zeros, strict=True):
            assert torch.equal(a, b)
