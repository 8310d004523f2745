"""Fuzz chat state files (`chat --load-state`, `inspect`) and quantized checkpoints (`inspect`, `generate`):
bytes, their JSON metadata, and their tensors. Harness and the pass rule: conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from rwkvctl.config import ModelConfig
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint, sidecar_path

CFG = ModelConfig(n_layer=1, n_embd=32, head_size=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint, a chat state saved with it, and its 4-bit quantized copy."""
    from typer.testing import CliRunner

    from rwkvctl.cli import app
    from rwkvctl.model.init import init_weights
    from rwkvctl.model.rwkv5 import RWKV5

    root = tmp_path_factory.mktemp("sq")
    model = save_checkpoint(root / "m.pth", init_weights(RWKV5(CFG), "v5.2-2023", seed=0).state_dict(),
                            CheckpointMeta(model=CFG))
    state, quant = root / "chat.safetensors", root / "q.safetensors"
    for args in (["chat", model, "-m", "hi", "--max-tokens", "1", "--save-state", state],
                 ["quantize", model, quant, "--no-search", "--group", "32"]):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.stderr
    return {"model": model, "state": state, "quant": quant}


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def _state_args(command: str, model: Path, state: Path) -> list:
    if command == "inspect":
        return ["inspect", state]
    return ["chat", model, "--load-state", state, "-m", "hi", "--max-tokens", "1"]


STATE_COMMANDS = st.sampled_from(["inspect", "chat"])


def test_fuzz_state_file_bytes(fuzz, files, scratch) -> None:
    raw = files["state"].read_bytes()

    @fuzz.given(10, fuzz.byte_mutation(len(raw)), STATE_COMMANDS)
    def run(edits, command: str) -> None:
        path = scratch() / "chat.safetensors"
        path.write_bytes(fuzz.apply_byte_mutation(raw, edits))
        fuzz.check("state file bytes", fuzz.run(_state_args(command, files["model"], path)), [path.name],
                   f"{edits} {command}")

    run()


def test_fuzz_state_file_metadata_and_tensors(fuzz, files, scratch) -> None:
    """The state metadata (model shape, info, transcript) mutated like JSON, or its tensors replaced/dropped."""
    from safetensors.torch import save_file

    from rwkvctl.io.state_file import META_KEY

    tensors, metadata = _safetensors(files["state"])
    doc = json.loads(metadata[META_KEY])
    tensor_edit = st.tuples(st.sampled_from(sorted(tensors)), st.sampled_from(["drop", "shape", "nan", "int"]))

    @fuzz.given(15, st.one_of(fuzz.json_mutation(doc).map(lambda m: ("meta", m)),
                              tensor_edit.map(lambda t: ("tensor", t))), STATE_COMMANDS)
    def run(mutation, command: str) -> None:
        kind, change = mutation
        meta, ts = dict(metadata), dict(tensors)
        if kind == "meta":
            meta[META_KEY] = fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, change))
        else:
            name, how = change
            if how == "drop":
                del ts[name]
            else:
                ts[name] = {"shape": torch.zeros(3), "nan": torch.full_like(ts[name], float("nan")),
                            "int": ts[name].to(torch.int32)}[how]
        path = scratch() / "chat.safetensors"
        save_file(ts, str(path), metadata=meta)
        fuzz.check("state file metadata/tensors", fuzz.run(_state_args(command, files["model"], path)), [path.name],
                   f"{mutation} {command}")

    run()


QUANT_COMMANDS = st.sampled_from(["inspect", "inspect", "generate"])


def _quant_args(command: str, path: Path) -> list:
    return ["inspect", path] if command == "inspect" else ["generate", path, "-p", "hi", "--max-tokens", "1"]


def test_fuzz_quantized_bytes(fuzz, files, scratch) -> None:
    raw = files["quant"].read_bytes()

    @fuzz.given(10, fuzz.byte_mutation(len(raw)), QUANT_COMMANDS)
    def run(edits, command: str) -> None:
        d = scratch()
        path = d / "q.safetensors"
        path.write_bytes(fuzz.apply_byte_mutation(raw, edits))
        shutil.copyfile(sidecar_path(files["quant"]), sidecar_path(path))
        fuzz.check("quantized bytes", fuzz.run(_quant_args(command, path)), [path.name], f"{edits} {command}")

    run()


def test_fuzz_quantized_records_and_tensors(fuzz, files, scratch) -> None:
    """The quantization record (per-tensor scheme, params, shape, dtype) mutated like JSON, or packed tensors
    replaced, dropped or added."""
    from safetensors.torch import save_file

    from rwkvctl.quant.format import META_KEY

    tensors, metadata = _safetensors(files["quant"])
    doc = json.loads(metadata[META_KEY])
    tensor_edit = st.tuples(st.sampled_from(sorted(tensors)), st.sampled_from(["drop", "shape", "float", "extra"]))

    @fuzz.given(15, st.one_of(fuzz.json_mutation(doc).map(lambda m: ("record", m)),
                              tensor_edit.map(lambda t: ("tensor", t))), QUANT_COMMANDS)
    def run(mutation, command: str) -> None:
        kind, change = mutation
        meta, ts = dict(metadata), dict(tensors)
        if kind == "record":
            meta[META_KEY] = fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, change))
        else:
            name, how = change
            if how == "drop":
                del ts[name]
            elif how == "extra":
                ts["blocks.999999999.att.key.weight.qweight"] = torch.zeros(2, 2, dtype=torch.uint8)
            else:
                ts[name] = torch.zeros(3, dtype=torch.uint8) if how == "shape" else ts[name].float()
        path = scratch() / "q.safetensors"
        save_file(ts, str(path), metadata=meta)  # no sidecar: the embedded metadata is what is read
        fuzz.check("quantized records/tensors", fuzz.run(_quant_args(command, path)), [path.name],
                   f"{mutation} {command}")

    run()
