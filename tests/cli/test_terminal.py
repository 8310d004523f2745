"""What reaches the terminal: control characters, C1 controls and bidi overrides from files, the model or data are
shown as visible stand-ins, never obeyed; usage errors (bad flags, bad values, missing arguments) are one red line."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.cli._common import LogFriendlyConsole
from rwkvctl.cli.terminal import clean, one_line, shown

runner = CliRunner()
HOSTILE = "a\x1b]0;pwned\x07b\u009b2Jc\u202eevil"  # OSC window title, a C1 CSI clear-screen, a right-to-left override
SGR = re.compile("\x1b\\[[0-9;]*m")  # Rich's own colours: the only escape sequences allowed through


def raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on, left after removing Rich's colour codes."""
    unsafe = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
    return unsafe.findall(SGR.sub("", text))


def test_clean_makes_c0_del_c1_and_bidi_visible() -> None:
    assert clean("\x1b[2J\x00\r\x7f") == "\u241b[2J\u2400\u240d\u2421"
    assert clean("\u009b2J \u0085 \u0080\u009f") == "<U+009B>2J <U+0085> <U+0080><U+009F>"
    assert clean("x\u202ay\u202ez\u2066w\u2069") == "x<U+202A>y<U+202E>z<U+2066>w<U+2069>"
    assert clean(HOSTILE) == "a\u241b]0;pwned\u2407b<U+009B>2Jc<U+202E>evil"
    assert raw_controls(clean(HOSTILE)) == []


@pytest.mark.parametrize("text", ["", "plain", "line one\n\tline two", "naïve café 中文 日本語 🎉 Ωμέγα", "עברית\u200f",
                                  "\u00a0\u00a9\u00ff", "[bold]not markup[/]"])  # fmt: skip
def test_clean_leaves_ordinary_text_alone(text: str) -> None:
    assert clean(text) == text and clean(clean(HOSTILE)) == clean(HOSTILE)


def test_shown_cleans_then_escapes_markup_and_one_line_joins_lines() -> None:
    assert shown("[red]x\x1b[0m") == "\\[red]x\u241b[0m"
    assert shown(Path("a[b]")) == "a\\[b]"
    assert one_line("first\n  second\tthird\x1b") == "first second third\u241b"


def test_the_consoles_clean_what_a_print_site_did_not() -> None:
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = LogFriendlyConsole(file=buf, force_terminal=True, color_system="truecolor", width=120)
    table = Table("name")
    table.add_row(HOSTILE)
    console.print(table)
    console.print(Text(HOSTILE), f"[bold]{HOSTILE}[/]", markup=True)
    console.print(HOSTILE, markup=False)
    out = buf.getvalue()
    assert SGR.search(out), "Rich's own styles still reach the terminal"
    assert raw_controls(out) == [] and "\u241b]0;pwned" in out and "<U+009B>2J" in out


def test_inspect_shows_hostile_sidecar_fields_as_text(tmp_path: Path) -> None:
    model = tmp_path / "m.pth"
    assert runner.invoke(app, ["init", "--vocab-size", "256", str(model)]).exit_code == 0
    sidecar = tmp_path / "m.pth.json"
    meta = json.loads(sidecar.read_text())
    meta["tokenizer"], meta["init"] = HOSTILE, "[bold]" + HOSTILE
    sidecar.write_text(json.dumps(meta))
    res = runner.invoke(app, ["inspect", str(model), "--no-tensors"])
    assert res.exit_code == 0, res.output
    assert raw_controls(res.output) == [] and "\u241b]0;pwned" in res.output and "<U+009B>2J" in res.output
    assert "[bold]a" in res.output  # markup in a field is printed, not applied
    # a real colour terminal (Rich emits its styles) gets no sequence of the file's
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "rwkvctl", "inspect", str(model), "--no-tensors"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert SGR.search(proc.stdout) and raw_controls(proc.stdout) == [] and "<U+202E>evil" in proc.stdout


def plain_terminal(monkeypatch, *modules: str) -> io.StringIO:
    """Swap the commands' console for a plain Rich one on a colour terminal: no safety net, so only each print
    site's own cleaning keeps the file's sequences out."""
    import importlib

    from rich.console import Console

    buf = io.StringIO()
    for name in modules:
        monkeypatch.setattr(importlib.import_module(name), "console", Console(file=buf, force_terminal=True, width=300))
    return buf


