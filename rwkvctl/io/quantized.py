"""The quantized checkpoint format: how packed weights are stored and turned back into tensors.

A quantized checkpoint is a `.safetensors` file. A quantized weight `W` (out, in) is stored as
`W.qweight` (uint8; two 4-bit codes per byte, low nibble first, or one 8-bit code), `W.scale` and `W.min`
(fp16, (out, in // group)); element j of row i is `code * scale[i, j // group] + min[i, j // group]`. Every other
tensor is stored as is. The safetensors metadata key "rwkvctl-quant" lists the quantized weights with their bits,
group size, shape and original dtype. Choosing the codes (rwkvctl.quant) is separate from this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rwkvctl.errors import CheckpointError

META_KEY = "rwkvctl-quant"
FORMAT_VERSION = 1
SUFFIXES = (".qweight", ".scale", ".min")
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


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
    w = grouped * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return w.view(out, cols)


def quant_metadata(entries: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"format": FORMAT_VERSION, "tensors": entries})


@dataclass(frozen=True)
class PackedWeight:
    """One quantized weight as stored: codes, per-group scale and minimum, and what it expands to."""

    packed: Tensor  # uint8 (out, in / 2) at 4 bits, (out, in) at 8
    scale: Tensor  # fp16 (out, in / group)
    minimum: Tensor  # fp16 (out, in / group)
    bits: int
    group: int
    dtype: torch.dtype  # of the original weight

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.scale.shape[1] * self.group)

    def expand(self, rows: slice = slice(None)) -> Tensor:
        """The weight (or some of its rows) in fp32."""
        return dequantize(self.packed[rows], self.scale[rows], self.minimum[rows], self.bits, self.group)


def split_quantized(
    tensors: dict[str, Tensor], raw_meta: str, *, source: str
) -> tuple[dict[str, Tensor], dict[str, PackedWeight]]:
    """A quantized file's tensors -> (the tensors stored as they are, the quantized weights by original name).
    Damaged or inconsistent entries are one-line `CheckpointError`s naming the tensor."""
    try:
        meta = json.loads(raw_meta)
        entries = meta["tensors"]
        if meta.get("format") != FORMAT_VERSION or not isinstance(entries, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{source}: damaged quantization metadata ({META_KEY!r})") from None
    plain = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    packed: dict[str, PackedWeight] = {}
    for name, e in entries.items():
        try:
            bits, group, shape, dtype = int(e["bits"]), int(e["group"]), tuple(e["shape"]), DTYPES[e["dtype"]]
            codes, scale, minimum = (tensors[name + s] for s in SUFFIXES)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: quantized tensor {name!r} is incomplete ({err})") from None
        rows, cols = shape if len(shape) == 2 else (0, 0)
        per_byte = 2 if bits == 4 else 1
        ok = (
            bits in (4, 8)
            and group > 0
            and cols % group == 0
            and codes.dtype == torch.uint8
            and tuple(codes.shape) == (rows, cols // per_byte)
            and tuple(scale.shape) == tuple(minimum.shape) == (rows, cols // group)
        )
        if not ok:
            raise CheckpointError(f"{source}: quantized tensor {name!r} has inconsistent shapes or settings")
        packed[name] = PackedWeight(codes, scale, minimum, bits, group, dtype)
    return plain, packed


def quant_summary(packed: dict[str, PackedWeight]) -> dict:
    by_bits: dict[int, int] = {}
    for w in packed.values():
        by_bits[w.bits] = by_bits.get(w.bits, 0) + w.shape[0] * w.shape[1]
    return {"quantized_tensors": len(packed), "params_by_bits": {str(b): n for b, n in sorted(by_bits.items())}}
