"""GPTQ-style error feedback for the group-affine scheme: codes chosen column by column so that each column's rounding
error is compensated by the columns not yet quantized, using the layer's input second moments from calibration text.

For a Linear layer y = x @ W.T and calibration inputs X (n, in), the output error of a quantized weight Q is
||X (W - Q).T||^2 = sum over rows of (w - q) H (w - q).T with H = X.T X / n (in, in). GPTQ (Frantar et al., 2022)
quantizes the input columns in order; after column j is rounded, its error e_j (one value per output row) is spread
over the later columns by the optimal least-squares update W[:, j+1:] -= e_j / U[j, j] * U[j, j+1:], where U is the
upper Cholesky factor of H^-1 (the rows of U are the inverse-Hessian updates of the successive column eliminations).
H is damped by `damp` x its mean diagonal so that the factorisation exists and the updates stay small.

The stored form is exactly group-affine's (rwkvctl.quant.groupwise): groups of `group` consecutive inputs per row,
each with one fp16 (scale, minimum). A group's (scale, minimum) is chosen when its first column is reached, from the
weights as updated so far, by the same range search as the uncalibrated path, weighted by diag(H) (each input's
activation energy). No column reordering ("act-order"): the groups must stay contiguous for the file format.

Cost: one Python step per input column, each O(out) work, plus a blocked rank-`BLOCK` update of the remaining
columns per block of columns (one matmul), so O(out * in^2 / BLOCK + out * in) with small constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvctl.errors import ConfigError
from rwkvctl.quant.search import search_chunk

DAMP = 0.01  # fraction of the mean diagonal of H added to it (the GPTQ paper's default)
BLOCK = 128  # columns per blocked (lazy) update: a multiple of common group sizes keeps groups inside a block
MAX_DAMP_TRIES = 6  # each retry multiplies the damping by 10 (a nearly singular H from too little text)


def inverse_hessian_factor(hessian: Tensor, damp: float = DAMP) -> Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, fp32 (in, in). Inputs that never carried
    any activation (a zero diagonal) get a unit diagonal: their columns are rounded plainly and never updated."""
    h = hessian.detach().float().clone()
    dead = h.diagonal() <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = 1
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(MAX_DAMP_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ConfigError("its calibration Hessian is not positive definite even with heavy damping; use more --calib text")


def gptq_codes(
    w: Tensor, hessian: Tensor, bits: int, group: int, search: bool = True, damp: float = DAMP
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize w (out, in) with error feedback under `hessian` (in, in) -> (codes uint8 (out, in), scale and
    minimum fp32 (out, in // group), already rounded to fp16 values). `group` must divide `in`."""
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ConfigError(f"its calibration Hessian is {tuple(hessian.shape)}, not ({cols}, {cols})")
    levels, ng = 2**bits - 1, cols // group
    work = w.detach().float().clone()  # updated in place as columns are quantized
    u = inverse_hessian_factor(hessian, damp)
    energy = hessian.diagonal().float().clamp_min(0)  # (in,): weights the range search, as --calib's range mode
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, ng)
    minimum = torch.empty(rows, ng)
    block = max(group, BLOCK // group * group)  # whole groups per block
    for a in range(0, cols, block):
        b = min(a + block, cols)
        errors = torch.empty(rows, b - a)  # scaled errors e_j / U[j, j] of this block's columns
        for j in range(a, b):
            if j % group == 0:  # a new group: its range from the weights as updated so far
                g = j // group
                x = work[:, j : j + group].unsqueeze(1)  # (out, group) -> (out, 1, group)
                weight = energy[j : j + group].view(1, group)  # (groups=1, group)
                _, s, m, _ = search_chunk(x, levels, search, weight if search else None)
                scale[:, g], minimum[:, g] = s[:, 0], m[:, 0]
            s, m = scale[:, j // group], minimum[:, j // group]
            inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))  # a constant group: code 0, the minimum holds it
            q = ((work[:, j] - m) * inv).round_().clamp_(0, levels)
            codes[:, j] = q.to(torch.uint8)
            err = (work[:, j] - (q * s + m)) / u[j, j]
            errors[:, j - a] = err
            work[:, j + 1 : b] -= err.unsqueeze(1) * u[j, j + 1 : b].unsqueeze(0)  # (out, 1) x (1, rest of block)
        work[:, b:] -= errors @ u[a:b, b:]  # the block's updates to every later column at once
    return codes, scale, minimum


def output_error(x: Tensor, w: Tensor, w_q: Tensor) -> float:
    """||x W.T - x W_q.T|| / ||x W.T||: the relative error of a layer's outputs on inputs x (n, in)."""
    ref = x.float() @ w.float().T
    return float((ref - x.float() @ w_q.float().T).norm() / ref.norm().clamp_min(1e-30))
