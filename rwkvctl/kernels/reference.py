"""Pure-PyTorch WKV5 (RWKV v5.2 linear attention): the numerics oracle and the fallback.

Conventions shared by every WKV5 implementation in rwkvctl (reference, C++ CPU, CUDA):

    r, k, v : (B, T, H, N)   any float dtype; y has the dtype of r
    w       : (H, N)         raw `time_decay`; the per-step decay is exp(-exp(w))
    u       : (H, N)         raw `time_faaaa` (bonus of the current token)
    state   : (B, H, N, N)   fp32, indexed [b, h, key j, value i]; None means zeros

    y_t[i]    = sum_j r_t[j] * (u_j k_t[j] v_t[i] + S_{t-1}[j, i])
    S_t[j, i] = exp(-exp(w_j)) * S_{t-1}[j, i] + k_t[j] v_t[i]

Both functions return (y, final_state) and are differentiable in every input, the incoming state
included, so states can be chained across segments with exact BPTT.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 32


def _prepare(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None):
    B, T, H, N = r.shape
    # fp32 math (what every kernel does), or fp64 when the inputs are fp64: the oracle for the kernels
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    if state is None:
        state = r.new_zeros(B, H, N, N, dtype=dt)
    # (B, T, H, N) -> (B, H, T, N)
    r, k, v = (x.to(dt).transpose(1, 2) for x in (r, k, v))
    # log of the per-step decay, <= 0. Beyond w = 80 the decay exp(-exp(w)) is exactly 0 in any float
    # type; clamping w there keeps log_w finite, so no 0 * -inf = NaN appears in values or gradients.
    log_w = -torch.exp(w.to(dt).clamp(max=80.0))  # (H, N)
    return r, k, v, log_w, u.to(dt), state.to(dt)


def wkv5_loop(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact per-step recurrence. Slow; the oracle for every other implementation."""
    out_dtype = r.dtype
    r, k, v, log_w, u, s = _prepare(r, k, v, w, u, state)
    decay = torch.exp(log_w)[None, :, :, None]  # (1, H, N, 1) over [key j, value i]
    bonus = u[None, :, :, None]
    ys = []
    for t in range(r.shape[2]):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, N_key, N_value)
        ys.append(torch.einsum("bhj,bhji->bhi", r[:, :, t], bonus * kv + s))
        s = decay * s + kv
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(r.shape[0], 0, r.shape[1], r.shape[3])  # (B, T, H, N)
    return y.to(out_dtype), s


def _chunk_block(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One sequential block of L steps for all (B, H) at once. r,k,v: (B, H, L, N); s: (B, H, N, N)."""
    L = r.shape[2]
    pos = torch.arange(L, device=r.device, dtype=log_w.dtype)
    # Pairwise decay w^(t-1-s) for s < t, kept per key channel: (H, L_t, L_s, N). Computing the exponent
    # pairwise (instead of factoring w^t * w^-s) cannot overflow, however strong a learned decay is.
    gap = (pos[:, None] - pos[None, :] - 1).clamp(min=0)
    causal = (pos[:, None] > pos[None, :]).to(log_w.dtype)
    pair_decay = torch.exp(gap[None, :, :, None] * log_w[:, None, None, :]) * causal[None, :, :, None]
    # intra-block attention matrix: A[b,h,t,s] = sum_j r_t[j] k_s[j] w_j^(t-1-s)
    att = torch.einsum("bhtj,htsj,bhsj->bhts", r, pair_decay, k)
    diag = (r * u[None, :, None, :] * k).sum(-1)  # (B, H, L): the current-token bonus term
    y = att @ v + diag[..., None] * v
    # contribution of the incoming state: (r_t * w^t) @ S
    decay_from_start = torch.exp(pos[None, :, None] * log_w[:, None, :])  # (H, L, N)
    y = y + (r * decay_from_start[None]) @ s
    # outgoing state: w^L S + sum_s (w^(L-1-s) * k_s)^T v_s
    decay_to_end = torch.exp((L - 1 - pos)[None, :, None] * log_w[:, None, :])  # (H, L, N)
    s = torch.exp(L * log_w)[None, :, :, None] * s + (k * decay_to_end[None]).transpose(-1, -2) @ v
    return y, s


def wkv5_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Chunked matrix form: matmuls inside blocks of `chunk` steps, a short scan across blocks.

    Same result as `wkv5_loop` up to fp32 rounding; fast enough to train small models on CPU.
    """
    out_dtype = r.dtype
    B, T, H, N = r.shape
    r, k, v, log_w, u, s = _prepare(r, k, v, w, u, state)
    ys = []
    for start in range(0, T, chunk):
        stop = min(start + chunk, T)
        y, s = _chunk_block(r[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], log_w, u, s)
        ys.append(y)
    y = torch.cat(ys, dim=2) if ys else r.new_zeros(B, H, 0, N)
    return y.transpose(1, 2).to(out_dtype), s  # (B, H, T, N) -> (B, T, H, N)
