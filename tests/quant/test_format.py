"""The quantized file format: per-tensor scheme records, files written before them, and malformed records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError
from rwkvctl.io.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from rwkvctl.lifecycle.models import load_model
from rwkvctl.lifecycle.quantize import quantize_checkpoint
from rwkvctl.quant import groupwise
from rwkvctl.quant.format import META_KEY, load_checkpoint_expanded
from rwkvctl.quant.policy import QuantSpec

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)
FIXTURES = Path(__file__).parent / "fixtures"


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def as_format_1(path: Path, out: Path) -> Path:
    """The same file with the metadata layout written before per-tensor scheme records (format 1)."""
    tensors, metadata = read_file(path)
    records = json.loads(metadata[META_KEY])["tensors"]
    old = {name: {**r["params"], "shape": r["shape"], "dtype": r["dtype"]} for name, r in records.items()}
    save_file(tensors, str(out), metadata={**metadata, META_KEY: json.dumps({"format": 1, "tensors": old})})
    return out


@pytest.fixture
def quantized(random_model, tmp_path: Path) -> Path:
    src = save_checkpoint(tmp_path / "m.pth", random_model(CFG).state_dict(), CheckpointMeta(model=CFG))
    path = quantize_checkpoint(src, tmp_path / "q.safetensors", QuantSpec()).path
    Path(str(path) + ".json").unlink()  # the embedded metadata alone must do
    return path


def test_every_quantized_tensor_records_its_scheme_and_parameters(quantized: Path) -> None:
    tensors, metadata = read_file(quantized)
    meta = json.loads(metadata[META_KEY])
    assert meta["format"] == 2
    records = meta["tensors"]
    assert len(records) == 2 * 8 + 2 and all(r["scheme"] == groupwise.NAME for r in records.values())
    assert records["blocks.0.att.key.weight"] == {
        "scheme": groupwise.NAME, "params": {"bits": 4, "group": 64}, "shape": [64, 64], "dtype": "torch.float32"
    }  # fmt: skip
    assert records["blocks.0.ffn.value.weight"]["params"] == {"bits": 4, "group": 56}  # rows of 224
    assert records["head.weight"]["params"] == {"bits": 8, "group": 64}
    assert {"blocks.0.att.key.weight.qweight", "blocks.0.att.key.weight.scale", "blocks.0.att.key.weight.min"} <= set(
        tensors
    )


def test_a_file_written_before_scheme_records_loads_as_it_did(tmp_path: Path) -> None:
    """A format-1 file written by the code before this change loads to the very same tensors."""
    path = FIXTURES / "v1-q4.safetensors"
    assert json.loads(read_file(path)[1][META_KEY])["format"] == 1
    state, meta = load_checkpoint_expanded(path)
    expected = json.loads((FIXTURES / "v1-q4.expected.json").read_text())["tensors"]
    got = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16] for k, v in state.items()}
    assert got == expected
    assert meta.step == 3 and meta.extra["quantization"]["params_by_bits"] == {"4": 12288, "8": 4096}
    expanded, _ = load_model(path)
    packed, _ = load_model(path, keep_quantized=True)  # the compiled matmul where it runs (int16 activations)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RWKVCTL_QMM", "reference")
        reference, _ = load_model(path, keep_quantized=True)
    idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(idx)[0], expanded(idx)[0])  # 22 rows: the expanded weight, the same matmul
        few = expanded(idx[:1, :3])[0]
        torch.testing.assert_close(reference(idx[:1, :3])[0], few, atol=1e-5, rtol=1e-5)
        assert (packed(idx[:1, :3])[0] - few).abs().max() <= 1e-4 * few.abs().max()
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and "quantized" in res.output and "group 16" in res.output


def test_the_format_1_layout_of_a_new_file_loads_identically(quantized: Path, tmp_path: Path) -> None:
    old = as_format_1(quantized, tmp_path / "old.safetensors")
    new_state, _ = load_checkpoint_expanded(quantized)
    old_state, _ = load_checkpoint_expanded(old)
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


def test_io_alone_refuses_a_quantized_file_in_one_line(quantized: Path) -> None:
    with pytest.raises(CheckpointError, match="is a quantized checkpoint; read it with rwkvctl.load_checkpoint"):
        load_checkpoint(quantized)
    import rwkvctl

    state, _ = rwkvctl.load_checkpoint(quantized)
    assert state["blocks.0.att.key.weight"].shape == (64, 64)


def _with_record(path: Path, out: Path, name: str, record: object, version: int = 2) -> Path:
    tensors, metadata = read_file(path)
    meta = json.loads(metadata[META_KEY])
    meta["tensors"][name] = record
    meta["format"] = version
    save_file(tensors, str(out), metadata={**metadata, META_KEY: json.dumps(meta)})
    return out


GOOD = {"scheme": groupwise.NAME, "params": {"bits": 4, "group": 64}, "shape": [64, 64], "dtype": "torch.float32"}


@pytest.mark.parametrize(
    "record, message",
    [
        ("not a record", "malformed quantization record"),
        ({k: v for k, v in GOOD.items() if k != "scheme"}, "malformed quantization record .*'scheme'"),
        ({**GOOD, "params": [4, 64]}, "malformed quantization record .*'params' an object"),
        ({**GOOD, "shape": [64]}, "malformed quantization record .*shape"),
        ({**GOOD, "dtype": "torch.int3"}, "malformed quantization record .*torch.int3"),
        ({**GOOD, "scheme": "nf4"}, "unknown quantization scheme 'nf4'"),
        ({**GOOD, "params": {"bits": "4", "group": 64}}, "inconsistent shapes or settings .*bits='4'"),
        ({**GOOD, "params": {"bits": 4, "group": 32}}, "inconsistent shapes or settings .*scale/min"),
    ],
)
def test_malformed_records_are_one_line_naming_file_and_tensor(
    quantized: Path, tmp_path: Path, record: object, message: str
) -> None:
    bad = _with_record(quantized, tmp_path / "bad.safetensors", "blocks.1.att.key.weight", record)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint_expanded(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value) and "'blocks.1.att.key.weight'" in str(err.value)


def test_a_malformed_format_1_record_and_an_unknown_format_are_one_line(quantized: Path, tmp_path: Path) -> None:
    old = {"bits": 4, "shape": [64, 64], "dtype": "torch.float32"}  # no group
    bad = _with_record(as_format_1(quantized, tmp_path / "old.safetensors"), tmp_path / "b.safetensors",
                       "blocks.0.att.key.weight", old, version=1)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"'blocks.0.att.key.weight' has a malformed .*'group'"):
        load_checkpoint_expanded(bad)
    future = _with_record(quantized, tmp_path / "f.safetensors", "blocks.0.att.key.weight", GOOD, version=9)
    with pytest.raises(CheckpointError, match=r"version 9 was written by a newer rwkvctl \(this one reads up to 2\)"):
        load_checkpoint_expanded(future)
