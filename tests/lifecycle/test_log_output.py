"""Output that goes to a file or pipe (Slurm, CI, tee, nohup): never hard-wrapped, progress as plain lines."""

import os
import subprocess
import sys

import pytest

LONG = "a-run-directory-name-much-longer-than-forty-columns-of-terminal"


@pytest.mark.parametrize("columns", [None, "40"])
def test_train_log_lines_are_whole_and_progress_is_plain(tmp_path, pattern_data, train_cli, train_env, columns):
    env = {**train_env, "RWKVCTL_LOG_EVERY": "0"}
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = columns
    run_dir = tmp_path / LONG
    res = subprocess.run(train_cli(run_dir, pattern_data, "--max-steps", "4", "--save-every", "2"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "\r" not in res.stdout and "\x1b[" not in res.stdout  # no redrawn bar, no cursor movement
    steps = [line for line in lines if line.startswith("step ") and " loss " in line]
    assert [line.split()[1] for line in steps] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" lr " in line and " ETA " in line for line in steps)
    ckpt = str(run_dir / "checkpoints" / "step-00000004")
    assert any(line.startswith("step 4: checkpoint ") and line.endswith(ckpt) for line in lines)
    assert any(ckpt in line and "checkpoint" in line for line in lines if line.startswith("│"))  # summary row


def test_periodic_lines_are_rate_limited_but_the_last_step_is_always_logged(tmp_path, pattern_data, train_cli,
                                                                          train_env):
    env = {**train_env, "RWKVCTL_LOG_EVERY": "3600"}
    res = subprocess.run(train_cli(tmp_path / "r", pattern_data, "--max-steps", "3", "--save-every", "3"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("step ") and " loss " in line]
    assert steps == ["1/3", "3/3"]  # the first update, then nothing until the end


def test_error_lines_are_not_wrapped_in_a_narrow_log(tmp_path, train_env):
    from rwkvctl.cli import app  # noqa: F401  (the command must exist)

    missing = tmp_path / LONG / "no-such-data"
    env = {**train_env, "COLUMNS": "40"}
    cmd = [sys.executable, "-m", "rwkvctl", "train", "--run-dir", str(tmp_path / "r"), "--data", str(missing)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert res.returncode == 2
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(missing) in error[0]
