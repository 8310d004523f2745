"""Sizes from files and flags are bounded before anything is allocated: a stray tensor name or an edited sidecar
(n_layer 10^7) gives one line, not a process that allocates until it is killed; so does a huge --set model.*.
The end-to-end cases run under an address-space cap, so a regression fails the test instead of the machine."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvctl.config import ModelConfig, param_count, preset
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint, sidecar_path

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=128, head_size=32)
CAP = 6 << 30  # bytes of address space for the capped subprocesses (torch alone maps ~1-2 GB)


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def _run_capped(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwkvctl", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=_capped)


@pytest.fixture
def saved(random_model, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "m.pth", random_model(CFG).state_dict(), CheckpointMeta(model=CFG))


def test_param_count_does_not_grow_with_n_layer():
    huge = ModelConfig(n_layer=10_000_000, n_embd=64, vocab_size=128, head_size=32)
    assert param_count(huge) == param_count(CFG) + (huge.n_layer - 2) * (param_count(CFG) - param_count(
        ModelConfig(n_layer=1, n_embd=64, vocab_size=128, head_size=32)))
    assert param_count(preset("7b")) == 7_518_044_160


def test_a_stray_block_index_in_a_bare_pth_is_refused(saved: Path, tmp_path: Path) -> None:
    weights = torch.load(saved, weights_only=True)
    weights["blocks.999999999.att.key.weight"] = torch.zeros(1)
    bare = tmp_path / "bare.pth"
    torch.save(weights, bare)  # no sidecar: the config is inferred from the tensors
    with pytest.raises((CheckpointError, ConfigError), match="blocks are numbered up to 999999999 but only 3"):
        load_checkpoint(bare)


def test_an_edited_sidecar_n_layer_is_refused_before_allocation(saved: Path) -> None:
    side = sidecar_path(saved)
    data = json.loads(side.read_text())
    data["model"]["n_layer"] = 10_000_000
    side.write_text(json.dumps(data))
    # named as what it most likely is (a sidecar that does not match its weights), without expanding 10^7 layers
    with pytest.raises(CheckpointError, match=r"m\.pth\.json: describes a different model than m\.pth"):
        load_checkpoint(saved)
    for cmd in (["inspect", str(saved)], ["chat", str(saved), "-m", "hi"]):
        res = _run_capped(cmd)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "m.pth.json: describes a different model" in res.stderr
        assert "Traceback" not in res.stderr and "MemoryError" not in res.stderr


def test_a_huge_model_flag_is_refused_before_allocation(tmp_path: Path) -> None:
    import numpy as np

    from rwkvctl.data.binidx import BinIdxWriter

    with BinIdxWriter(tmp_path / "d") as w:
        for _ in range(20):
            w.add_document(np.arange(1, 60, dtype=np.uint16))
    res = _run_capped(["train", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path / "d"), "--set",
                       "model.vocab_size=64", "--set", "model.n_embd=64", "--set", "model.head_size=32", "--set",
                       "model.n_layer=10000000", "--max-steps", "1", "--device", "cpu"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "GiB of RAM" in res.stderr and "n_layer=10000000" in res.stderr
