"""Faults give one clear error and leave the last good checkpoint intact."""

import errno
import math

import numpy as np
import pytest
import torch

from rwkvctl.errors import CheckpointError, ConfigError, DataError, TrainingError
from rwkvctl.lifecycle.train import train
from rwkvctl.train import single
from rwkvctl.train.metrics import read_metrics
from rwkvctl.train.run_dir import RunDir
from rwkvctl.train.run_state import CheckpointWriter


def _nan_on_calls(monkeypatch, calls):
    """Make the loss of the given micro-step calls (1-based) NaN, as a diverging model would."""
    real = single.lm_loss
    count = {"n": 0}

    def loss(logits, y, *, use_l2wrap):
        count["n"] += 1
        out = real(logits, y, use_l2wrap=use_l2wrap)
        return out * float("nan") if count["n"] in calls else out

    monkeypatch.setattr(single, "lm_loss", loss)


def test_nan_loss_skips_the_step_without_touching_weights(tmp_path, pattern_data, make_config, monkeypatch):
    _nan_on_calls(monkeypatch, {3, 4})  # both micro-batches of step 2
    cfg = make_config(tmp_path / "run", pattern_data, train={"accum": 2, "max_steps": 2, "save_every": 1})
    events = []
    result = train(cfg, on_progress=events.append)
    records = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in records] == [False, True]
    assert records[1]["grad_norm"] is None and records[1]["loss"] is None
    assert result.nan_skips == 1 and result.step == 2
    assert any("non-finite loss" in e.message for e in events)
    w1 = torch.load(tmp_path / "run" / "checkpoints" / "step-00000001" / "rwkv-1.pth", weights_only=True)
    w2 = torch.load(tmp_path / "run" / "checkpoints" / "step-00000002" / "rwkv-2.pth", weights_only=True)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step changed nothing


def test_nan_loss_stop_policy_and_too_many_skips(tmp_path, pattern_data, make_config, monkeypatch):
    _nan_on_calls(monkeypatch, set(range(3, 100)))
    cfg = make_config(tmp_path / "stop", pattern_data, train={"nan_policy": "stop", "save_every": 1})
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss .*nan_policy=stop.*--resume"):
        train(cfg)
    assert max(RunDir(tmp_path / "stop").checkpoints()) == 2
    cfg = make_config(tmp_path / "skip", pattern_data, train={"max_nan_skips": 2})
    with pytest.raises(TrainingError, match="3 consecutive skipped steps"):
        train(cfg)


def test_disk_full_during_checkpoint_keeps_the_last_good_one(tmp_path, pattern_data, make_config, monkeypatch):
    real = CheckpointWriter.write_rank_files
    calls = {"n": 0}

    def full_disk(self, tmp, rank):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tmp, rank)

    monkeypatch.setattr(CheckpointWriter, "write_rank_files", full_disk)
    cfg = make_config(tmp_path / "run", pattern_data, train={"max_steps": 12, "save_every": 4})
    with pytest.raises(TrainingError, match=r"step 8 .*No space left on device.*last good checkpoint: .*step-00000004"):
        train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004"]  # no half-written temp directory
    monkeypatch.setattr(CheckpointWriter, "write_rank_files", real)
    result = train(cfg, resume="latest")  # the survivor is a complete, resumable checkpoint
    assert result.resumed_from == 4 and result.step == 12


def test_unwritable_run_dir_and_existing_run(tmp_path, pattern_data, make_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TrainingError, match="is not writable"):
        train(make_config(blocker / "run", pattern_data))
    cfg = make_config(tmp_path / "run", pattern_data, train={"max_steps": 2})
    train(cfg)
    with pytest.raises(TrainingError, match="already holds checkpoints; pass --resume"):
        train(cfg)
    with pytest.raises(CheckpointError, match="saved with model"):
        train(cfg.with_overrides({"model.n_layer": 3}), resume="latest")


def test_data_too_small_and_wrong_vocab(tmp_path, make_config):
    from rwkvctl.data.binidx import BinIdxWriter

    with BinIdxWriter(tmp_path / "small") as w:
        w.add_document(np.arange(1, 20, dtype=np.uint16))
    with pytest.raises(DataError, match="fewer than one window of ctx_len\\+1 = 33"):
        train(make_config(tmp_path / "r1", tmp_path / "small"))
    with BinIdxWriter(tmp_path / "big") as w:
        w.add_document(np.full(4000, 500, dtype=np.uint16))
    with pytest.raises(DataError, match="token id 500 >= the model's vocab_size 64"):
        train(make_config(tmp_path / "r2", tmp_path / "big"))
    with pytest.raises(DataError):
        train(make_config(tmp_path / "r3", tmp_path / "missing"))


def test_wandb_requested_but_not_installed(tmp_path, pattern_data, make_config, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(make_config(tmp_path / "run", pattern_data, train={"wandb": "proj"}))


def test_grad_checkpointing_gives_the_same_losses(tmp_path, pattern_data, make_config):
    plain_run = train(make_config(tmp_path / "a", pattern_data, train={"max_steps": 3}))
    cp_run = train(make_config(tmp_path / "b", pattern_data, train={"max_steps": 3, "grad_checkpointing": True}))
    la = [r["loss"] for r in read_metrics(plain_run.run_dir)]
    lb = [r["loss"] for r in read_metrics(cp_run.run_dir)]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(la, lb, strict=True))


def test_wandb_mirror_resumes_the_same_run(tmp_path, pattern_data, make_config, monkeypatch):
    import sys
    import types

    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = make_config(tmp_path / "run", pattern_data, train={"wandb": "proj", "max_steps": 4, "stop_after_steps": 2})
    train(cfg)
    train(cfg.with_overrides({"train.stop_after_steps": 0}), resume="latest")
    assert [c["id"] for c in calls["init"]] == ["abc123", "abc123"] and calls["init"][0]["project"] == "proj"
    assert calls["init"][0]["resume"] == "allow" and calls["finish"] == 2
    assert [s for s, _ in calls["log"]] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens", "grad_norm"} <= set(calls["log"][0][1])
