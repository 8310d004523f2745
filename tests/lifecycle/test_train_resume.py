"""Exact resume: a run killed with SIGKILL at an arbitrary moment and resumed with --resume produces the
same loss sequence (and weights) as an uninterrupted run, bit for bit, on CPU fp32. SIGTERM checkpoints."""

import signal
import subprocess
import time

import pytest
import torch

from rwkvctl.train.metrics import read_metrics
from rwkvctl.train.run_dir import RunDir
from rwkvctl.train.run_state import read_state

STEPS = 60
FLAGS = ("--accum", "2", "--max-steps", str(STEPS), "--save-every", "5", "--keep-last", "2")


def _steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _wait_for_steps(proc, run_dir, n, timeout=180):
    deadline = time.monotonic() + timeout
    while _steps_logged(run_dir) < n:
        assert proc.poll() is None, f"training ended before step {n}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "training did not reach the kill point in time"
        time.sleep(0.002)


def _losses(run_dir):
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_kill9_then_resume_reproduces_the_uninterrupted_run(tmp_path, pattern_data, train_cli, run_cli, train_env):
    full = run_cli(train_cli(tmp_path / "full", pattern_data, *FLAGS))
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cli(run, pattern_data, *FLAGS), env=train_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, run, 13)  # past the step-10 checkpoint, somewhere in steps 13..15
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _steps_logged(run)
    assert 13 <= killed_at < STEPS
    assert max(RunDir(run).checkpoints()) < STEPS

    resumed = run_cli(train_cli(run, pattern_data, *FLAGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stdout

    assert _losses(run) == _losses(tmp_path / "full")  # loss, lr and token count of every step, exactly
    a = torch.load(tmp_path / "full" / "checkpoints" / f"step-{STEPS:08d}" / f"rwkv-{STEPS}.pth", weights_only=True)
    b = torch.load(run / "checkpoints" / f"step-{STEPS:08d}" / f"rwkv-{STEPS}.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(run)
    assert sum(r["resumed"] for r in records) == 1
    assert (run / "metrics.superseded.jsonl").is_file() or killed_at % 5 == 0  # steps after the checkpoint moved aside


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_from_an_earlier_step(tmp_path, pattern_data, train_cli, run_cli, train_env):
    run = tmp_path / "run"
    plan = ("--max-steps", "400", "--save-every", "3", "--keep-last", "3")
    proc = subprocess.Popen(train_cli(run, pattern_data, *plan), env=train_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, run, 7)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM: stopped, not finished (after the checkpoint)
    assert "stopped by a signal" in out
    found = RunDir(run).checkpoints()
    stopped = read_state(found[max(found)])
    assert 7 <= stopped.step < 400 and stopped.step == _steps_logged(run)  # checkpoint of the step it stopped at

    # resume from a slightly earlier checkpoint: the later ones are set aside, and the continuation is
    # exactly what an uninterrupted run computes
    earlier = max(s for s in found if s < stopped.step)
    again = run_cli(train_cli(run, pattern_data, *plan, "--resume-step", str(earlier), "--stop-after-steps", "4"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert max(RunDir(run).checkpoints()) == earlier + 4
    assert any(p.name.startswith("superseded-") for p in (run / "checkpoints").iterdir())
    fresh = run_cli(train_cli(tmp_path / "fresh", pattern_data, *plan, "--stop-after-steps", str(earlier + 4)))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert _losses(run) == _losses(tmp_path / "fresh")

    missing = run_cli(train_cli(run, pattern_data, "--resume-step", "1"))
    assert missing.returncode != 0 and "no checkpoint for step 1" in missing.stderr
    assert "Traceback" not in missing.stderr
