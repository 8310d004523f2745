"""Weight quantization: group-wise asymmetric 4-bit (or 8-bit) codes whose range is searched for least error.

Each row of a weight matrix is cut into groups of `group` inputs; a group gets a fp16 scale and minimum and its
weights become integer codes in [0, 2^bits). Besides the group's min..max range, a few narrower ranges are tried
and the one with the least squared error is kept (~4% less error than min/max at 4 bits and group 64 on Gaussian
or heavy-tailed weights; more with larger groups). Small groups are what keeps 4-bit quality: rwkv.cpp's plain
Q4_0/Q4_1 use 32-weight groups too, but also quantize the activations, and per-matrix scales collapse
(rwkv.cpp#12). Only weights are quantized here; activations stay in float. At group 64 that is 4.5 bits per
weight (4 + two fp16 per 64).

Which tensors: the architecture's (rwkvctl.arch `QuantPatterns`; x052: the Linear weights inside the blocks) at
`bits`; the embedding and head at `embed_bits` (8 by default: they are large for a 65536 vocabulary and the most
sensitive, rwkv.cpp keeps them in fp16) or unchanged (None); everything else (time_*, LayerNorms) unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkvctl.arch import DEFAULT_ARCH, get_arch
from rwkvctl.errors import ConfigError
from rwkvctl.io.quantized import PackedWeight, dequantize, pack_codes

# Fractions of a group's min..max range tried (shrunk around its centre); 1.0 is plain min/max.
RANGE_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
ROWS_PER_CHUNK = 1024  # bounds the search's temporary memory (rows x in x fp32 per candidate)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group: int = 64
    embed_bits: int | None = 8
    search: bool = True
    architecture: str = DEFAULT_ARCH  # whose quantizable-tensor patterns apply (rwkvctl.arch)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.embed_bits not in (4, 8, None):
            raise ConfigError("--bits and --embed-bits must be 4 or 8 (embeddings may also stay unquantized)")
        if self.group < 2 or self.group % 2:
            raise ConfigError(f"--group must be an even number >= 2, got {self.group}")

    def bits_for(self, name: str) -> int | None:
        patterns = get_arch(self.architecture).quant
        if name in patterns.embeddings:
            return self.embed_bits
        return self.bits if patterns.linear.search(name) else None


@dataclass
class QuantizedWeight:
    packed: Tensor  # uint8
    scale: Tensor  # fp16 (out, in/group)
    minimum: Tensor  # fp16 (out, in/group)
    bits: int
    group: int
    rel_error: float  # ||dequantized - w|| / ||w||


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


def quantize_weight(w: Tensor, bits: int, group: int, search: bool = True) -> QuantizedWeight:
    """Quantize a 2-D weight (out, in); `group` must divide `in`."""
    w32 = w.detach().float()
    if not torch.isfinite(w32).all():
        raise ConfigError("holds NaN or infinite values; quantize a healthy checkpoint")
    rows, cols = w32.shape
    levels = 2**bits - 1
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, cols // group, dtype=torch.float16)
    minimum = torch.empty_like(scale)
    for a in range(0, rows, ROWS_PER_CHUNK):
        x = w32[a : a + ROWS_PER_CHUNK].reshape(-1, cols // group, group)  # (r, in) -> (r, groups, group)
        lo, hi = x.amin(-1), x.amax(-1)
        centre, half = (hi + lo) / 2, (hi - lo) / 2
        best_err = best_s = best_m = None
        for ratio in RANGE_RATIOS if search else (1.0,):
            s, m = _scale_min(centre - half * ratio, centre + half * ratio, levels)
            q = _codes(x, s, m, levels)
            err = (q * s.unsqueeze(-1) + m.unsqueeze(-1) - x).square().sum(-1)  # (r, groups)
            if best_err is None:
                best_err, best_s, best_m = err, s, m
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        assert best_s is not None and best_m is not None
        codes[a : a + ROWS_PER_CHUNK] = _codes(x, best_s, best_m, levels).reshape(-1, cols).to(torch.uint8)
        scale[a : a + ROWS_PER_CHUNK], minimum[a : a + ROWS_PER_CHUNK] = best_s.half(), best_m.half()
    if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
        raise ConfigError("has values beyond the fp16 range of the scales (|w| > 65504); keep it unquantized")
    packed = pack_codes(codes, bits)
    restored = dequantize(packed, scale, minimum, bits, group)
    norm = float(w32.norm())
    rel = float((restored - w32).norm()) / norm if norm > 0 else 0.0
    return QuantizedWeight(packed, scale, minimum, bits, group, rel)


def _scale_min(lo: Tensor, hi: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Per-group step and offset as stored (rounded to fp16), so the search measures the real error."""
    s = ((hi - lo) / levels).half().float()
    return s, lo.half().float()


def _codes(x: Tensor, s: Tensor, m: Tensor, levels: int) -> Tensor:
    step = s.unsqueeze(-1)
    safe = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every code 0, exact via m
    return ((x - m.unsqueeze(-1)) / safe).round().clamp(0, levels)


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    bits: int | None  # None: stored unchanged
    group: int
    rel_error: float
    bytes: int


