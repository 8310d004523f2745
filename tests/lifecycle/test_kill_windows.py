"""What a kill -9 at the known windows of the writers leaves, and what the next command does with it: `quantize
--force` between its two renames, `train` before run_config.yaml exists, `add-gate` just after committing its
checkpoint, and the full-size temps a killed writer leaves. Each kill is simulated by making the later step raise
(or by building the state it leaves on disk directly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvctl import fs
from rwkvctl.config import ModelConfig
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint, sidecar_path
from rwkvctl.lifecycle.quantize import quantize_checkpoint
from rwkvctl.quant.format import load_checkpoint_expanded
from rwkvctl.quant.policy import QuantSpec

CFG = ModelConfig(n_layer=1, n_embd=64, vocab_size=128, head_size=32)


class Killed(BaseException):
    """Stands in for kill -9 at a chosen point (a BaseException, as KeyboardInterrupt: nothing catches it)."""


def _kill_at_rename(monkeypatch, n: int) -> None:
    """os.replace works n-1 times, then the process "dies"."""
    real, calls = os.replace, []

    def replace(a, b):  # noqa: ANN001, ANN202
        calls.append(b)
        if len(calls) == n:
            raise Killed
        return real(a, b)

    monkeypatch.setattr(fs.os, "replace", replace)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture
def source(random_model, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "m.safetensors", random_model(CFG).state_dict(), CheckpointMeta(model=CFG))


# --- quantize --force -------------------------------------------------------------------------------------------


def test_quantize_force_killed_between_its_renames_never_pairs_new_weights_with_the_old_sidecar(
        source: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "q.safetensors"
    quantize_checkpoint(source, out, QuantSpec(bits=4))
    _kill_at_rename(monkeypatch, 2)  # the weights are renamed in, the sidecar is not
    with pytest.raises(Killed):
        quantize_checkpoint(source, out, QuantSpec(bits=8))
    monkeypatch.undo()
    assert not sidecar_path(out).exists()  # the 4-bit output's sidecar is gone with it, not left to describe it
    _, meta = load_checkpoint_expanded(out)  # the next command reads the file's own metadata: the 8-bit one
    assert meta.extra["quantization"]["bits"] == 8
    quantize_checkpoint(source, out, QuantSpec(bits=8))  # and a rerun completes the pair
    assert json.loads(sidecar_path(out).read_text())["extra"]["quantization"]["bits"] == 8


def test_quantize_killed_before_its_first_rename_keeps_the_old_output(source: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """The old sidecar goes just before the first rename: the old file, read by its own metadata, is what stays."""
    out = tmp_path / "q.safetensors"
    quantize_checkpoint(source, out, QuantSpec(bits=4))
    _kill_at_rename(monkeypatch, 1)
    with pytest.raises(Killed):
        quantize_checkpoint(source, out, QuantSpec(bits=8))
    monkeypatch.undo()
    assert load_checkpoint_expanded(out)[1].extra["quantization"]["bits"] == 4
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
