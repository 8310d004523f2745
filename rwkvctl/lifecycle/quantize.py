"""`rwkvctl quantize` as a lifecycle stage: checkpoint -> quantized `.safetensors` (+ sidecar), with a quality check.

The source is streamed (read lazily, one tensor at a time); with calibration text the model runs over it once first
to weight each Linear layer's range search by its input activations ("range", the default calibration method), or,
with the "gptq" method, to gather the layers' input second moments for GPTQ error feedback (rwkvctl.quant.gptq),
once per batch of blocks whose (in, in) matrices fit `HESSIAN_BUDGET` (one pass for small models, one per block for
a 7B), only that batch's matrices held at a time.

The output loads everywhere a checkpoint does (`chat`, `inspect`, `load_model`): the loader dequantizes it. The
optional evaluation runs the original and the quantized model (read back from the written file, so the file
itself is what is checked) over the same text and reports both perplexities, the mean KL divergence of the
quantized model's next-token distribution from the original's, and how often their top-1 tokens agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkvctl.arch import arch_of
from rwkvctl.config import preset
from rwkvctl.dir_lock import writer_lock
from rwkvctl.errors import CheckpointError, ConfigError, DataError
from rwkvctl.fs import remove_temps
from rwkvctl.io.checkpoint import (
    CheckpointMeta,
    LazyCheckpoint,
    check_finite,
    checked_state_dict,
    normalize_keys,
    open_checkpoint_lazy,
    sidecar_path,
)
from rwkvctl.lifecycle.models import load_model, parse_dtype
from rwkvctl.names import INIT_SCHEMES
from rwkvctl.quant.calibrate import collect_hessians, collect_importance
from rwkvctl.quant.format import is_quantized, quantized_file_size, write_quantized
from rwkvctl.quant.policy import QuantSpec, TensorReport, quantizable_kind, quantize_state_dict
from rwkvctl.quant.schemes import get_scheme

CALIB_METHODS = ("range", "gptq")  # --calib-method: activation-weighted range search, or GPTQ error feedback
HESSIAN_BUDGET = 512 << 20  # bytes of (in, in) fp32 matrices gathered in one calibration pass ("gptq")


@dataclass
class QualityReport:
    tokens: int
    ppl_original: float
    ppl_quantized: float
    mean_kl: float  # nats per token, KL(original || quantized)
    top1_agreement: float

    @property
    def ppl_increase(self) -> float:
        return self.ppl_quantized / self.ppl_original - 1


@dataclass
class QuantizeResult:
    path: Path
    source_bytes: int
    output_bytes: int
    tensors: list[TensorReport]
    quality: QualityReport | None

    def bits_per_weight(self, bits: int) -> float:
        """Stored bits per weight of the tensors quantized to `bits` (codes plus scales and minimums)."""
        rows = [t for t in self.tensors if t.bits == bits]
        n = sum(math.prod(t.shape) for t in rows)
        return 8 * sum(t.bytes for t in rows) / n if n else 0.0


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    spec: QuantSpec,
    *,
    eval_tokens: list[int] | None = None,
    calib_tokens: list[int] | None = None,
    calib_method: str = "range",
    on_tensor: Callable[[str, int], None] | None = None,
    hessian_budget: int = HESSIAN_BUDGET,
) -> QuantizeResult:
    """Quantize `src` into `dst`, streaming: the source is read lazily (a memory-mapped `.pth` or `safe_open`) and
    quantized one tensor at a time, so memory is about one tensor plus the (4-7x smaller) output. `calib_tokens`:
    calibration text (rwkvctl.quant.calibrate), used by `calib_method`: "range" (activation-weighted range search;
    loads the model for one pass first) or "gptq" (error feedback; the model stays loaded, one pass per batch of
    blocks whose matrices fit `hessian_budget` bytes)."""
    if calib_method not in CALIB_METHODS:
        raise ConfigError(f"unknown calibration method {calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
    if calib_method != "range" and not calib_tokens:
        raise ConfigError(f"the {calib_method!r} calibration method needs calibration text (--calib FILE)")
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: quantized checkpoints are .safetensors files; name the output *.safetensors")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output would overwrite the input; choose another name")
    with writer_lock(dst.parent, "rwkvctl quantize", part=dst.name):  # one writer of dst at a time
        for final in (dst, sidecar_path(dst)):  # a killed run's full-size temps, now rather than at the rename
            remove_temps(final)
        with open_checkpoint_lazy(src) as lazy:
            meta, names = _checked_source(lazy)
            for what, tokens in (("evaluation", eval_tokens), ("calibration", calib_tokens)):
                _check_vocabulary(src, meta.model.vocab_size, tokens, what)
            spec = replace(spec, architecture=meta.model.architecture)  # the checkpoint's quantizable-tensor patterns
            gptq = calib_method == "gptq"
            importance = _importance(src, calib_tokens) if calib_tokens and not gptq else None
            hessians = _BlockHessians(src, calib_tokens, hessian_budget) if calib_tokens and gptq else None
            weights = _LazyWeights(lazy, names)
            plain, packed, reports = quantize_state_dict(weights, spec, on_tensor, importance, hessians)
            del hessians
        meta.extra["quantization"] = quantization_record(
            spec, src.name, calibrated=bool(calib_tokens), calib_method=calib_method
        )
        write_quantized(dst, plain, packed, meta)
        del plain, packed
        quality = None
        if eval_tokens:
            original, _ = load_model(src)
            quantized, _ = load_model(dst)
            quality = compare_models(original, quantized, eval_tokens)
        return QuantizeResult(dst, src.stat().st_size, dst.stat().st_size, reports, quality)


def quantization_record(
    spec: QuantSpec, source: str, *, calibrated: bool, calib_method: str = "range"
) -> dict[str, Any]:
    """meta.extra["quantization"] of an output: the settings, the source's file name, calibration if used."""
    record = {**spec.record(), "source": source}
    if calibrated:  # absent otherwise: uncalibrated files keep their metadata byte for byte
        record["calibrated"] = True
        if calib_method != "range":  # likewise: range-calibrated files keep theirs
            record["calib_method"] = calib_method
    return record


