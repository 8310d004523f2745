"""Which tensors of a checkpoint are quantized, at how many bits, with which scheme; and the run over a state dict.

The Linear weights inside the blocks go to `bits` in groups of `group`; the embedding and head to `embed_bits` (8 by
default: they are large for a 65536 vocabulary and the most sensitive, rwkv.cpp keeps them in fp16) in groups of
`embed_group` (default: `group`), or stay unchanged (None); everything else (time_*, LayerNorms) is stored
unchanged. `quantize_state_dict` takes any mapping, so a lazily read checkpoint is quantized one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    embed_group: int | None = None  # group of emb/head; None: `group`

    def __post_init__(self) -> None:
        try:
            scheme = get_scheme(self.scheme)
        except KeyError:
            known = ", ".join(scheme_names())
            raise ConfigError(f"unknown quantization scheme {self.scheme!r}; known: {known}") from None
        scheme.check_options(self.encode_options(self.bits, "block"))
        if self.embed_bits is not None:
            scheme.check_options(self.encode_options(self.embed_bits, "embedding"))

    def bits_for(self, name: str) -> int | None:
        kind = quantizable_kind(name, self.architecture)
        return self.embed_bits if kind == "embedding" else self.bits if kind == "block" else None

    def encode_options(self, bits: int, kind: TensorKind = "block") -> dict[str, Any]:
        group = self.embed_group if kind == "embedding" and self.embed_group is not None else self.group
        return {"bits": bits, "group": group, "search": self.search, **self.options}

    def record(self) -> dict[str, Any]:
        """The settings as the output's metadata records them (meta.extra["quantization"], with the source)."""
        rec: dict[str, Any] = {
            "bits": self.bits, "group": self.group, "embed_bits": self.embed_bits, "range_search": self.search
        }
        if self.embed_group is not None:  # absent by default: default files keep their metadata byte for byte
            rec["embed_group"] = self.embed_group
        return rec


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
    state_dict: Mapping[str, Tensor],
    spec: QuantSpec,
    on_tensor: Callable[[str, int], None] | None = None,
    importance: Mapping[str, Tensor] | None = None,
    hessians: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, PackedWeight], list[TensorReport]]:
    """-> (tensors stored unchanged, quantized weights by name, one report per tensor). `on_tensor(name, total)`
    is called after each tensor (for progress). `importance`: per weight name, the mean squared input activation
    of each input column (rwkvctl.quant.calibrate), weighting that weight's range search. `hessians`: per weight
    name, the second moments of its inputs (in, in), for GPTQ error feedback (rwkvctl.quant.gptq); looked up
    once per tensor, in order, so a mapping may compute them lazily."""
    importance = importance or {}
    hessians = hessians or {}
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
                options = spec.encode_options(bits, kind or "block")
                if name in importance:
                    options["importance"] = importance[name]
                if name in hessians:
                    options["hessian"] = hessians[name]
                pw, rel_error = encode_with(spec.scheme, w, **options)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            packed[name] = pw
            group = int(pw.params.get("group", 0))
            reports.append(TensorReport(name, tuple(w.shape), bits, group, rel_error, pw.nbytes, kind))
        if on_tensor is not None:
            on_tensor(name, len(state_dict))
    return plain, packed, reports
