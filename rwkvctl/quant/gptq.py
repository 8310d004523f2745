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

Cost: one Python step per input column, each O(out) work (rows split over threads), plus a blocked rank-`BLOCK`
update of the remaining columns per block of columns (one matmul): O(out * in^2) flops, ~1 s for 768 x 768 here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkvctl.errors import ConfigError
from rwkvctl.quant.search import parallel_chunks, search_chunk, single_threaded_ops

DAMP = 0.01  # fraction of the mean diagonal of H added to it (the GPTQ paper's default)
BLOCK = 128  # columns per blocked (lazy) update: a multiple of common group sizes keeps groups inside a block
MIN_ROWS = 64  # rows per thread at least: fewer would spend the time in Python per column step
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
    minimum fp32 (out, in // group), already rounded to fp16 values). `group` must divide `in`.

    Rows are independent given H (each row's errors only move that row's later columns), so chunks of rows run on
    the search's thread pool, each op single-threaded (rwkvctl.quant.search.parallel_chunks: measured 17x faster
    than torch's intra-op threads for these (rows,)-sized column steps on the shared 2-core box)."""
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ConfigError(f"its calibration Hessian is {tuple(hessian.shape)}, not ({cols}, {cols})")
    with single_threaded_ops():  # a multi-threaded Cholesky of this size is ~100x slower on the loaded box
        u = inverse_hessian_factor(hessian, damp)
    energy = hessian.diagonal().float().clamp_min(0)  # (in,): weights the range search, as --calib's range mode
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, cols // group)
    minimum = torch.empty_like(scale)
    chunk = max(MIN_ROWS, -(-rows // max(1, torch.get_num_threads())))

    def one_chunk(a: int) -> None:
        c, s, m = _gptq_rows(w[a : a + chunk].detach().float(), u, energy, 2**bits - 1, group, search)
        codes[a : a + chunk], scale[a : a + chunk], minimum[a : a + chunk] = c, s, m

    parallel_chunks(one_chunk, range(0, rows, chunk))
    return codes, scale, minimum


def _gptq_rows(
    w: Tensor, u: Tensor, energy: Tensor, levels: int, group: int, search: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ over some rows w (r, in) -> (codes uint8 (r, in), scale, minimum (r, in // group)). Works on the
    transpose (in, r), so that each column step reads and writes contiguous memory."""
    cols, r = w.shape[1], w.shape[0]
    work = w.T.contiguous()  # (r, in) -> (in, r): updated in place as columns are quantized
    codes = torch.empty(cols, r, dtype=torch.uint8)
    scale = torch.empty(cols // group, r)
    minimum = torch.empty_like(scale)
    block = max(group, BLOCK // group * group)  # whole groups per block
    for a in range(0, cols, block):
        b = min(a + block, cols)
        errors = torch.empty(b - a, r)  # scaled errors e_j / U[j, j] of this block's columns
        for j in range(a, b):
            g = j // group
            if j % group == 0:  # a new group: its range from the weights as updated so far
                x = work[j : j + group].T.unsqueeze(1)  # (group, r) -> (r, 1, group)
                weight = energy[j : j + group].view(1, group)  # (groups=1, group)
                _, s, m, _ = search_chunk(x, levels, search, weight if search else None)
                scale[g], minimum[g] = s[:, 0], m[:, 0]
            s, m = scale[g], minimum[g]
            inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))  # a constant group: code 0, the minimum holds it
            q = ((work[j] - m) * inv).round_().clamp_(0, levels)
            codes[j] = q.to(torch.uint8)
            err = (work[j] - (q * s + m)) / u[j, j]
            errors[j - a] = err
            work[j + 1 : b] -= u[j, j + 1 : b].unsqueeze(1) * err.unsqueeze(0)  # (rest of block, 1) x (1, r)
        work[b:] -= u[a:b, b:].T @ errors  # the block's updates to every later column at once
    return codes.T, scale.T, minimum.T


def output_error(x: Tensor, w: Tensor, w_q: Tensor) -> float:
    """||x W.T - x W_q.T|| / ||x W.T||: the relative error of a layer's outputs on inputs x (n, in)."""
    ref = x.float() @ w.float().T
    return float((ref - x.float() @ w_q.float().T).norm() / ref.norm().clamp_min(1e-30))
