"""`rwkvctl generate`: greedy output equals the Python API's, --stop cuts exactly, prompts from files or stdin,
one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.config import ModelConfig
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.generate import SamplingConfig, generate
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)


@pytest.fixture
def checkpoint(random_model, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = random_model(CFG, seed=5)
    return save_checkpoint(tmp_path / "m.pth", model.state_dict(), CheckpointMeta(model=CFG)), model


def test_greedy_output_equals_the_api(checkpoint, tmp_path: Path) -> None:
    path, model = checkpoint
    tok = load_tokenizer("world")
    ids = list(generate(model, tok.encode("The cat"), 12, SamplingConfig(temperature=0), stop_tokens=(0,)))
    expected = "The cat" + tok.decode(ids)
    res = CliRunner().invoke(app, ["generate", str(path), "-p", "The cat", "--max-tokens", "12", "--temperature", "0"])
    assert res.exit_code == 0, res.output
    assert res.output == expected + "\n"
    # --stop: the output ends right before the first occurrence of the stop text
    cut = tok.decode(ids)[3:8]
    res = CliRunner().invoke(app, ["generate", str(path), "-p", "The cat", "--max-tokens", "12", "--temperature", "0",
                                   "--stop", cut])  # fmt: skip
    assert res.exit_code == 0 and res.output == expected[: expected.index(cut, len("The cat"))] + "\n"
    prompt = tmp_path / "p.txt"
    prompt.write_text("The cat", encoding="utf-8")
    from_file = CliRunner().invoke(app, ["generate", str(path), "--prompt-file", str(prompt), "--max-tokens", "12",
                                         "--temperature", "0"])  # fmt: skip
    from_stdin = CliRunner().invoke(app, ["generate", str(path), "--prompt-file", "-", "--max-tokens", "12",
                                          "--temperature", "0"], input="The cat")  # fmt: skip
    assert from_file.output == from_stdin.output == expected + "\n"


def test_generate_errors_are_one_line(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    for argv, message in (
        (["generate", str(path)], "exactly one of"),
        (["generate", str(path), "-p", "x", "--top-p", "0"], "--top-p"),
        (["generate", str(path), "-p", "x", "--temperature", "nan"], "--temperature"),
        (["generate", str(tmp_path / "none.pth"), "-p", "x"], "none.pth"),
        (["generate", str(path), "--prompt-file", str(tmp_path / "missing.txt")], "missing.txt"),
    ):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, (argv, res.output)
