"""Weight quantization: packing, error bounds, the range search, the file format and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint, sidecar_path
from rwkvctl.lifecycle.quantize import compare_models, quantize_checkpoint
from rwkvctl.quant.format import META_KEY
from rwkvctl.quant.format import load_checkpoint_expanded as load_checkpoint
from rwkvctl.quant.groupwise import dequantize, group_size_for, pack_codes, quantize_weight, unpack_codes
from rwkvctl.quant.policy import QuantSpec

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)


def test_codes_pack_and_unpack_exactly() -> None:
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (3, 5) and torch.equal(unpack_codes(packed, 4), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # low nibble first
    codes8 = torch.randint(0, 256, (2, 4), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes8, 8), 8), codes8)


@pytest.mark.parametrize("bits, bound", [(4, 0.12), (8, 0.008)])
def test_error_is_bounded_and_every_group_is_within_half_a_step(bits: int, bound: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    q = quantize_weight(w, bits, 64)
    assert q.rel_error < bound
    restored = dequantize(q.stored["qweight"], q.stored["scale"], q.stored["min"], bits, 64)
    steps = q.stored["scale"].float().repeat_interleave(64, dim=1)
    # within half a step of its group's grid, or clipped by the searched range (never more than the range shrink)
    assert ((restored - w).abs() <= steps * 0.5 + 1e-6).float().mean() > 0.95
    zeros = quantize_weight(torch.zeros(4, 64), bits, 64).stored["qweight"]
    assert torch.equal(zeros, pack_codes(torch.zeros(4, 64), bits))


@pytest.mark.parametrize("group", [64, 256])
def test_range_search_beats_min_max_on_heavy_tails(group: int) -> None:
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02  # heavy tails, like trained RWKV matrices
    plain = quantize_weight(w, 4, group, search=False).rel_error
    searched = quantize_weight(w, 4, group, search=True).rel_error
    assert searched < 0.98 * plain


def test_group_sizes_and_spec_validation() -> None:
    assert group_size_for(4096, 64) == 64 and group_size_for(32, 64) == 32 and group_size_for(48, 64) == 48
    assert group_size_for(100, 64) == 50
    with pytest.raises(ConfigError, match="groups of 2 at best"):
        group_size_for(2 * 53, 64)  # only 2 divides it evenly: scales would cost 16 bits per weight
    with pytest.raises(ConfigError):
        QuantSpec(bits=3)
    with pytest.raises(ConfigError):
        QuantSpec(group=7)
    spec = QuantSpec()
    assert spec.bits_for("blocks.3.att.key.weight") == 4 and spec.bits_for("head.weight") == 8
    assert spec.bits_for("blocks.0.att.time_decay") is None and spec.bits_for("blocks.0.ln1.weight") is None


@pytest.fixture
def checkpoint(random_model, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "m.pth", random_model(CFG).state_dict(), CheckpointMeta(model=CFG, step=7))


def test_quantized_file_loads_as_a_checkpoint_and_keeps_quality(checkpoint: Path, tmp_path: Path) -> None:
    from rwkvctl.lifecycle.models import load_model

    tokens = torch.randint(1, CFG.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    res = quantize_checkpoint(checkpoint, tmp_path / "q.safetensors", QuantSpec(), eval_tokens=tokens)
    assert res.output_bytes < res.source_bytes / 3
    # groups of 64, and of 56 for the FFN's 224-wide rows: 4 + 32/64 or 4 + 32/56 bits per weight
    assert 4.5 <= res.bits_per_weight(4) < 4.6 and 8.5 <= res.bits_per_weight(8) < 8.6
    q = res.quality
    assert q is not None and q.tokens == 199 and q.mean_kl < 0.05 and q.top1_agreement > 0.7
    assert abs(q.ppl_increase) < 0.05
    state, meta = load_checkpoint(res.path)
    original, _ = load_checkpoint(checkpoint)
    assert list(state) == list(original) and meta.step == 7
    assert meta.extra["quantization"]["bits"] == 4 and meta.extra["quantization"]["params_by_bits"]
    for name, t in original.items():  # everything not quantized is stored exactly
        if not name.endswith(".weight") or t.dim() < 2:
            assert torch.equal(state[name], t), name
    a, _ = load_model(checkpoint)
    b, _ = load_model(res.path)
    assert compare_models(a, a, tokens).mean_kl == pytest.approx(0, abs=1e-6)
    assert compare_models(a, b, tokens).mean_kl == pytest.approx(q.mean_kl, rel=1e-4)  # the file is what was judged
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(res.path, tmp_path / "qq.safetensors", QuantSpec())
    with pytest.raises(CheckpointError, match="safetensors"):
        quantize_checkpoint(checkpoint, tmp_path / "q.pth", QuantSpec())


def test_quantized_files_record_the_architecture(checkpoint: Path, tmp_path: Path, rewrite_embedded_model) -> None:
    q = quantize_checkpoint(checkpoint, tmp_path / "q.safetensors", QuantSpec()).path
    sidecar_path(q).unlink()  # the file's own metadata is what is checked
    rewrite_embedded_model(q, lambda model: model.pop("architecture"))  # written before the field existed
    assert load_checkpoint(q)[1].model == CFG
    rewrite_embedded_model(q, lambda model: model.update(architecture="x060"))
    with pytest.raises(CheckpointError, match=r"q\.safetensors \(metadata\): written for architecture 'x060'"):
        load_checkpoint(q)


def test_damaged_quantized_files_are_one_line_errors(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = quantize_checkpoint(checkpoint, tmp_path / "q.safetensors", QuantSpec(embed_bits=None)).path
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    side = Path(str(path) + ".json")
    side.unlink()  # the embedded metadata alone must do

    def write(tensors: dict, meta: dict) -> Path:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata=meta)
        return bad

    missing = {k: v for k, v in tensors.items() if k != "blocks.0.att.key.weight.scale"}
    with pytest.raises(CheckpointError, match=r"'blocks.0.att.key.weight' is incomplete"):
        load_checkpoint(write(missing, metadata))
    wrong = dict(tensors, **{"blocks.0.att.key.weight.qweight": torch.zeros(3, 3, dtype=torch.uint8)})
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_checkpoint(write(wrong, metadata))
    with pytest.raises(CheckpointError, match="corrupt quantization metadata .*not valid JSON"):
        load_checkpoint(write(tensors, {**metadata, META_KEY: "{not json"}))
    entries = json.loads(metadata[META_KEY])
    entries["tensors"]["blocks.0.att.key.weight"]["params"]["bits"] = 3
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_checkpoint(write(tensors, {**metadata, META_KEY: json.dumps(entries)}))


def test_cli_quantize_summary_and_errors(random_model, tmp_path: Path) -> None:
    from rwkvctl.cli import app

    cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=65536, head_size=16)  # World vocabulary for --eval
    checkpoint = save_checkpoint(tmp_path / "w.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))

    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    runner = CliRunner()
    out = tmp_path / "q.safetensors"
    res = runner.invoke(app, ["quantize", str(checkpoint), str(out), "--eval", str(text), "--eval-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert "block matrices" in res.output and "smaller" in res.output and "perplexity" in res.output
    res = runner.invoke(app, ["quantize", str(checkpoint), str(out)])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(app, ["quantize", str(checkpoint), str(out), "--force", "--bits", "3"])
    assert res.exit_code == 2 and "--bits" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["quantize", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors")])
    assert res.exit_code != 0 and "nope.pth" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "quantized" in res.output


def test_eval_tokens_outside_the_vocabulary_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="512 vocabulary rows"):
        quantize_checkpoint(checkpoint, tmp_path / "q.safetensors", QuantSpec(), eval_tokens=[1, 2, 600])


def test_packed_weights_at_run_time_give_the_same_logits(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from rwkvctl.lifecycle.models import load_model
    from rwkvctl.quant.linear import QuantLinear

    # the reference path (the compiled kernel, int16 activations, is held to its own tolerance in tests/quant)
    monkeypatch.setenv("RWKVCTL_QMM", "reference")
    path = quantize_checkpoint(checkpoint, tmp_path / "q.safetensors", QuantSpec()).path
    expanded, _ = load_model(path)
    packed, meta = load_model(path, keep_quantized=True)
    assert isinstance(packed.blocks[1].ffn.value, QuantLinear) and isinstance(packed.head, QuantLinear)
    assert meta.extra["quantization"]["quantized_tensors"] == 2 * 8 + 2  # 5 att + 3 ffn matrices per layer, emb, head
    idx = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, sa = expanded(idx)
        b, sb = packed(idx)
        step_a, _ = expanded.step(idx[:, 0], sa)
        step_b, _ = packed.step(idx[:, 0], sb)
    assert torch.equal(a, b)  # many rows: the expanded weight, the same matmul
    torch.testing.assert_close(step_b, step_a, atol=1e-5, rtol=1e-5)  # one row: per-group dots, another sum order

    def nbytes(m: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    assert nbytes(packed) < 0.6 * nbytes(expanded)
    half, _ = load_model(path, keep_quantized=True, dtype=torch.bfloat16)
    assert half.head.scale_bits.dtype == torch.int16 and half.emb.weight.dtype == torch.bfloat16  # scales intact
    QuantLinear.ROWS_PER_BLOCK_BYTES, saved = 64 * 4 * 4, QuantLinear.ROWS_PER_BLOCK_BYTES  # force row blocks
    try:
        blocked, _ = load_model(path, keep_quantized=True)
        with torch.no_grad():
            assert torch.allclose(blocked(idx)[0], a, atol=1e-5)
    finally:
        QuantLinear.ROWS_PER_BLOCK_BYTES = saved


def test_unquantizable_weights_are_refused_by_name(random_model, tmp_path: Path) -> None:
    sd = random_model(CFG).state_dict()
    # NaN is refused on load, like by every command; a value beyond fp16 by the quantizer, which stores fp16 scales
    for bad, error, message in ((float("nan"), CheckpointError, "holds 1 NaN/Inf value"),
                                (1e6, ConfigError, "fp16 range")):
        broken = dict(sd)
        broken["blocks.1.ffn.key.weight"] = sd["blocks.1.ffn.key.weight"].clone()
        broken["blocks.1.ffn.key.weight"][3, 5] = bad
        path = save_checkpoint(tmp_path / "bad.pth", broken, CheckpointMeta(model=CFG))
        with pytest.raises(error, match=f"blocks.1.ffn.key.weight:? .*{message}"):
            quantize_checkpoint(path, tmp_path / "q.safetensors", QuantSpec())
        assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize(
    ("spec", "kl_limit"),
    [
        (QuantSpec(bits=8), 2e-4),  # --bits 8 (measured KL 5e-5 on this model)
        (QuantSpec(embed_bits=None), 0.02),  # --embed-bits 16: emb and head stored as they are (0.006)
        (QuantSpec(embed_bits=4), 0.05),  # --embed-bits 4 (0.014)
        (QuantSpec(bits=8, group=32, embed_bits=4, embed_group=32), 0.02),
    ],
    ids=["bits8", "embed16", "embed4", "bits8-group32-embed4"],
)
def test_every_format_quantizes_loads_and_keeps_its_logits(
    spec: QuantSpec, kl_limit: float, checkpoint: Path, tmp_path: Path
) -> None:
    """quantize -> load -> logits for the formats besides the default (which the test above covers): the file
    loads expanded with the quality it was judged by, and packed (the compiled matmul) with the expanded logits."""
    from rwkvctl.lifecycle.models import load_model

    tokens = torch.randint(1, CFG.vocab_size, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    res = quantize_checkpoint(checkpoint, tmp_path / "q.safetensors", spec, eval_tokens=tokens)
    q = res.quality
    assert q is not None and q.mean_kl < kl_limit
    recorded = load_checkpoint(res.path)[1].extra["quantization"]
    assert (recorded["bits"], recorded["embed_bits"]) == (spec.bits, spec.embed_bits)
    original, _ = load_model(checkpoint)
    expanded, _ = load_model(res.path)
    assert compare_models(original, expanded, tokens).mean_kl == pytest.approx(q.mean_kl, rel=1e-4)
    packed, _ = load_model(res.path, keep_quantized=True)
    from rwkvctl.quant.linear import QuantLinear

    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 8 + (spec.embed_bits is not None)  # 8 block matrices per layer (+ the head)
    assert all(layer.prepare() and hasattr(layer, "qtiles") for layer in layers)  # the compiled kernel's tiles
    idx = torch.tensor([tokens[:12], tokens[12:24]])
    with torch.no_grad():
        seq_e, state_e = expanded(idx)
        seq_p, state_p = packed(idx)
        step_e, _ = expanded.step(idx[:, 0], state_e)
        step_p, _ = packed.step(idx[:, 0], state_p)
    # many rows: the expanded weight, the same matmul; one row: the packed kernel on int16 activations, within the
    # tolerance tests/model/test_cpu_fast.py holds it to (2e-4 of the logits' scale)
    torch.testing.assert_close(seq_p, seq_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_p, step_e, atol=2e-4 * float(step_e.abs().max()), rtol=0)
