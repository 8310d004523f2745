"""open_engine (rwkvctl/lifecycle/infer.py): what it refuses before loading anything, and every kind of checkpoint
it opens decoding as the file's own model does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import RwkvctlError
from rwkvctl.generate import DecodeSettings, SamplingConfig, ingest
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.lifecycle.infer import open_engine
from rwkvctl.lifecycle.models import load_model


@pytest.mark.parametrize(("var", "value"), [("RWKVCTL_STEP", "fast"), ("RWKVCTL_CPU_ISA", "avx-512"),
                                            ("RWKVCTL_BF16_INPUT", "exact")])  # fmt: skip
def test_a_bad_cpu_decode_setting_is_refused_before_the_model_loads(tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(RwkvctlError, match=f"{var} must be one of .*, got '{value}'"):
        open_engine(tmp_path / "missing.pth")  # the setting, not the missing file, is what it reports


CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=65536, head_size=32)


@pytest.fixture(scope="module")
def saved(random_model, tmp_path_factory) -> dict[str, Path]:
    """One random model as every kind of file open_engine opens: RWKV-LM .pth, safetensors, bf16 safetensors,
    and a 4-bit quantized file (written once for the module)."""
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    out = tmp_path_factory.mktemp("engine-files")
    weights = random_model(CFG, seed=3).state_dict()
    meta = CheckpointMeta(model=CFG)
    files = {
        "pth": save_checkpoint(out / "m.pth", weights, meta),
        "safetensors": save_checkpoint(out / "m.safetensors", weights, meta),
        "bf16-file": save_checkpoint(out / "h.safetensors", weights, meta, dtype=torch.bfloat16),
    }
    files["int4"] = quantize_checkpoint(files["pth"], out / "q.safetensors", QuantSpec()).path
    return files


def _greedy(engine, prompt: str) -> list[int]:
    gen = engine.start(engine.tokenizer.encode(prompt), DecodeSettings(SamplingConfig(temperature=0), max_tokens=6))
    list(engine.run([gen]))
    return gen.tokens


def _plain_greedy(model, ids: list[int], n: int) -> list[int]:
    """The oracle: argmax, step, one token at a time on the model load_model gives."""
    logits, state = ingest(model, ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(logits.float().argmax()))
            step, state = model.step(torch.tensor([out[-1]]), state)
            logits = step[0]
    return out


@pytest.mark.parametrize(
    ("kind", "dtype", "keep_quantized"),
    [("pth", torch.float32, False), ("safetensors", torch.float32, False), ("pth", torch.bfloat16, False),
     ("bf16-file", torch.float32, False), ("int4", torch.float32, False), ("int4", torch.float32, True),
     ("int4", torch.bfloat16, True)],
)  # fmt: skip
def test_the_engine_opens_every_kind_of_checkpoint(saved, kind, dtype, keep_quantized) -> None:
    """open_engine on each file kind, dtype and packed/expanded load: the model comes as asked (dtype, packed
    layers), the tokenizer is the World one the file implies, and greedy decode equals a plain argmax loop on the
    same file loaded by load_model (open_engine's 2 MB-page placement changes no value)."""
    from rwkvctl.quant.linear import QuantLinear

    engine, meta = open_engine(saved[kind], dtype=dtype, keep_quantized=keep_quantized)
    assert meta.model.n_embd == CFG.n_embd and engine.model.emb.weight.dtype == dtype
    assert isinstance(engine.model.blocks[0].att.key, QuantLinear) == keep_quantized
    assert engine.tokenizer.vocab_size == 65536 and engine.eod_id == 0
    model, _ = load_model(saved[kind], dtype=dtype, keep_quantized=keep_quantized)
    prompt = "The quick brown fox"
    assert _greedy(engine, prompt) == _plain_greedy(model, engine.tokenizer.encode(prompt), 6)


def test_the_engine_refuses_a_tokenizer_larger_than_the_model(random_model, tmp_path) -> None:
    small = ModelConfig(n_layer=1, n_embd=32, vocab_size=512, head_size=16)
    path = save_checkpoint(tmp_path / "s.pth", random_model(small).state_dict(), CheckpointMeta(model=small))
    with pytest.raises(RwkvctlError, match=r"s\.pth: the model has 512 vocabulary rows but the 'world' tokenizer has "
                                           r"65536 ids; pass the tokenizer the model was trained with"):  # fmt: skip
        open_engine(path, tokenizer="world")