def _checked_source(lazy: LazyCheckpoint) -> tuple[CheckpointMeta, dict[str, str]]:
    """The source's meta, checked against its tensors' shapes (no weight read), and bare name -> file key in the
    architecture's order. A quantized source is refused."""
    stored = lazy.stored()
    if is_quantized(stored):
        raise CheckpointError(f"{lazy.path}: already quantized; quantize the original checkpoint instead")
    _, meta = checked_state_dict(stored, {}, lazy.placeholders)
    if "quantization" in meta.extra:
        raise CheckpointError(f"{lazy.path}: already quantized; quantize the original checkpoint instead")
    bare = normalize_keys({key: key for key in lazy.placeholders})  # bare name -> the file's key
    return meta, {name: bare[name] for name in arch_of(meta.model).param_shapes(meta.model)}


class _LazyWeights(Mapping[str, Tensor]):
    """The source's tensors by bare name, each read only when asked for, and refused with NaN/Inf values as every
    loader refuses them (`check_finite`)."""

    def __init__(self, lazy: LazyCheckpoint, names: dict[str, str]) -> None:
        self.lazy, self.names = lazy, names

    def __getitem__(self, name: str) -> Tensor:
        t = self.lazy.read(self.names[name])
        check_finite({name: t}, self.lazy.path)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _check_vocabulary(src: Path, vocab_size: int, tokens: list[int] | None, what: str) -> None:
    if tokens and not 0 <= min(tokens) <= max(tokens) < vocab_size:
        raise CheckpointError(
            f"{src}: the model has {vocab_size} vocabulary rows but the {what} text has token ids up to "
            f"{max(tokens)}; use the tokenizer the model was trained with"
        )


def _importance(src: Path, tokens: list[int]) -> dict[str, Tensor]:
    """Per-input-channel activation energy of every Linear layer over the calibration text (the model is loaded
    for this pass only)."""
    model, _ = load_model(src)
    try:
        return collect_importance(model, tokens)
    finally:
        del model


