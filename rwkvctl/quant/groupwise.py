"""The "group-affine" scheme: group-wise asymmetric 4-bit (or 8-bit) codes whose range is searched for least error.

Each row of a weight matrix is cut into groups of `group` inputs; a group gets a fp16 scale and minimum and its
weights become integer codes in [0, 2^bits). Besides the group's min..max range, a few narrower ranges are tried
and the one with the least squared error is kept, then refined by a least-squares fit (rwkvctl.quant.search; less
error than min/max at 4 bits and group 64 on Gaussian or heavy-tailed weights, more with larger groups; with
calibration the error is weighted by each input's activation energy). Small groups are what keeps 4-bit quality:
rwkv.cpp's plain Q4_0/Q4_1 use 32-weight groups too, but also quantize the activations, and per-matrix scales collapse
(rwkv.cpp#12). Only weights are quantized; activations stay in float. At group 64 that is 4.5 bits per weight
(4 + two fp16 per 64).

Stored tensors: `qweight` (uint8; two 4-bit codes per byte, low nibble first, or one 8-bit code), `scale` and `min`
(fp16, (out, in // group)). Parameters: `bits`, `group`. Element j of row i is
`code * scale[i, j // group] + min[i, j // group]`: `from_codes` below is the one place that formula is written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rwkvctl.errors import ConfigError
from rwkvctl.quant.gptq import gptq_codes
from rwkvctl.quant.schemes import Encoded, Params, Scheme, register
from rwkvctl.quant.search import chunk_rows, parallel_chunks, search_chunk

NAME = "group-affine"
BITS = (4, 8)
GROUPED_ROWS_MAX = 16  # inputs of at most this many rows (RNN steps) take the grouped-dot matmul


def from_codes(codes: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
    """The affine formula, code -> value: codes (..., groups, group), scale and minimum (..., groups), all fp32."""
    return codes * scale.unsqueeze(-1) + minimum.unsqueeze(-1)


def to_codes(x: Tensor, scale: Tensor, minimum: Tensor, levels: int) -> Tensor:
    """Its inverse, value -> nearest code in [0, levels] (as fp32); shapes as in `from_codes`."""
    step = scale.unsqueeze(-1)
    safe = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every code 0, exact via minimum
    return ((x - minimum.unsqueeze(-1)) / safe).round().clamp(0, levels)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(out, in) integer codes in [0, 2^bits) -> uint8 storage: (out, in / 2) for 4 bits, (out, in) for 8."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bits != 4 or codes.shape[-1] % 2:
        raise ValueError(f"cannot pack {bits}-bit codes of shape {tuple(codes.shape)}")
    pairs = codes.view(*codes.shape[:-1], -1, 2)  # (out, in) -> (out, in/2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (out, in/2) -> (out, in/2, 2) -> (out, in)


def dequantize(packed: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """fp32 weight from its stored form."""
    codes = unpack_codes(packed, bits).float()
    out, cols = codes.shape
    grouped = codes.view(out, cols // group, group)  # (out, in) -> (out, in/group, group)
    return from_codes(grouped, scale.float(), minimum.float()).view(out, cols)


def group_size_for(cols: int, group: int) -> int:
    """The requested group, or the largest even divisor of the row length below it (tiny models). A divisor under
    half the request is refused: its scales would cost more bits than the codes save (2 weights: 20 bits each)."""
    wanted = min(group, cols)
    g = wanted
    while g > 2 and (cols % g or g % 2):
        g -= 1
    if cols % g or g % 2 or g < wanted / 2:
        raise ConfigError(
            f"rows of {cols} weights split into groups of {g} at best (asked for {group}); pass a --group that "
            f"divides {cols}, or keep this tensor unquantized"
        )
    return g


def quantize_weight(
    w: Tensor, bits: int, group: int, search: bool = True, importance: Tensor | None = None
) -> Encoded:
    """Quantize a 2-D weight (out, in); `group` must divide `in`. `importance` (in,): the mean squared input
    activation of each column (calibration), weighting the range search's error (rwkvctl.quant.search)."""
    rows, cols = w.shape
    levels, ng = 2**bits - 1, cols // group
    packed = torch.empty(rows, cols * bits // 8, dtype=torch.uint8)
    scale = torch.empty(rows, ng, dtype=torch.float16)
    minimum = torch.empty_like(scale)
    weight = None if importance is None else importance.float().view(ng, group)  # (in,) -> (groups, group)
    chunk = chunk_rows(cols, levels, search)

    def one_chunk(a: int) -> tuple[float, float, bool]:  # fills rows a..a+chunk; -> (sq. error, sq. norm, finite)
        x = w[a : a + chunk].detach().float()  # a bf16 source is widened a chunk at a time
        sq_norm = float(x.square().sum())
        if not math.isfinite(sq_norm):  # a NaN or Inf weight (or beyond fp32 range when squared)
            return 0.0, 0.0, bool(torch.isfinite(x).all())
        c, s, m, err = search_chunk(x.view(-1, ng, group), levels, search, weight)  # (r, in) -> (r, groups, group)
        packed[a : a + chunk] = pack_codes(c.view(-1, cols), bits)  # (r, groups, group) -> (r, in)
        scale[a : a + chunk], minimum[a : a + chunk] = s.half(), m.half()
        return float(err.sum()), sq_norm, True

    sums = parallel_chunks(one_chunk, range(0, rows, chunk))
    if not all(finite for _, _, finite in sums):
        raise ConfigError("holds NaN or infinite values; quantize a healthy checkpoint")
    sq_err, sq_norm = sum(e for e, _, _ in sums), sum(n for _, n, _ in sums)
    if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
        raise ConfigError("has values beyond the fp16 range of the scales (|w| > 65504); keep it unquantized")
    rel = (sq_err / sq_norm) ** 0.5 if sq_norm > 0 else 0.0
    stored = {"qweight": packed, "scale": scale, "min": minimum}
    return Encoded(stored, {"bits": bits, "group": group}, rel)


def quantize_weight_gptq(w: Tensor, bits: int, group: int, hessian: Tensor, search: bool = True) -> Encoded:
    """Quantize a 2-D weight (out, in) with GPTQ error feedback under the calibration Hessian (in, in)
    (rwkvctl.quant.gptq): the same stored form as `quantize_weight`, other codes and ranges."""
    x = w.detach().float()
    sq_norm = float(x.square().sum())
    if not math.isfinite(sq_norm):
        raise ConfigError("holds NaN or infinite values; quantize a healthy checkpoint")
    codes, scale, minimum = gptq_codes(x, hessian, bits, group, search)
    if not (torch.isfinite(scale.half()).all() and torch.isfinite(minimum.half()).all()):
        raise ConfigError("has values beyond the fp16 range of the scales (|w| > 65504); keep it unquantized")
    rows, cols = w.shape
    decoded = from_codes(codes.float().view(rows, -1, group), scale, minimum).view(rows, cols)  # (out, groups, group)
    rel = float((decoded - x).norm()) / sq_norm**0.5 if sq_norm > 0 else 0.0
    stored = {"qweight": pack_codes(codes, bits), "scale": scale.half(), "min": minimum.half()}
    return Encoded(stored, {"bits": bits, "group": group}, rel)


class GroupAffine(Scheme):
    name = NAME
    tensor_names = ("qweight", "scale", "min")

    def check_options(self, options: dict[str, Any]) -> None:
        if options.get("bits") not in BITS:
            raise ConfigError("--bits and --embed-bits must be 4 or 8 (embeddings may also stay unquantized)")
        group = options.get("group")
        if not isinstance(group, int) or group < 2 or group % 2:
            raise ConfigError(f"--group must be an even number >= 2, got {group}")

    def encode(
        self, w: Tensor, *, bits: int = 4, group: int = 64, search: bool = True, importance: Tensor | None = None,
        hessian: Tensor | None = None, **_: Any,
    ) -> Encoded:
        """`importance` (in,): calibrated range search; `hessian` (in, in): GPTQ error feedback (it takes
        precedence: its range search is weighted by the Hessian's diagonal)."""
        g = group_size_for(w.shape[1], group)
        if hessian is not None:
            return quantize_weight_gptq(w, bits, g, hessian, search)
        return quantize_weight(w, bits, g, search, importance)

    def stored_layout(
        self, shape: tuple[int, int], *, bits: int = 4, group: int = 64, **_: Any
    ) -> tuple[Params, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
        rows, cols = shape
        g = group_size_for(cols, group)
        return {"bits": bits, "group": g}, {
            "qweight": (torch.uint8, (rows, cols * bits // 8)),
            "scale": (torch.float16, (rows, cols // g)),
            "min": (torch.float16, (rows, cols // g)),
        }

    def check(self, stored: dict[str, Tensor], params: Params, shape: tuple[int, int]) -> None:
        bits, group = params.get("bits"), params.get("group")
        if bits not in BITS or isinstance(bits, bool) or not isinstance(group, int) or group <= 0:
            raise ValueError(f"bits must be 4 or 8 and group a positive integer, got bits={bits!r} group={group!r}")
        rows, cols = shape
        codes, scale, minimum = stored["qweight"], stored["scale"], stored["min"]
        if cols % group or codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, cols * bits // 8):
            raise ValueError(f"codes {tuple(codes.shape)} {codes.dtype} do not fit {bits}-bit groups of {group}")
        want = (rows, cols // group)
        if tuple(scale.shape) != want or tuple(minimum.shape) != want:
            raise ValueError(f"scale/min are {tuple(scale.shape)}/{tuple(minimum.shape)}, not {want}")

    def decode(self, stored: dict[str, Tensor], params: Params, rows: slice) -> Tensor:
        return dequantize(
            stored["qweight"][rows], stored["scale"][rows], stored["min"][rows], params["bits"], params["group"]
        )

    def matmul(self, x: Tensor, stored: dict[str, Tensor], params: Params, rows: slice) -> Tensor:
        if x.shape[0] > GROUPED_ROWS_MAX:
            return super().matmul(x, stored, params, rows)  # many rows: expand the block, one ordinary matmul
        return _grouped_matmul(x, stored["qweight"][rows], stored["scale"][rows], stored["min"][rows], params)

    def describe(self, params: Params) -> str:
        return f"{params['bits']}-bit, group {params['group']}"

    def affine_view(self, stored: dict[str, Tensor], params: Params) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """The stored form as the packed-weight kernel takes it (rwkvctl/quant/linear.py): here, the form itself."""
        return stored["qweight"], stored["scale"], stored["min"], params["bits"], params["group"]


def _grouped_matmul(x: Tensor, codes: Tensor, scale: Tensor, minimum: Tensor, params: Params) -> Tensor:
    """x @ W.T without building W: `from_codes` summed over a group's dot product is
    scale * (codes . x) + minimum * sum(x), so only the integer codes are widened (3-4x faster than expanding W
    for a few input rows)."""
    n, g, cols = x.shape[0], params["group"], x.shape[1]
    ng = cols // g
    x32 = x.float()
    # at 4 bits the low nibbles hold even inputs and the high nibbles odd ones
    halves = ((codes & 0x0F, x32[:, 0::2]), (codes >> 4, x32[:, 1::2])) if params["bits"] == 4 else ((codes, x32),)
    dots = sum(
        torch.einsum("ogk,ngk->nog", c.float().view(-1, ng, c.shape[1] // ng), xs.reshape(n, ng, -1))
        for c, xs in halves
    )  # (n, out, groups)
    return (dots * scale.float()).sum(-1) + x32.view(n, ng, g).sum(-1) @ minimum.float().T


register(GroupAffine())
