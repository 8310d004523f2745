"""Fuzz the checkpoint formats through the commands that read them: `.pth` and `.safetensors` weights, their JSON
sidecar and the safetensors metadata (inspect, chat -m, generate). Harness and the pass rule: conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from rwkvctl.config import ModelConfig
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint, sidecar_path

# World vocabulary, so chat/generate run on an accepted file; 1 layer of width 32 keeps each command fast
CFG = ModelConfig(n_layer=1, n_embd=32, head_size=32)
COMMANDS = st.sampled_from(["inspect", "inspect", "inspect", "generate", "chat"])


def _args(command: str, path: Path) -> list[str]:
    if command == "inspect":
        return ["inspect", path]
    if command == "generate":
        return ["generate", path, "-p", "hi", "--max-tokens", "1"]
    return ["chat", path, "-m", "hi", "--max-tokens", "1"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from rwkvctl.model.init import init_weights
    from rwkvctl.model.rwkv5 import RWKV5

    root = tmp_path_factory.mktemp("ckpt")
    weights = init_weights(RWKV5(CFG), "v5.2-2023", seed=0).state_dict()
    meta = CheckpointMeta(model=CFG, step=5, tokens=1000)
    return {suffix: save_checkpoint(root / f"m{suffix}", weights, meta) for suffix in (".pth", ".safetensors")}


def _copy(src: Path, dest_dir: Path, *, sidecar: bool = True) -> Path:
    dst = dest_dir / src.name
    shutil.copyfile(src, dst)
    if sidecar:
        shutil.copyfile(sidecar_path(src), sidecar_path(dst))
    return dst


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fuzz_weight_file_bytes(fuzz, originals, scratch, suffix: str) -> None:
    """Truncated, flipped, shortened and non-UTF-8 bytes in the weights file (with and without its sidecar)."""
    src = originals[suffix]
    data = src.read_bytes()

    @fuzz.given(12, fuzz.byte_mutation(len(data)), st.booleans(), COMMANDS)
    def run(edits, keep_sidecar: bool, command: str) -> None:
        path = _copy(src, scratch(), sidecar=keep_sidecar)
        path.write_bytes(fuzz.apply_byte_mutation(data, edits))
        fuzz.check(f"checkpoint {suffix} bytes", fuzz.run(_args(command, path)), [path.name], f"{edits} {command}")

    run()


def test_fuzz_sidecar_json(fuzz, originals, scratch) -> None:
    """The JSON sidecar retyped, deleted, extended, nested deeply, given huge or negative numbers."""
    src = originals[".pth"]
    doc = json.loads(sidecar_path(src).read_text())

    @fuzz.given(20, fuzz.json_mutation(doc), COMMANDS)
    def run(mutation, command: str) -> None:
        path = _copy(src, scratch())
        sidecar_path(path).write_text(fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, mutation)))
        fuzz.check("checkpoint sidecar json", fuzz.run(_args(command, path)), [path.name], f"{mutation} {command}")

    run()


def test_fuzz_sidecar_bytes(fuzz, originals, scratch) -> None:
    """The sidecar's text damaged byte by byte (truncated JSON, invalid UTF-8)."""
    src = originals[".pth"]
    text = sidecar_path(src).read_bytes()

    @fuzz.given(10, fuzz.byte_mutation(len(text)))
    def run(edits) -> None:
        path = _copy(src, scratch())
        sidecar_path(path).write_bytes(fuzz.apply_byte_mutation(text, edits))
        fuzz.check("checkpoint sidecar bytes", fuzz.run(["inspect", path]), [path.name], str(edits))

    run()


def test_fuzz_safetensors_metadata(fuzz, originals, scratch) -> None:
    """The `rwkvctl` metadata inside a safetensors header (no sidecar), mutated like the sidecar."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = originals[".safetensors"]
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        doc = json.loads(f.metadata()["rwkvctl"])

    @fuzz.given(15, fuzz.json_mutation(doc), COMMANDS)
    def run(mutation, command: str) -> None:
        path = scratch() / src.name
        save_file(tensors, str(path), metadata={"rwkvctl": fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, mutation))})
        fuzz.check("checkpoint safetensors metadata", fuzz.run(_args(command, path)), [path.name],
                   f"{mutation} {command}")

    run()


EXTRA_NAMES = st.one_of(
    st.sampled_from(["blocks.999999999.att.key.weight", "blocks.-1.ln1.weight", "blocks.x.ln1.weight", "blocks.",
                     "blocks.1.att.key.weight", "emb.weight", "head.weight", "blocks.0.att.time_decay", "\x1b[2Jevil",
                     "module.emb.weight", "blocks.0.att.gate.weight", "ln_out.weight"]),
    st.text(min_size=1, max_size=20),
)
EXTRA_TENSORS = st.sampled_from(["zeros1", "int", "nan", "scalar", "wide", "bool"])


def _tensor(kind: str) -> torch.Tensor:
    return {"zeros1": torch.zeros(1), "int": torch.arange(4), "nan": torch.full((2,), float("nan")),
            "scalar": torch.tensor(3.0), "wide": torch.zeros(1, 70000), "bool": torch.ones(3, dtype=torch.bool)}[kind]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fuzz_extra_tensors(fuzz, originals, scratch, suffix: str) -> None:
    """Stray, replaced and retyped tensors (huge block indices, wrong shapes, ints, NaN), with or without the
    sidecar (without it, the config is inferred from the tensors)."""
    from rwkvctl.io.checkpoint import load_checkpoint

    weights, _ = load_checkpoint(originals[suffix])

    @fuzz.given(12, st.lists(st.tuples(EXTRA_NAMES, EXTRA_TENSORS), min_size=1, max_size=3), st.booleans(), COMMANDS)
    def run(extra, keep_sidecar: bool, command: str) -> None:
        path = _copy(originals[suffix], scratch(), sidecar=keep_sidecar)
        tensors = {**weights, **{name: _tensor(kind) for name, kind in extra}}
        if suffix == ".pth":
            torch.save(tensors, path)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))  # no metadata: shapes or sidecar
        fuzz.check(f"checkpoint {suffix} tensors", fuzz.run(_args(command, path)), [path.name], f"{extra} {command}")

    run()
