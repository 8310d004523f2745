"""The whole lifecycle through the CLI on CPU: prepared data -> train a gate-less model -> add-gate --resume from an
earlier checkpoint -> quantize --bits 4 (with a quality check) -> chat with the quantized model."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.train.run_dir import RunDir


@pytest.mark.slow
def test_prepare_train_add_gate_quantize_chat(tmp_path: Path, sample_dataset: Path) -> None:
    runner = CliRunner()

    def ok(*argv: str) -> str:
        res = runner.invoke(app, list(argv))
        assert res.exit_code == 0, f"rwkvctl {' '.join(argv)}\n{res.output}"
        return res.output

    run, gated = tmp_path / "run", tmp_path / "run-gate"
    ok("train", "--run-dir", str(run), "--data", str(sample_dataset), "--preset", "tiny", "--set", "model.gate=false",
       "--ctx-len", "32", "--micro-bsz", "4", "--max-steps", "8", "--save-every", "4", "--val-every", "0",
       "--device", "cpu", "--precision", "fp32")  # fmt: skip
    ok("add-gate", str(run), "--step", "4", "-o", str(gated), "--resume")
    assert sorted(RunDir(gated).checkpoints()) == [4, 8]
    exported = RunDir(gated).checkpoints()[8].export
    text = tmp_path / "eval.txt"
    text.write_text("def main():\n    print('hello world')\n" * 20)
    out = ok("quantize", str(exported), str(tmp_path / "q4.safetensors"), "--eval", str(text), "--eval-tokens", "128")
    assert "perplexity" in out
    out = ok("chat", str(tmp_path / "q4.safetensors"), "-m", "Hello", "--max-tokens", "4", "--seed", "0")
    assert "Assistant:" in out and "1 replies" in out
