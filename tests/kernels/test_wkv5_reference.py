"""The chunked pure-PyTorch WKV5 against the exact per-step loop (values, final state, gradients)."""

import pytest
import torch

from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop


def inputs(B, T, H, N, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(H, N, generator=g, dtype=torch.float64) - 1.0
    u = torch.randn(H, N, generator=g, dtype=torch.float64) * 0.5
    s = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) if with_state else None
    return r, k, v, w, u, s


@pytest.mark.parametrize("T", [1, 2, 63, 65, 257])
def test_chunked_matches_loop(T):
    r, k, v, w, u, s = inputs(2, T, 3, 16, seed=T)
    y1, s1 = wkv5_loop(r, k, v, w, u, s)
    y2, s2 = wkv5_chunked(r, k, v, w, u, s)
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-4)
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T", [1, 2, 63, 65])
def test_chunked_gradients_match_loop(T):
    base = inputs(2, T, 2, 8, seed=10 + T)
    grads = []
    for fn in (wkv5_loop, wkv5_chunked):
        leaves = [x.clone().requires_grad_(True) for x in base]
        y, s = fn(*leaves)
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        gs = torch.linspace(1, -1, s.numel(), dtype=s.dtype).view_as(s)
        ((y * gy).sum() + (s * gs).sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(["r", "k", "v", "w", "u", "s"], *grads, strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-3), name


def test_zero_state_is_default_and_strong_decay_is_finite():
    r, k, v, w, u, _ = inputs(1, 70, 1, 8)
    y0, _ = wkv5_chunked(r, k, v, w, u, None)
    y1, _ = wkv5_chunked(r, k, v, w, u, torch.zeros(1, 1, 8, 8))
    assert torch.equal(y0, y1)
    # a learned decay far beyond init (w=exp(-e^4)) must not overflow the chunked form
    y, s = wkv5_chunked(r, k, v, torch.full_like(w, 4.0), u, None)
    yl, sl = wkv5_loop(r, k, v, torch.full_like(w, 4.0), u, None)
    assert torch.isfinite(y).all() and torch.allclose(y, yl, atol=1e-4)


def test_segments_chain_to_the_full_sequence():
    r, k, v, w, u, s = inputs(2, 50, 2, 8)
    y_full, s_full = wkv5_chunked(r, k, v, w, u, s)
    ya, sa = wkv5_chunked(r[:, :21], k[:, :21], v[:, :21], w, u, s)
    yb, sb = wkv5_chunked(r[:, 21:], k[:, 21:], v[:, 21:], w, u, sa)
    assert torch.allclose(torch.cat([ya, yb], 1), y_full, atol=1e-4)
    assert torch.allclose(sb, s_full, atol=1e-4)