class _BlockHessians(Mapping[str, Tensor]):
    """Input second moments (in, in) of every Linear weight of the model in `src`, gathered when a weight is first
    asked for, for a batch of consecutive blocks at a time: as many as fit in `budget` bytes (at least one block,
    the head its own unit), one calibration pass per batch; only the latest batch is kept. A 0.1b model fits one
    pass; a 7B's block alone (~1.2 GB) is a pass of its own. quantize_state_dict asks in the checkpoint's order."""

    def __init__(self, src: Path, tokens: list[int], budget: int = HESSIAN_BUDGET) -> None:
        self.model, _ = load_model(src)
        self.tokens = tokens
        linears = [(f"{n}.weight", m.in_features) for n, m in self.model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.bias is None]  # fmt: skip
        self.names = {name for name, _ in linears}
        sizes: dict[str, int] = {}  # unit -> bytes of its matrices, in the model's order
        for name, cols in linears:
            sizes[self._unit(name)] = sizes.get(self._unit(name), 0) + 4 * cols * cols
        self.batch_of: dict[str, int] = {}
        batch, used = 0, 0
        for unit, size in sizes.items():
            if used and used + size > budget:
                batch, used = batch + 1, 0
            self.batch_of[unit], used = batch, used + size
        self.batch, self.cache = -1, {}

    @staticmethod
    def _unit(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]  # blocks.3.att.key.weight -> blocks.3

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        batch = self.batch_of[self._unit(name)]
        if batch != self.batch:
            self.cache = {}  # drop the previous batch's matrices before gathering the next
            wanted = {n for n in self.names if self.batch_of[self._unit(n)] == batch}
            self.cache, self.batch = collect_hessians(self.model, self.tokens, wanted), batch
        return self.cache[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def read_text_tokens(path: Path, tokenizer: str, limit: int, what: str) -> list[int]:
    """The first `limit` tokens of a UTF-8 text file (--eval, --calib): a missing, unreadable, non-UTF-8 or
    too-short file is a one-line DataError naming it."""
    from rwkvctl.data.tokenizer import load_tokenizer

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the {what} text is not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} text ({e.strerror or e})") from None
    ids = load_tokenizer(tokenizer).encode(text)[:limit]
    if len(ids) < 2:
        raise DataError(f"{path}: too little {what} text (needs at least 2 tokens, has {len(ids)})")
    return ids


@torch.no_grad()
def compare_models(original: torch.nn.Module, quantized: torch.nn.Module, tokens: list[int]) -> QualityReport:
    """Next-token quality of `quantized` against `original` over `tokens` (sequence form, fp32)."""
    if len(tokens) < 2:
        raise CheckpointError("the evaluation text needs at least 2 tokens")
    idx = torch.tensor([tokens[:-1]])
    target = torch.tensor(tokens[1:])
    logp_a = torch.log_softmax(original(idx)[0][0].float(), -1)  # (T, V)
    logp_b = torch.log_softmax(quantized(idx)[0][0].float(), -1)
    nll_a = -logp_a.gather(1, target[:, None]).mean()
    nll_b = -logp_b.gather(1, target[:, None]).mean()
    kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1).mean()
    agree = (logp_a.argmax(-1) == logp_b.argmax(-1)).float().mean()
    return QualityReport(len(target), float(nll_a.exp()), float(nll_b.exp()), float(kl), float(agree))


@dataclass
class SizeEstimate:
    bytes: int  # the output .safetensors, exactly
    params: int  # weights of the model
    source: str  # the checkpoint or preset it was computed for

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params


def estimate_quantized_size(
    spec: QuantSpec,
    *,
    src: str | Path | None = None,
    preset_name: str | None = None,
    dtype: str = "fp32",
    calibrated: bool = False,
    calib_method: str = "range",
) -> SizeEstimate:
    """The exact size of `quantize`'s output for `spec`, without reading or making any weight: for a checkpoint
    `src` (its header only), or for a preset as `rwkvctl init --preset NAME --dtype DTYPE` writes it to
    `NAME.pth` (the file name and metadata enter the header: another name changes the size by a few bytes)."""
    if (src is None) == (preset_name is None):
        raise ConfigError("estimate the output size of either a checkpoint or a --preset, not both or neither")
    if src is not None:
        with open_checkpoint_lazy(src) as lazy:
            meta, names = _checked_source(lazy)
            placeholders = {name: lazy.placeholders[key] for name, key in names.items()}
        source = Path(src).name
    else:
        cfg = preset(preset_name)  # ConfigError naming the presets for an unknown one
        torch_dtype = parse_dtype(dtype)
        shapes = arch_of(cfg).param_shapes(cfg)
        placeholders = {k: torch.empty(s, dtype=torch_dtype, device="meta") for k, s in shapes.items()}
        meta = CheckpointMeta(model=cfg, step=0, tokens=0, init=INIT_SCHEMES[0], extra={"seed": 0})
        source = f"{preset_name}.pth"
    spec = replace(spec, architecture=meta.model.architecture)
    meta.extra["quantization"] = quantization_record(spec, source, calibrated=calibrated, calib_method=calib_method)
    kinds = {name: quantizable_kind(name, spec.architecture) or "block" for name in placeholders}
    size = quantized_file_size(
        placeholders, spec.bits_for, lambda name, bits: spec.encode_options(bits, kinds[name]),
        get_scheme(spec.scheme), meta,
    )  # fmt: skip
    return SizeEstimate(size, sum(t.numel() for t in placeholders.values()), source)
