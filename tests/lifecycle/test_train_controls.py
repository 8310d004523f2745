"""Training controls a cluster user relies on: signals acknowledged at once and reported in the exit code,
--stop-after-steps for one invocation only, plain refusals, exports in the run's precision, and taking a run over
from its weights at a given step."""

import json
import signal
import subprocess
import time

import pytest
import torch

from rwkvctl.io.checkpoint import load_checkpoint
from rwkvctl.lifecycle.train import train
from rwkvctl.train.metrics import read_metrics
from rwkvctl.train.run_dir import RunDir


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(RunDir(run)) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_is_acknowledged_checkpointed_and_exits_non_zero(tmp_path, pattern_data, train_cli, train_env,
                                                                 sig, code):
    run = tmp_path / "run"
    env = {**train_env, "RWKVCTL_LOG_EVERY": "0"}
    proc = subprocess.Popen(train_cli(run, pattern_data, "--max-steps", "100000", "--save-every", "100000"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = RunDir(run).metrics
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)  # wait for training to be under way (the loop, not start-up)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, out + err
    assert f"{signal.Signals(sig).name}: stopping after this step" in out
    assert "stopped by a signal" in out and "--resume" in out
    latest = RunDir(run).latest()
    assert latest is not None and latest.step == len(_losses(run))  # the step it finished was checkpointed


@pytest.mark.slow
def test_stop_after_steps_is_for_this_invocation_only(tmp_path, pattern_data, train_cli, run_cli):
    run = tmp_path / "run"
    first = run_cli(train_cli(run, pattern_data, "--max-steps", "6", "--stop-after-steps", "2"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stop_after_steps: 0" in RunDir(run).config_file.read_text()
    second = run_cli(train_cli(run, pattern_data, "--max-steps", "6", "--resume"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert len(_losses(run)) == 6  # ran to the plan's end, not 2 more steps


@pytest.mark.slow
def test_zero_steps_is_refused_and_resume_on_an_empty_run_is_said(tmp_path, pattern_data, train_cli, run_cli):
    res = run_cli(train_cli(tmp_path / "a", pattern_data, "--max-steps", "0"))
    assert res.returncode == 2 and "--max-steps 0" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(train_cli(tmp_path / "b", pattern_data, "--max-steps", "2", "--resume"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "holds no checkpoint yet, so this is a fresh start" in res.stdout


def test_the_export_is_in_the_training_precision(tmp_path, pattern_data, make_config):
    sizes = {}
    for name, export in (("auto", "auto"), ("fp32", "fp32")):
        result = train(make_config(tmp_path / name, pattern_data,
                                   train={"max_steps": 2, "precision": "bf16", "export_dtype": export}))
        weights, _ = load_checkpoint(result.export_path)
        assert {v.dtype for v in weights.values()} == {torch.bfloat16 if export == "auto" else torch.float32}
        sizes[name] = result.export_path.stat().st_size
    assert sizes["auto"] < 0.6 * sizes["fp32"]  # bf16: about half the bytes (RWKV-LM saves bf16 runs so)


def test_taking_a_run_over_at_a_step_continues_its_schedule_and_data(tmp_path, pattern_data, make_config):
    """A weights-only checkpoint (as RWKV-LM writes) continued at step 6 sees the same lr and the same windows as
    the run that wrote it: its first loss (computed before any update) equals that run's step-7 loss."""
    plan = {"max_steps": 10, "save_every": 6}
    straight = train(make_config(tmp_path / "straight", pattern_data, train=plan))
    export = RunDir(straight.run_dir).checkpoint(6).export
    taken = train(make_config(tmp_path / "taken", pattern_data,
                              train={**plan, "init_from": str(export), "start_step": 6}))
    a = [r for r in read_metrics(RunDir(straight.run_dir)) if "loss" in r]
    b = [r for r in read_metrics(RunDir(taken.run_dir)) if "loss" in r]
    assert [r["step"] for r in b] == [7, 8, 9, 10]
    assert [r["lr"] for r in b] == [r["lr"] for r in a[6:]]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a[6:]]
    assert b[0]["loss"] == a[6]["loss"]  # same weights, same window
    state = json.loads(RunDir(taken.run_dir).checkpoint(10).trainer_state.read_text())
    assert state["step"] == 10 and state["tokens"] == taken.tokens


def test_start_step_needs_init_from(tmp_path, pattern_data, make_config):
    from rwkvctl.errors import ConfigError

    with pytest.raises(ConfigError, match="train.start_step .* needs train.init_from"):
        train(make_config(tmp_path / "r", pattern_data, train={"start_step": 3}))
