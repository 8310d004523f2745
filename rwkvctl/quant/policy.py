"""Which tensors of a checkpoint are quantized, at how many bits, with which scheme; and the run over a state dict.

The Linear weights inside the blocks go to `bits`; the embedding and head to `embed_bits` (8 by default: they are
large for a 65536 vocabulary and the most sensitive, rwkv.cpp keeps them in fp16) or stay unchanged (None);
everything else (time_*, LayerNorms) is stored unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from rwkvctl.arch import DEFAULT_ARCH, get_arch
from rwkvctl.errors import ConfigError
from rwkvctl.quant import groupwise
from rwkvctl.quant.schemes import PackedWeight, encode_with, get_scheme, scheme_names

TensorKind = Literal["block", "embedding"]


def quantizable_kind(name: str, architecture: str = DEFAULT_ARCH) -> TensorKind | None:
    """'block' (a Linear weight inside a block), 'embedding' (emb/head) or None (never quantized), by the
    architecture's quantizable-tensor patterns (rwkvctl.arch `QuantPatterns`): the one place that decides."""
    patterns = get_arch(architecture).quant
    if name in patterns.embeddings:
        return "embedding"
    return "block" if patterns.linear.search(name) else None


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group: int = 64
    embed_bits: int | None = 8
    search: bool = True
    scheme: str = groupwise.NAME
    options: dict[str, Any] = field(default_factory=dict)  # further settings of a scheme other than the default
    architecture: str = DEFAULT_ARCH  # whose quantizable-tensor patterns apply (rwkvctl.arch)

    def __post_init__(self) -> None:
        try:
            scheme = get_scheme(self.scheme)
        except KeyError:
            known = ", ".join(scheme_names())
            raise ConfigError(f"unknown quantization scheme {self.scheme!r}; known: {known}") from None
        for bits in {self.bits, self.embed_bits} - {None}:
            scheme.check_options(self.encode_options(bits))

    def bits_for(self, name: str) -> int | None:
        kind = quantizable_kind(name, self.architecture)
        return self.embed_bits if kind == "embedding" else self.bits if kind == "block" else None

    def encode_options(self, bits: int) -> dict[str, Any]:
        return {"bits": bits, "group": self.group, "search": self.search, **self.options}


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    bits: int | None  # None: stored unchanged
    group: int
    rel_error: float
    bytes: int
    kind: TensorKind | None = None


def quantize_state_dict(
    state_dict: dict[str, Tensor], spec: QuantSpec, on_tensor: Callable[[str, int], None] | None = None
) -> tuple[dict[str, Tensor], dict[str, PackedWeight], list[TensorReport]]:
    """-> (tensors stored unchanged, quantized weights by name, one report per tensor). `on_tensor(name, total)`
    is called after each tensor (for progress)."""
    plain: dict[str, Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    reports: list[TensorReport] = []
    for name, w in state_dict.items():
        bits, kind = spec.bits_for(name), quantizable_kind(name, spec.architecture)
        if bits is None or w.dim() != 2:
            plain[name] = w.contiguous()
            reports.append(TensorReport(name, tuple(w.shape), None, 0, 0.0, w.numel() * w.element_size(), kind))
        else:
            try:
                pw, rel_error = encode_with(spec.scheme, w, **spec.encode_options(bits))
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            packed[name] = pw
            group = int(pw.params.get("group", 0))
            reports.append(TensorReport(name, tuple(w.shape), bits, group, rel_error, pw.nbytes, kind))
        if on_tensor is not None:
            on_tensor(name, len(state_dict))
    return plain, packed, reports
