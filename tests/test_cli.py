"""The command line: help texts, init/inspect end to end, and one-line errors (no tracebacks)."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_every_command_has_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("init", "inspect"):
        assert name in result.output
        sub = invoke(name, "--help")
        assert sub.exit_code == 0 and len(sub.output) > 100


def test_init_meta_prints_exact_7b_count():
    result = invoke("init", "--preset", "7b", "--meta")
    assert result.exit_code == 0
    assert "7,518,044,160" in result.output


def test_init_then_inspect(tmp_path):
    out = tmp_path / "tiny.pth"
    result = invoke("init", "--preset", "tiny", "--vocab-size", "512", out)
    assert result.exit_code == 0, result.output
    assert out.exists() and (tmp_path / "tiny.pth.json").exists()
    result = invoke("inspect", out, "--limit", "0")
    assert result.exit_code == 0, result.output
    for needle in ("RWKV-5.2", "2 x 128", "blocks.1.att.time_decay", "float32", "sidecar"):
        assert needle in result.output


def test_init_no_gate_safetensors_bf16(tmp_path):
    out = tmp_path / "ng.safetensors"
    assert invoke("init", "--no-gate", "--vocab-size", "256", "--dtype", "bf16", out).exit_code == 0
    result = invoke("inspect", out, "--no-tensors")
    assert "no output gate" in result.output and "bfloat16" in result.output


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "m.pth"
    assert invoke("init", "--vocab-size", "256", out).exit_code == 0
    result = invoke("init", "--vocab-size", "256", out)
    assert result.exit_code == 2 and "--force" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["init", "--preset", "13b", "--meta"], "unknown preset"),
        (["init", "--dtype", "int3", "{tmp}/x.pth"], "unknown dtype"),
        (["inspect", "{tmp}/missing.pth"], "no such checkpoint"),
        (["inspect", "{tmp}/garbage.pth"], "not a torch zip"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "rwkvctl", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
