"""`rwkvctl generate`: greedy and seeded output equal the Python API's, --stop cuts exactly, prompts from files or
stdin, one-line errors."""

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


def test_a_terminal_gets_no_raw_control_characters_a_pipe_gets_the_text(checkpoint, monkeypatch) -> None:
    """Model output with an OSC sequence and a C1 CSI: shown as stand-ins on a terminal, exact in a pipe or file."""
    import io
    import re

    from rich.console import Console

    import rwkvctl.cli.generate_cmd as generate_cmd
    import rwkvctl.generate.engine

    path, _ = checkpoint
    hostile = " \x1b]0;pwned\x07 \u009b2J done"
    ids = load_tokenizer("world").encode(hostile)
    replies = []  # the model "says" the hostile text, then ends the document (token 0), for each of the two runs

    def scripted(logits, sampling, generator):
        if not replies:
            replies.extend(ids + [0])
        return replies.pop(0)

    monkeypatch.setattr(rwkvctl.generate.engine, "sample", scripted)
    argv = ["generate", str(path), "-p", "x\u009b", "--max-tokens", "40"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0 and res.output == "x\u009b" + hostile + "\n"  # `generate > out.txt` keeps the text
    terminal = io.StringIO()
    monkeypatch.setattr(generate_cmd, "console", Console(file=terminal, force_terminal=True))
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    shown = re.sub("\x1b\\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # the status spinner's own cursor codes
    assert "\x1b" not in shown and "\x9b" not in shown and "\x07" not in shown
    assert shown.endswith("x<U+009B> \u241b]0;pwned\u2407 <U+009B>2J done\n"), repr(shown)


def test_seeded_sampling_equals_the_engine_and_repeats(checkpoint, monkeypatch) -> None:
    """Sampling settings reach the engine unchanged (the settings the command builds are captured and compared), the
    CLI's text with a seed equals the engine's with the same settings, and the same seed repeats it while another
    seed gives another text."""
    from rwkvctl.generate import DecodeSettings, InferenceEngine

    path, model = checkpoint
    tok = load_tokenizer("world")
    settings = DecodeSettings(SamplingConfig(temperature=1.2, top_p=0.5, top_k=50), max_tokens=10, stop_tokens=(0,),
                              seed=7)  # fmt: skip
    expected = "The cat" + "".join(InferenceEngine(model, tok).generate(tok.encode("The cat"), settings))
    built: list[DecodeSettings] = []
    real = InferenceEngine.generate
    monkeypatch.setattr(InferenceEngine, "generate",
                        lambda self, ids, s, **kw: built.append(s) or real(self, ids, s, **kw))  # fmt: skip
    argv = ["generate", str(path), "-p", "The cat", "--max-tokens", "10", "--temperature", "1.2", "--top-p", "0.5",
            "--top-k", "50"]  # fmt: skip
    runs = [CliRunner().invoke(app, [*argv, "--seed", seed]) for seed in ("7", "7", "8")]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    assert built[0] == settings
    assert runs[0].output == runs[1].output == expected + "\n"
    assert runs[2].output != runs[0].output