def quantize_state_dict(
    state_dict: dict[str, Tensor], spec: QuantSpec, on_tensor: Callable[[str, int], None] | None = None
) -> tuple[dict[str, Tensor], dict[str, dict], list[TensorReport]]:
    """-> (tensors to store, quantization metadata entries, one report per tensor). `on_tensor(name, total)` is
    called after each tensor (for progress)."""
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict] = {}
    reports: list[TensorReport] = []
    for name, w in state_dict.items():
        bits = spec.bits_for(name)
        if bits is None or w.dim() != 2:
            tensors[name] = w.contiguous()
            reports.append(TensorReport(name, tuple(w.shape), None, 0, 0.0, w.numel() * w.element_size()))
        else:
            try:
                group = group_size_for(w.shape[1], spec.group)
                qw = quantize_weight(w, bits, group, spec.search)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            tensors[name + ".qweight"], tensors[name + ".scale"], tensors[name + ".min"] = (
                qw.packed,
                qw.scale,
                qw.minimum,
            )
            entries[name] = {"bits": bits, "group": group, "shape": list(w.shape), "dtype": str(w.dtype)}
            size = sum(t.numel() * t.element_size() for t in (qw.packed, qw.scale, qw.minimum))
            reports.append(TensorReport(name, tuple(w.shape), bits, group, qw.rel_error, size))
        if on_tensor is not None:
            on_tensor(name, len(state_dict))
    return tensors, entries, reports


class QuantLinear(nn.Module):
    """A bias-free Linear layer whose weight stays packed in memory (4 or 8 bits plus two fp16 numbers per group)
    and is expanded, a block of rows at a time, for each call: memory of the packed form, compute of an ordinary
    matmul plus the expansion. Only the block being multiplied exists in float at any moment."""

    ROWS_PER_BLOCK_BYTES = 64 << 20  # fp32 bytes of expanded weight alive at once

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group = weight.bits, weight.group
        self.register_buffer("packed", weight.packed)
        # fp16 scales stored as int16 bits: `model.to(dtype)` casts floating buffers and must leave these alone
        self.register_buffer("scale_bits", weight.scale.view(torch.int16))
        self.register_buffer("minimum_bits", weight.minimum.view(torch.int16))
        self.rows_per_block = max(1, self.ROWS_PER_BLOCK_BYTES // (4 * self.in_features))

    GROUPED_ROWS_MAX = 16  # inputs of at most this many rows (RNN steps) take the grouped-dot path

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (..., in) -> (n, in)
        grouped = rows.shape[0] <= self.GROUPED_ROWS_MAX
        blocks = range(0, self.out_features, self.rows_per_block)
        parts = [
            self._grouped(rows, slice(a, a + self.rows_per_block)) if grouped
            else F.linear(rows, self._expand(slice(a, a + self.rows_per_block), x.dtype))
            for a in blocks
        ]  # fmt: skip
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _grouped(self, x: Tensor, rows: slice) -> Tensor:
        """x @ W.T without building W: per group, scale * (codes . x) + minimum * sum(x), so only the integer codes
        are widened (3-4x faster than expanding W for a few input rows)."""
        n, g = x.shape[0], self.group
        ng = self.in_features // g
        x32 = x.float()
        codes = self.packed[rows]
        # at 4 bits the low nibbles hold even inputs and the high nibbles odd ones
        halves = ((codes & 0x0F, x32[:, 0::2]), (codes >> 4, x32[:, 1::2])) if self.bits == 4 else ((codes, x32),)
        dots = sum(
            torch.einsum("ogk,ngk->nog", c.float().view(-1, ng, c.shape[1] // ng), xs.reshape(n, ng, -1))
            for c, xs in halves
        )  # (n, out, groups)
        scale = self.scale_bits[rows].view(torch.float16).float()
        minimum = self.minimum_bits[rows].view(torch.float16).float()
        return (dots * scale).sum(-1) + x32.view(n, ng, g).sum(-1) @ minimum.T

    def _expand(self, rows: slice, dtype: torch.dtype) -> Tensor:
        scale, minimum = self.scale_bits[rows].view(torch.float16), self.minimum_bits[rows].view(torch.float16)
        return dequantize(self.packed[rows], scale, minimum, self.bits, self.group).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"


def use_packed_weights(model: nn.Module, packed: dict[str, PackedWeight]) -> list[str]:
    """Swap the Linear layers whose weights are in `packed` (by state-dict name, `x.y.weight`) for QuantLinear
    layers (on the packed tensors' device; move the model afterwards). Returns the names swapped; other packed
    weights (the embedding) are left to the caller."""
    swapped = []
    modules = dict(model.named_modules())
    for name, weight in packed.items():
        owner = name.removesuffix(".weight")
        module = modules.get(owner)
        if not isinstance(module, nn.Linear) or module.bias is not None:
            continue
        parent_name, _, child = owner.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, QuantLinear(weight))
        swapped.append(name)
    return swapped
