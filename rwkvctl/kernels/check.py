"""Compare the compiled WKV5 op with the reference and time both: behind `rwkvctl kernels check` and
benchmarks/wkv.py.

Errors are measured against the float64 reference (the exact loop for short sequences, the chunked
form otherwise), for y, the final state and every gradient (r, k, v, w, u, s_in), on the same
random loss <y, gy> + <s_out, gs>. fp32 reports the largest error relative to the largest reference
magnitude; bf16/fp16 report the relative RMS error (elementwise checks are meaningless after rounding).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop

WkvFn = Callable[..., tuple[Tensor, Tensor]]
NAMES = ("r", "k", "v", "w", "u", "s_in")
DEFAULT_SHAPES = ((1, 1, 1, 64), (2, 17, 2, 64), (3, 129, 4, 64), (2, 1000, 4, 64), (2, 200, 2, 128))


@dataclass(frozen=True)
class CheckRow:
    """One shape: errors of the compiled op vs the float64 reference, and fwd+bwd seconds of both."""

    shape: tuple[int, int, int, int]  # B, T, H, N
    dtype: str
    device: str
    metric: str  # "rel max" or "rel rms"
    err_forward: float  # worst of y and the final state
    err_backward: float  # worst gradient
    worst_grad: str
    seconds_compiled: float
    seconds_reference: float


def random_inputs(B: int, T: int, H: int, N: int, *, device: str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """float64 inputs in the ranges a trained model produces, plus the loss weights gy, gs."""
    g = torch.Generator().manual_seed(seed)
    x = {
        "r": torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        "k": torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * 0.5,
        "v": torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        "w": torch.rand(H, N, generator=g, dtype=torch.float64) * 5 - 4.5,  # decays ~0.07 .. ~0.998
        "u": torch.randn(H, N, generator=g, dtype=torch.float64) * 0.5,
        "s_in": torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.5,
        "gy": torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        "gs": torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.1,
    }
    return {n: t.to(device) for n, t in x.items()}


def make_leaves(x: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Leaf tensors for r, k, v (in dtype) and w, u, s_in (fp32, or fp64 when dtype is fp64)."""
    other = torch.float64 if dtype == torch.float64 else torch.float32
    return {n: x[n].detach().to(dtype if n in ("r", "k", "v") else other).requires_grad_() for n in NAMES}


def forward_backward(fn: WkvFn, x: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """y, s_out and the gradients of <y, gy> + <s_out, gs> w.r.t. r, k, v, w, u, s_in."""
    return _run(fn, make_leaves(x, dtype), x["gy"], x["gs"])


def _run(fn: WkvFn, leaves: dict[str, Tensor], gy: Tensor, gs: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    for t in leaves.values():
        t.grad = None
    y, s_out = fn(*(leaves[n] for n in NAMES))
    torch.autograd.backward((y, s_out), (gy.to(y.dtype), gs.to(s_out.dtype)))
    return y.detach(), s_out.detach(), {n: leaves[n].grad for n in NAMES}


def fwd_bwd_seconds(fn: WkvFn, x: dict[str, Tensor], dtype: torch.dtype, reps: int = 3, warmup: int = 1) -> float:
    """Median wall time of one forward+backward (inputs already in dtype, on the device)."""
    leaves = make_leaves(x, dtype)
    gy, gs = x["gy"].to(dtype), x["gs"].float()
    times = []
    for i in range(warmup + reps):
        if gy.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _run(fn, leaves, gy, gs)
        if gy.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _error(a: Tensor, b: Tensor, metric: str) -> float:
    a, b = a.double(), b.double()
    if metric == "rel max":
        return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30)).item()


def errors_vs_reference(compiled: WkvFn, x: dict[str, Tensor], dtype: torch.dtype) -> tuple[str, float, float, str]:
    """(metric, forward error, worst gradient error, its name) of `compiled` vs the float64 reference on x.

    For dtype other than fp32, r, k, v of x must already be representable in dtype (see check_shape).
    """
    T = x["r"].shape[1]
    ref = forward_backward(wkv5_loop if T <= 64 else wkv5_chunked, x, torch.float64)
    got = forward_backward(compiled, x, dtype)
    metric = "rel max" if dtype == torch.float32 else "rel rms"
    err_fwd = max(_error(got[0], ref[0], metric), _error(got[1], ref[1], metric))
    grad_errs = {n: _error(got[2][n], ref[2][n], metric) for n in NAMES}
    worst = max(grad_errs, key=grad_errs.__getitem__)
    return metric, err_fwd, grad_errs[worst], worst


def check_shape(
    compiled: WkvFn, shape: tuple[int, int, int, int], dtype: torch.dtype, device: str = "cpu", reps: int = 3
) -> CheckRow:
    """Errors vs the float64 reference and fwd+bwd time vs the chunked reference (same dtype and device)."""
    x = random_inputs(*shape, device=device)
    if dtype != torch.float32:  # the reference sees exactly the rounded inputs the kernel sees
        x.update({n: x[n].to(dtype).double() for n in ("r", "k", "v")})
    metric, err_fwd, err_bwd, worst = errors_vs_reference(compiled, x, dtype)
    return CheckRow(
        shape=shape,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        metric=metric,
        err_forward=err_fwd,
        err_backward=err_bwd,
        worst_grad=worst,
        seconds_compiled=fwd_bwd_seconds(compiled, x, dtype, reps),
        seconds_reference=fwd_bwd_seconds(wkv5_chunked, x, dtype, reps),
    )
