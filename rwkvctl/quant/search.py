"""The range search of the group-affine scheme: each group's (scale, minimum) chosen for least (weighted) error.

For every group of `group` weights, K candidate ranges (the min..max range shrunk around its centre by each of
`RANGE_RATIOS`) are tried at once, as one broadcast over a candidate axis, and the least-error one is refined by a
least-squares fit of (scale, minimum) to its codes, kept where it helps. The error of a candidate is measured as
the file will store it (scale and minimum rounded to fp16), and can be weighted per input channel: with
`importance` (mean squared input activation of each column, from calibration text) the search minimises the error
of the layer's *outputs* rather than of its weights (activation-aware quantization).

Speed: a chunk of rows (`CHUNK_ELEMENTS` weights times K candidates, `chunk_rows`) goes through
a few passes per candidate. Chunks run on a pool of Python threads, each op single-threaded (`parallel_chunks`):
torch's own intra-op threads on ops this small spend most of their time waiting for each other, 10x slower than
one thread when the cores are shared (measured on the 2-core box under load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

# Fractions of a group's min..max range tried (shrunk around its centre); 1.0 is plain min/max. At 8 bits the
# narrower ranges gain nothing over min/max plus the least-squares fit (measured: same error to 3 digits), so 8-bit
# groups try min/max only, 9x less work for emb and head.
RANGE_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
RANGE_RATIOS_8BIT = (1.0,)
# weights x candidates per chunk: fp32 temporaries of ~2 MB. Measured on the 2-core box: 64K weights at 8 candidates
# and 512K at 1 (8-bit emb/head) beat smaller chunks, whose per-op overhead dominated (the 0.1b head: 2.0 s -> 0.5 s)
CHUNK_ELEMENTS = 1 << 19


T = TypeVar("T")


@contextmanager
def single_threaded_ops() -> Iterator[int]:
    """torch ops on one thread each for the duration; yields the thread count that was set (the pool's size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def parallel_chunks(work: Callable[[int], T], starts: Sequence[int]) -> list[T]:
    """`work(start)` for every start, on as many Python threads as torch was set to use (torch ops release the
    GIL), each op single-threaded; results in order."""
    with single_threaded_ops() as threads:
        if threads <= 1 or len(starts) <= 1:
            return [work(a) for a in starts]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, starts))


def chunk_rows(cols: int, levels: int, search: bool) -> int:
    """Rows of a (rows, cols) weight per chunk: CHUNK_ELEMENTS weights x candidates tried."""
    candidates = len(RANGE_RATIOS if levels < 255 else RANGE_RATIOS_8BIT) if search else 1
    return max(1, CHUNK_ELEMENTS // candidates // cols)


def stored_scale_min(lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Per-group step and offset as stored (rounded to fp16), so the search measures the real error."""
    s = ((hi - lo) / levels).half().float()
    return s, lo.half().float()


def codes_and_residual(x: Tensor, scale: Tensor, minimum: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Nearest codes of `x` (..., group) on the grid of (scale, minimum) (...,), and (x - decoded) / scale: the
    residual in steps, so that the error is scale^2 * sum(residual^2). A zero scale (a constant group) gives
    codes 0 (the minimum holds the value) and a zero residual."""
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale)).unsqueeze(-1)
    t = torch.sub(x, minimum.unsqueeze(-1)).mul_(inv)  # position on the grid, in steps
    codes = t.round().clamp_(0, levels)
    return codes, t.sub_(codes)


def _least_squares(
    x: Tensor, codes: Tensor, weight: Tensor | None, scale: Tensor, minimum: Tensor
) -> tuple[Tensor, Tensor]:
    """(scale, minimum) minimising sum weight * (codes * scale + minimum - x)^2 per group for fixed codes, rounded
    to fp16; groups whose codes are all equal (or whose fit is not a positive step) keep the given ones."""
    if weight is None:
        sw = torch.full_like(scale, x.shape[-1])
        sq, sx, sqq, sqx = codes.sum(-1), x.sum(-1), (codes * codes).sum(-1), (codes * x).sum(-1)
    else:
        wq = weight * codes
        sw, sq, sx = weight.sum(-1).expand_as(scale), wq.sum(-1), (weight * x).sum(-1)
        sqq, sqx = (wq * codes).sum(-1), (wq * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq.clamp_min(1e-30)
    s = (sw * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det))
    m = (sx - s * sq) / sw.clamp_min(1e-30)
    s, m = s.half().float(), m.half().float()
    ok &= torch.isfinite(s) & torch.isfinite(m) & (s > 0)
    return torch.where(ok, s, scale), torch.where(ok, m, minimum)


def _weighted(r: Tensor, weight: Tensor | None, scale: Tensor) -> Tensor:
    """Error per group from residuals in steps: scale^2 * sum(weight * r^2)."""
    if weight is None:  # one fused pass, no temporary of r's size
        return torch.linalg.vector_norm(r, dim=-1).square_().mul_(scale.square())
    return r.square().mul_(weight).sum(-1) * scale.square()


def search_chunk(
    x: Tensor, levels: int, search: bool, importance: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk of groups x (r, groups, group) -> (codes as uint8 (r, groups, group), scale, minimum (r, groups),
    squared error per group (r, groups), unweighted). `importance` (groups, group) weights the search's error."""
    lo, hi = x.amin(-1), x.amax(-1)
    if not search:
        s, m = stored_scale_min(lo, hi, levels)
        codes, r = codes_and_residual(x, s, m, levels)
        return codes.to(torch.uint8), s, m, _weighted(r, None, s)
    ratios = torch.tensor(RANGE_RATIOS if levels < 255 else RANGE_RATIOS_8BIT, dtype=x.dtype)
    centre, half = ((hi + lo) / 2).unsqueeze(-1), ((hi - lo) / 2).unsqueeze(-1)
    s_all, m_all = stored_scale_min(centre - half * ratios, centre + half * ratios, levels)  # (r, groups, K)
    weight = None if importance is None else importance.unsqueeze(1)  # (groups, 1, group): over K
    _, r_all = codes_and_residual(x.unsqueeze(-2), s_all, m_all, levels)  # (r, groups, K, group)
    best = _weighted(r_all, weight, s_all).argmin(-1, keepdim=True)  # (r, groups, 1)
    del r_all
    s, m = s_all.gather(-1, best).squeeze(-1), m_all.gather(-1, best).squeeze(-1)
    codes, r = codes_and_residual(x, s, m, levels)
    s2, m2 = _least_squares(x, codes, importance, s, m)
    codes2, r2 = codes_and_residual(x, s2, m2, levels)
    better = _weighted(r2, importance, s2) < _weighted(r, importance, s)  # (r, groups)
    keep = better.unsqueeze(-1)
    codes, r = torch.where(keep, codes2, codes), torch.where(keep, r2, r)
    s, m = torch.where(better, s2, s), torch.where(better, m2, m)
    return codes.to(torch.uint8), s, m, _weighted(r, None, s)
