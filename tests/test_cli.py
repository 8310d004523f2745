"""The command line: help texts, init/inspect end to end, and one-line errors (no tracebacks)."""

import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from rwkvctl.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _command_paths(group, prefix=()):
    """Every registered command and sub-app (e.g. `kernels`, `kernels check`), found by walking the click tree."""
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):  # a sub-app (typer group): its own commands follow
            yield from _command_paths(command, (*prefix, name))


COMMANDS = sorted(_command_paths(typer.main.get_command(app)))


def test_the_command_walk_sees_sub_apps():
    assert {("init",), ("train",), ("kernels",), ("kernels", "check"), ("tokenizer",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help(path):
    """Every command, sub-app and sub-command, at any depth: a new command cannot skip this."""
    top = invoke("--help")
    assert top.exit_code == 0 and path[0] in top.output
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output) > 200


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
    for needle in ("RWKV-5.2", "2 x 128", "blocks.1.att.time_decay", "fp32", "sidecar"):
        assert needle in result.output
    assert "float32" not in result.output  # one spelling per dtype across commands (rwkvctl.names)


def test_init_no_gate_safetensors_bf16(tmp_path):
    out = tmp_path / "ng.safetensors"
    assert invoke("init", "--no-gate", "--vocab-size", "256", "--dtype", "bf16", out).exit_code == 0
    result = invoke("inspect", out, "--no-tensors")
    assert "no output gate" in result.output and "bf16" in result.output and "bfloat16" not in result.output


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


def test_paths_and_key_names_are_printed_literally_not_as_markup(tmp_path):
    odd = tmp_path / "x[bold]y" / "a[b].pth"
    odd.parent.mkdir()
    assert invoke("init", "--vocab-size", "256", odd).exit_code == 0
    shown = invoke("inspect", odd, "--no-tensors").output.replace("\n", "")
    assert "x[bold]y" in shown
    # a checkpoint with missing/unexpected keys: the error line names them
    import torch

    sd = torch.load(odd, weights_only=True)
    del sd["head.weight"]
    sd["extra[/x].weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    (tmp_path / "bad.pth.json").write_text((odd.parent / "a[b].pth.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "rwkvctl", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "head.weight" in proc.stderr and "extra[/x].weight" in proc.stderr


def test_init_checks_suffix_and_memory_before_allocating(tmp_path):
    result = invoke("init", "--preset", "7b", tmp_path / "m.bin")
    assert result.exit_code == 2 and "suffix" in result.output
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvctl", "init", "--preset", "7b", str(tmp_path / "m.pth")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # a 7B fp32 model needs ~28 GiB: refused up front on a smaller machine, never OOM-killed mid-way
    if proc.returncode != 0:
        assert "GiB of RAM" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.pth").exists() or proc.returncode == 0


def test_unexpected_errors_are_one_line_with_a_debug_hint(monkeypatch, tmp_path):
    import rwkvctl.lifecycle.models as models

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero somewhere deep")

    monkeypatch.setattr(models, "describe_checkpoint", boom)
    (tmp_path / "m.pth").write_bytes(b"")
    result = runner.invoke(app, ["inspect", str(tmp_path / "m.pth")])
    assert result.exit_code == 1
    assert "unexpected ZeroDivisionError" in result.output and "RWKVCTL_DEBUG=1" in result.output


def test_an_address_space_limit_counts_as_the_memory_available(tmp_path):
    """`ulimit -v` (or a container's cgroup limit) below MemAvailable: init is refused up front, naming what it
    needs, instead of dying in an allocation."""
    import resource

    def cap() -> None:  # in the child: 4 GiB of address space (python, torch and the CLI map under 1 GiB)
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))

    out = tmp_path / "m.pth"
    # the 1.5b preset in fp32 needs ~6 GiB: more than the cap leaves, whatever the machine's free RAM
    proc = subprocess.run([sys.executable, "-m", "rwkvctl", "init", "--preset", "1.5b", str(out)],
                          capture_output=True, text=True, timeout=120, preexec_fn=cap)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GiB of RAM" in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
