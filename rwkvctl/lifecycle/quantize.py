"""`rwkvctl quantize` as a lifecycle stage: checkpoint -> quantized `.safetensors` (+ sidecar), with a quality check.

The output loads everywhere a checkpoint does (`chat`, `inspect`, `load_model`): the loader dequantizes it. The
optional evaluation runs the original and the quantized model (read back from the written file, so the file
itself is what is checked) over the same text and reports both perplexities, the mean KL divergence of the
quantized model's next-token distribution from the original's, and how often their top-1 tokens agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rwkvctl.dir_lock import writer_lock
from rwkvctl.errors import CheckpointError
from rwkvctl.lifecycle.models import load_model, model_from_state_dict
from rwkvctl.quant.format import load_checkpoint_expanded, write_quantized
from rwkvctl.quant.policy import QuantSpec, TensorReport, quantize_state_dict


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
    on_tensor: Callable[[str, int], None] | None = None,
) -> QuantizeResult:
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: quantized checkpoints are .safetensors files; name the output *.safetensors")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output would overwrite the input; choose another name")
    with writer_lock(dst.parent, "rwkvctl quantize", part=dst.name):  # one writer of dst at a time
        state_dict, meta = load_checkpoint_expanded(src)
        if eval_tokens and not 0 <= min(eval_tokens) <= max(eval_tokens) < meta.model.vocab_size:
            raise CheckpointError(
                f"{src}: the model has {meta.model.vocab_size} vocabulary rows but the evaluation text has token ids "
                f"up to {max(eval_tokens)}; evaluate with the tokenizer the model was trained with"
            )
        if "quantization" in meta.extra:
            raise CheckpointError(f"{src}: already quantized; quantize the original checkpoint instead")
        spec = replace(spec, architecture=meta.model.architecture)  # the checkpoint's quantizable-tensor patterns
        plain, packed, reports = quantize_state_dict(state_dict, spec, on_tensor)
        meta.extra["quantization"] = {
            "bits": spec.bits,
            "group": spec.group,
            "embed_bits": spec.embed_bits,
            "range_search": spec.search,
            "source": src.name,
        }
        write_quantized(dst, plain, packed, meta)
        quality = None
        if eval_tokens:
            original = model_from_state_dict(state_dict, meta.model)  # the weights already in memory, not a reread
            quantized, _ = load_model(dst)
            quality = compare_models(original, quantized, eval_tokens)
        return QuantizeResult(dst, src.stat().st_size, dst.stat().st_size, reports, quality)


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
