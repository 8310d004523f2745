"""The scheme registry: a toy scheme registered in the test goes through the whole file round trip and QuantLinear."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.lifecycle.models import load_model
from rwkvctl.lifecycle.quantize import quantize_checkpoint
from rwkvctl.quant import groupwise
from rwkvctl.quant.format import META_KEY, load_checkpoint_expanded
from rwkvctl.quant.linear import QuantLinear
from rwkvctl.quant.policy import QuantSpec, quantizable_kind
from rwkvctl.quant.schemes import Encoded, Params, Scheme, get_scheme, register, scheme_names, unregister

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)


class RowInt8(Scheme):
    """Per-row symmetric int8 codes with an fp32 absmax: unlike group-affine in every stored tensor."""

    name = "toy-row-int8"
    tensor_names = ("q", "absmax")
    matmul_calls = 0

    def encode(self, w: Tensor, **options: Any) -> Encoded:
        absmax = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12)  # (out, 1)
        q = (w.float() / absmax * 127).round().to(torch.int8)
        stored = {"q": q, "absmax": absmax}
        rel = float((self.decode(stored, {"levels": 127}, slice(None)) - w).norm() / w.float().norm())
        return Encoded(stored, {"levels": 127}, rel)

    def check(self, stored: dict[str, Tensor], params: Params, shape: tuple[int, int]) -> None:
        if params.get("levels") != 127 or tuple(stored["q"].shape) != shape:
            raise ValueError("bad toy record")

    def decode(self, stored: dict[str, Tensor], params: Params, rows: slice) -> Tensor:
        return stored["q"][rows].float() * stored["absmax"][rows] / params["levels"]

    def matmul(self, x: Tensor, stored: dict[str, Tensor], params: Params, rows: slice) -> Tensor:
        type(self).matmul_calls += 1
        return super().matmul(x, stored, params, rows)


@pytest.fixture
def toy_scheme():
    scheme = register(RowInt8())
    yield scheme
    unregister(RowInt8.name)


@pytest.fixture
def checkpoint(random_model, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "m.pth", random_model(CFG).state_dict(), CheckpointMeta(model=CFG))


def test_the_default_scheme_is_registered_and_names_are_unique(toy_scheme) -> None:
    assert isinstance(get_scheme(groupwise.NAME), groupwise.GroupAffine)
    assert scheme_names() == sorted([groupwise.NAME, RowInt8.name])
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (RowInt8,), {})())
    with pytest.raises(ConfigError, match="unknown quantization scheme 'nope'"):
        QuantSpec(scheme="nope")


def test_a_registered_scheme_round_trips_through_the_file_and_quant_linear(
    toy_scheme, checkpoint: Path, tmp_path: Path
) -> None:
    path = quantize_checkpoint(checkpoint, tmp_path / "toy.safetensors", QuantSpec(scheme=RowInt8.name)).path
    with safe_open(str(path), framework="pt") as f:
        records = json.loads(f.metadata()[META_KEY])["tensors"]
        assert f.get_tensor("blocks.0.att.key.weight.q").dtype == torch.int8
    assert records["blocks.0.att.key.weight"] == {
        "scheme": RowInt8.name, "params": {"levels": 127}, "shape": [64, 64], "dtype": "torch.float32"
    }  # fmt: skip
    original, _ = load_checkpoint_expanded(checkpoint)
    state, _ = load_checkpoint_expanded(path)
    w = original["blocks.1.ffn.value.weight"]
    stored = toy_scheme.encode(w).stored
    assert torch.equal(state["blocks.1.ffn.value.weight"], toy_scheme.decode(stored, {"levels": 127}, slice(None)))

    expanded, _ = load_model(path)
    packed, _ = load_model(path, keep_quantized=True)
    assert isinstance(packed.blocks[0].att.key, QuantLinear)
    half, _ = load_model(path, keep_quantized=True, dtype=torch.bfloat16)
    assert half.blocks[0].att.key.absmax_bits.dtype == torch.int32  # the fp32 absmax survived .to(bf16)
    assert half.blocks[0].att.key.stored()["absmax"].dtype == torch.float32
    idx = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    RowInt8.matmul_calls = 0
    with torch.no_grad():
        a = expanded(idx)[0]
        b = packed(idx)[0]
    assert RowInt8.matmul_calls >= 2 * 8  # every block matrix ran through the toy scheme's matmul
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_a_file_of_an_unregistered_scheme_is_one_line_naming_file_and_tensor(
    toy_scheme, checkpoint: Path, tmp_path: Path
) -> None:
    path = quantize_checkpoint(checkpoint, tmp_path / "toy.safetensors", QuantSpec(scheme=RowInt8.name)).path
    unregister(RowInt8.name)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_expanded(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'emb.weight'" in message
    assert f"unknown quantization scheme {RowInt8.name!r}" in message and groupwise.NAME in message


def test_which_tensors_are_quantizable() -> None:
    assert quantizable_kind("blocks.3.att.gate.weight") == "block"
    assert quantizable_kind("blocks.3.ffn.receptance.weight") == "block"
    assert quantizable_kind("head.weight") == quantizable_kind("emb.weight") == "embedding"
    for name in ("blocks.0.att.time_decay", "blocks.0.ln1.weight", "blocks.0.att.ln_x.weight", "ln_out.weight"):
        assert quantizable_kind(name) is None, name