def test_every_inspect_and_prepare_print_site_cleans_what_it_shows(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "m.pth"
    assert runner.invoke(app, ["init", "--vocab-size", "256", str(model)]).exit_code == 0
    meta = json.loads((tmp_path / "m.pth.json").read_text())
    meta["tokenizer"], meta["init"] = HOSTILE, HOSTILE
    (tmp_path / "m.pth.json").write_text(json.dumps(meta))
    corpus = tmp_path / "in.jsonl"
    docs = [{"text": f"document {i}", "meta": {"redpajama_set_name": HOSTILE}} for i in range(3)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    shown_text = plain_terminal(monkeypatch, "rwkvctl.cli.inspect_cmd", "rwkvctl.cli.prepare")
    assert runner.invoke(app, ["inspect", str(model)]).exit_code == 0
    res = runner.invoke(app, ["prepare", str(corpus), "--out", str(tmp_path / "data"), "--ctx-len", "4"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["inspect", str(tmp_path / "data")]).exit_code == 0
    out = shown_text.getvalue()
    assert raw_controls(out) == [] and out.count("\u241b]0;pwned") >= 4, out  # tokenizer, init, source x2


def test_an_error_quoting_a_hostile_tensor_name_is_one_clean_line(tmp_path: Path) -> None:
    import torch

    model = tmp_path / "m.pth"
    assert runner.invoke(app, ["init", "--vocab-size", "256", str(model)]).exit_code == 0
    weights = torch.load(model, weights_only=True)
    weights[f"blocks.0.{HOSTILE}\n.weight"] = torch.zeros(1)  # an unexpected key: the error line names it
    torch.save(weights, model)
    proc = subprocess.run([sys.executable, "-m", "rwkvctl", "inspect", str(model)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "\u241b]0;pwned" in lines[0], proc.stderr
    assert raw_controls(proc.stderr.rstrip("\n")) == []


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--max-steps", "abc"], "--max-steps"),
        (["train", "--offload", "--max-steps"], "--max-steps"),
        (["chat", "--nope"], "--nope"),
        (["chat"], "model_path"),
        (["chat", "m.pth", "--top-k", "1.5"], "--top-k"),
        (["prepare", "x.jsonl"], "--out"),
        (["prepare"], "inputs"),
        (["quantize", "a.pth"], "out"),
        (["quantize", "a.pth", "b.safetensors", "--bits", "four"], "--bits"),
        (["kernels", "check", "--reps", "0"], "--reps"),
        (["no-such-command"], "no-such-command"),
        (["--bogus"], "--bogus"),
    ],
)
def test_usage_errors_are_one_red_line(argv: list[str], needle: str) -> None:
    res = runner.invoke(app, argv)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert "Usage:" not in res.output and "Traceback" not in res.output


def test_usage_error_line_names_the_flag_and_the_help_of_its_command() -> None:
    res = runner.invoke(app, ["train", "--max-steps", "abc"])
    assert re.fullmatch(r"error: --max-steps: .*integer.* \(see \S+ train --help\)\n", res.output), res.output
    res = runner.invoke(app, ["chat", f"--{HOSTILE}"])  # what the user typed is cleaned too
    assert res.exit_code == 2 and raw_controls(res.output) == [] and "pwned" in res.output and "<U+202E>" in res.output
    res = runner.invoke(app, ["chat", "m.pth", "--top-k", HOSTILE])
    assert res.exit_code == 2 and raw_controls(res.output) == [] and "--top-k" in res.output


def test_usage_errors_from_the_installed_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "rwkvctl", "train", "--max-steps", "abc"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: --max-steps: "), proc.stderr


def test_help_and_the_no_arguments_help_are_unchanged() -> None:
    for argv in ([], ["kernels"], ["tokenizer"]):
        res = runner.invoke(app, argv)
        assert "Usage:" in res.output and "error:" not in res.output, (argv, res.output)
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--max-steps" in res.output
    # a command run from inside another (demo, add-gate --resume) gets the exit code, not an exception
    assert app(["train", "--max-steps", "abc"], standalone_mode=False) == 2
