"""`quantize --estimate`: the exact output size from shapes alone, for every setting, and the safetensors header
arithmetic it rests on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rwkvctl.config import ModelConfig, preset
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.lifecycle.models import create_checkpoint
from rwkvctl.lifecycle.quantize import estimate_quantized_size, quantize_checkpoint
from rwkvctl.quant.format import quantized_file_size, safetensors_size
from rwkvctl.quant.policy import QuantSpec
from rwkvctl.quant.schemes import get_scheme

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)


def test_safetensors_size_matches_the_library(tmp_path: Path) -> None:
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.float64, torch.int64]
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        tensors = {}
        for i in range(12):
            shape = tuple(int(n) for n in torch.randint(1, 40, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                                        generator=gen))  # fmt: skip
            tensors[f"t{(i * 7919) % 13}.{i}"] = torch.zeros(shape, dtype=dtypes[(i + trial) % len(dtypes)])
        metadata = {"a": "x" * trial, "quoted \"é\"\n": "{\"k\": [1, 2]}"} if trial % 2 else {}
        path = tmp_path / f"{trial}.safetensors"
        save_file(tensors, str(path), metadata=metadata or None)
        layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        assert safetensors_size(layout, metadata) == path.stat().st_size


SETTINGS = [
    QuantSpec(),
    QuantSpec(bits=8),
    QuantSpec(embed_bits=None),
    QuantSpec(embed_bits=4, group=128),
    QuantSpec(group=32, embed_group=16, search=False),
    QuantSpec(bits=8, embed_bits=4, embed_group=256),
]


@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: f"b{s.bits}g{s.group}e{s.embed_bits}eg{s.embed_group}")
@pytest.mark.parametrize("suffix, dtype", [(".pth", torch.float32), (".safetensors", torch.bfloat16)])
def test_estimate_equals_the_written_size(
    random_model, tmp_path: Path, spec: QuantSpec, suffix: str, dtype: torch.dtype
) -> None:
    src = save_checkpoint(tmp_path / f"m{suffix}", random_model(CFG).state_dict(), CheckpointMeta(model=CFG, step=3),
                          dtype=dtype)  # fmt: skip
    est = estimate_quantized_size(spec, src=src)
    out = quantize_checkpoint(src, tmp_path / "q.safetensors", spec)
    assert est.bytes == out.output_bytes == out.path.stat().st_size
    assert est.params == sum(n.numel() for n in random_model(CFG).parameters())


def test_estimate_with_calibration_equals_the_written_size(random_model, tmp_path: Path) -> None:
    src = save_checkpoint(tmp_path / "m.pth", random_model(CFG).state_dict(), CheckpointMeta(model=CFG))
    out = quantize_checkpoint(src, tmp_path / "q.safetensors", QuantSpec(), calib_tokens=list(range(100)))
    assert estimate_quantized_size(QuantSpec(), src=src, calibrated=True).bytes == out.output_bytes
    assert estimate_quantized_size(QuantSpec(), src=src).bytes < out.output_bytes  # the record says "calibrated"


def test_preset_estimate_equals_init_then_quantize(tmp_path: Path) -> None:
    src = create_checkpoint(tmp_path / "tiny.pth", preset("tiny")).path
    spec = QuantSpec(group=128, embed_bits=4)
    out = quantize_checkpoint(src, tmp_path / "q.safetensors", spec)
    assert estimate_quantized_size(spec, preset_name="tiny", dtype="fp32").bytes == out.output_bytes


def test_seven_b_fits_in_4_gb_with_the_compact_setting() -> None:
    default = estimate_quantized_size(QuantSpec(), preset_name="7b", dtype="bf16")
    compact = estimate_quantized_size(QuantSpec(group=128, embed_bits=4), preset_name="7b", dtype="bf16")
    assert 4.4e9 < default.bytes < 4.6e9  # what the default gives (4.79 bits per weight overall)
    assert compact.bytes <= 4.0e9 and compact.bits_per_param < 4.26


def test_estimate_bad_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset '9b'"):
        estimate_quantized_size(QuantSpec(), preset_name="9b")
    with pytest.raises(ConfigError, match="either a checkpoint or a --preset"):
        estimate_quantized_size(QuantSpec())
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        estimate_quantized_size(QuantSpec(), src=tmp_path / "none.pth")
    with pytest.raises(ConfigError, match="--group must be an even number"):
        estimate_quantized_size(QuantSpec(group=7), preset_name="0.1b")
    with pytest.raises(ConfigError, match="blocks.0.att.key.weight: rows of 106 weights split into groups of 2"):
        spec = QuantSpec()
        meta = CheckpointMeta(model=CFG)
        odd = {"blocks.0.att.key.weight": torch.empty(8, 106, device="meta")}  # no even group near 64 divides 106
        quantized_file_size(odd, spec.bits_for, lambda n, b: spec.encode_options(b), get_scheme(spec.scheme), meta)
