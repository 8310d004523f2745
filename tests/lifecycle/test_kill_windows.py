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


def test_quantize_removes_a_killed_runs_temps_before_it_starts(source: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "q.safetensors"
    pid = _dead_pid()
    stale = [tmp_path / f".q.safetensors.tmp-{pid}", tmp_path / f".q.safetensors.json.tmp-{pid}"]
    for p in stale:
        p.write_bytes(b"\0" * 4096)
    live = tmp_path / f".q.safetensors.tmp-{os.getppid()}"  # a writer still running: not ours to delete
    live.write_bytes(b"\0")
    seen: list[bool] = []
    import rwkvctl.lifecycle.quantize as lq

    real = lq.quantize_state_dict
    monkeypatch.setattr(lq, "quantize_state_dict", lambda *a: (seen.append(any(p.exists() for p in stale)),
                                                                 real(*a))[1])
    quantize_checkpoint(source, out, QuantSpec(bits=4))
    assert seen == [False] and live.exists()  # gone before the long part, not only at the final rename


# --- train: before run_config.yaml exists -------------------------------------------------------------------------


def _cli(args: list) -> tuple[int, str]:
    from typer.testing import CliRunner

    from rwkvctl.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stderr


def test_resume_of_a_run_killed_before_anything_was_written_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()  # what a kill right after creating the run dir leaves (the lock file aside)
    code, err = _cli(["train", "--run-dir", run, "--resume"])
    assert code == 2 and err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{run} holds no run_config.yaml and no checkpoint" in err and "--config" in err, err


def test_a_fresh_run_killed_before_its_first_checkpoint_resumes_with_its_own_settings(
        tmp_path: Path, pattern_data: Path, make_config, monkeypatch) -> None:
    import rwkvctl.lifecycle.train as lt
    from rwkvctl.train.config import RunConfig

    cfg = make_config(tmp_path / "run", pattern_data, train={"max_steps": 2, "save_every": 2})

    def killed(cfg):  # noqa: ANN001, ANN202
        raise Killed

    monkeypatch.setattr(lt, "_build_model", killed)  # killed while building the model: long before any step
    with pytest.raises(Killed):
        lt.train(cfg)
    monkeypatch.undo()
    assert RunConfig.from_yaml(tmp_path / "run" / "run_config.yaml") == cfg  # written before anything heavy
    code, err = _cli(["train", "--run-dir", tmp_path / "run", "--resume"])  # no flags: the run's own settings
    assert code == 0, err
    assert list(lt.RunDir(tmp_path / "run").checkpoints()) == [2]


def test_a_run_without_run_config_yaml_resumes_from_the_config_its_checkpoint_saved(
        tmp_path: Path, pattern_data: Path, make_config) -> None:
    from rwkvctl.lifecycle.train import resume_config, train

    cfg = make_config(tmp_path / "run", pattern_data, train={"max_steps": 4, "save_every": 2, "stop_after_steps": 2})
    train(cfg)
    (tmp_path / "run" / "run_config.yaml").unlink()  # an older version's add-gate killed after its commit, say
    assert resume_config(tmp_path / "run") == cfg.with_overrides({"train.stop_after_steps": 2})
    code, err = _cli(["train", "--run-dir", tmp_path / "run", "--resume"])
    assert code == 0, err
    assert list(lt_checkpoints(tmp_path / "run")) == [2, 4]


def lt_checkpoints(run: Path) -> dict:
    from rwkvctl.train.run_dir import RunDir

    return RunDir(run).checkpoints()


# --- add-gate: its checkpoint is committed last ---------------------------------------------------------------------


def test_add_gate_killed_before_its_commit_is_refused_by_train_and_redone_by_add_gate(
        tmp_path: Path, pattern_data: Path, make_config, monkeypatch) -> None:
    from rwkvctl.errors import TrainingError
    from rwkvctl.lifecycle.add_gate import add_gate_to_run
    from rwkvctl.lifecycle.train import train
    from rwkvctl.train.config import RunConfig
    from rwkvctl.train.run_state import CheckpointWriter

    train(make_config(tmp_path / "run", pattern_data, model={"gate": False}, train={"max_steps": 2, "save_every": 2}))
    out = tmp_path / "gated"

    def killed(self, step, state):  # noqa: ANN001, ANN202
        raise Killed

    monkeypatch.setattr(CheckpointWriter, "commit", killed)
    with pytest.raises(Killed):
        add_gate_to_run(tmp_path / "run", out)
    monkeypatch.undo()
    assert (out / "branch.json").is_file() and not lt_checkpoints(out)
    # the next train must not start the gated model from scratch under the branch's name
    cfg = RunConfig.from_yaml(out / "run_config.yaml")
    for resume in ("latest", None):
        with pytest.raises(TrainingError, match="add-gate into it stopped before committing its checkpoint"):
            train(cfg, resume=resume)
    code, err = _cli(["train", "--run-dir", out, "--resume"])
    assert code == 2 and "run that add-gate again" in err and err.count("error:") == 1, err
    # add-gate run again finishes the job in the same --out; once complete, the output is refused as before
    assert add_gate_to_run(tmp_path / "run", out).step == 2
    assert list(lt_checkpoints(out)) == [2] and json.loads((out / "branch.json").read_text())["from_step"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    from rwkvctl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not empty"):
        add_gate_to_run(tmp_path / "run", out)


def test_add_gate_killed_before_its_run_config_leaves_a_directory_add_gate_redoes(
        tmp_path: Path, pattern_data: Path, make_config, monkeypatch) -> None:
    """branch.json is the first file add-gate writes: killed right after it, `train --resume` refuses (it never
    sees a run_config.yaml without branch.json, which would read as a fresh run) and add-gate redoes the branch."""
    import rwkvctl.lifecycle.add_gate as add_gate_module
    from rwkvctl.lifecycle.add_gate import add_gate_to_run
    from rwkvctl.lifecycle.train import train

    train(make_config(tmp_path / "run", pattern_data, model={"gate": False}, train={"max_steps": 2, "save_every": 2}))
    out = tmp_path / "gated"

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise Killed

    monkeypatch.setattr(add_gate_module, "write_run_config", killed)
    with pytest.raises(Killed):
        add_gate_to_run(tmp_path / "run", out)
    monkeypatch.undo()
    assert (out / "branch.json").is_file() and not (out / "run_config.yaml").exists() and not lt_checkpoints(out)
    code, err = _cli(["train", "--run-dir", out, "--resume"])
    assert code == 2 and err.count("error:") == 1, err
    assert add_gate_to_run(tmp_path / "run", out).step == 2 and list(lt_checkpoints(out)) == [2]


# --- train: a killed save's temps ---------------------------------------------------------------------------------


def test_train_removes_a_killed_saves_temp_and_finishes_a_cut_replace(tmp_path: Path, pattern_data: Path,
                                                                      make_config) -> None:
    from rwkvctl.lifecycle.train import train

    cfg = make_config(tmp_path / "run", pattern_data, train={"max_steps": 4, "save_every": 2, "stop_after_steps": 2})
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step-00000006").mkdir()  # a save killed mid-write, of a step this run will not save again
    (root / ".tmp-step-00000006" / "engine_state.pt").write_bytes(b"\0" * 4096)
    # a replace of step 2 cut between its renames: the old copy set aside, the new (complete) one not renamed in
    (root / "step-00000002").rename(root / ".old-step-00000002-123")
    import shutil

    shutil.copytree(root / ".old-step-00000002-123", root / ".tmp-step-00000002")
    train(cfg.with_overrides({"train.stop_after_steps": 0}), resume="latest")
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-00000002", "step-00000004"], names


def test_ranks_that_chose_different_checkpoints_are_refused_alike(tmp_path: Path) -> None:
    """Rank 0 finishes a killed save's replace while the other ranks look for `latest`: all must agree."""
    from types import SimpleNamespace

    from rwkvctl.errors import TrainingError
    from rwkvctl.lifecycle.train import _check_ranks_agree

    def engine(*steps: float):  # what the all-reduce of (step, step^2, 1) gives with these ranks' choices
        sums = [sum(steps), sum(s * s for s in steps), float(len(steps))]
        return SimpleNamespace(world_size=len(steps), all_reduce_sum=lambda values: sums)

    ckpt = SimpleNamespace(step=4)
    _check_ranks_agree(engine(4.0, 4.0), ckpt)
    _check_ranks_agree(engine(-1.0, -1.0, -1.0), None)
    for steps in ((4.0, 2.0), (2.0, 4.0, 3.0), (4.0, -1.0)):
        with pytest.raises(TrainingError, match="chose different checkpoints"):
            _check_ranks_agree(engine(*steps), ckpt)
