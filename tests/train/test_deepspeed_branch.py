"""ZeRO checkpoints re-addressed per parameter (two real DeepSpeed processes, CPU/gloo, ZeRO-2 bf16): un-sharding a
checkpoint and resuming from the per-parameter state reproduces the uninterrupted run bit for bit, and add-gate on
a ZeRO run resumes under DeepSpeed with the gate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rwkvctl.io.checkpoint import load_checkpoint
from rwkvctl.lifecycle.add_gate import add_gate_to_run, branch_run
from rwkvctl.lifecycle.train import train
from rwkvctl.train.deepspeed_engine import read_zero_checkpoint
from rwkvctl.train.run_dir import RunDir

pytestmark = pytest.mark.deepspeed

MODEL = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.vocab_size=64",
         "--set", "model.head_size=32", "--set", "model.gate=false"]  # fmt: skip


def _launch(run_dir, *extra, data=None):
    port = str(29700 + os.getpid() % 200)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", "2",
           "--master_port", port, "--module", "rwkvctl", "train", "--run-dir", str(run_dir), *extra]  # fmt: skip
    if data is not None:
        cmd += ["--data", str(data), *MODEL, "--ctx-len", "32", "--micro-bsz", "2", "--lr-init", "3e-3",
                "--lr-final", "3e-3", "--warmup-steps", "1", "--strategy", "deepspeed", "--zero-stage", "2",
                "--precision", "bf16", "--save-every", "3", "--val-every", "0"]  # fmt: skip
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, motif_data):
    run = tmp_path_factory.mktemp("zero") / "run"
    _launch(run, "--max-steps", "6", data=motif_data)
    return run


def test_zero_shards_gather_to_the_exported_weights(zero_run):
    weights, moments, step = read_zero_checkpoint(RunDir(zero_run).checkpoints()[3])
    exported, _ = load_checkpoint(RunDir(zero_run).checkpoints()[3].export)
    assert step == 3 and set(weights) == set(exported) == set(moments)
    for name, w in exported.items():  # fp32 masters, rounded like the module's bf16 copies: the same bits
        assert torch.equal(weights[name].to(w.dtype), w), name
        assert moments[name]["exp_avg"].shape == w.shape and moments[name]["exp_avg_sq"].min() >= 0


def test_unsharded_state_resumes_the_zero_run_exactly(zero_run, tmp_path):
    branch = branch_run(zero_run, tmp_path / "port", step=3)
    assert not RunDir(branch.out).checkpoints()[3].deepspeed_dir.exists()
    _launch(branch.out, "--resume")
    want, got = _losses(zero_run), _losses(branch.out)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]  # bit for bit
    a, _ = load_checkpoint(RunDir(zero_run).checkpoints()[6].export)
    b, _ = load_checkpoint(RunDir(branch.out).checkpoints()[6].export)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the per-parameter step is no longer tied to the ZeRO layout: a single process can take it over too
    single = branch_run(zero_run, tmp_path / "single", step=3)
    cfg = single.config.with_overrides({"train.strategy": "single", "train.device": "cpu"})
    result = train(cfg, resume="latest")
    assert result.resumed_from == 3 and result.step == 6 and np.isfinite(result.final_loss)


def test_add_gate_to_a_zero_run_resumes_under_deepspeed(zero_run, tmp_path):
    gated = add_gate_to_run(zero_run, tmp_path / "gated", step=3)
    assert gated.config.model.gate
    out = _launch(gated.out, "--resume")
    assert "resuming from step 3" in out.stdout
    losses = _losses(gated.out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values())))
    weights, meta = load_checkpoint(RunDir(gated.out).checkpoints()[6].export)
    assert meta.model.gate and "blocks.1.att.gate.weight" in weights
