"""Segmented long windows under DeepSpeed (2 processes, CPU, gloo): each segment's backward is one DeepSpeed
micro-step and the gradients equal whole-window backprop in one process (ZeRO-2 and ZeRO-3); a run killed with
kill -9 and resumed reproduces the uninterrupted losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkvctl.model.registry import build_model, initialize
from rwkvctl.train.config import RunConfig
from rwkvctl.train.loss import lm_loss

pytestmark = pytest.mark.deepspeed
HERE = Path(__file__).resolve().parent


def _port() -> str:
    return str(29500 + (os.getpid() + int(time.time())) % 1000)


def _deepspeed(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", "2",
            "--master_port", _port(), *args]


def whole_window_gradients() -> tuple[float, dict[str, torch.Tensor]]:
    """The oracle: one process, the whole 64-token window at once."""
    sys.path.insert(0, str(HERE))
    from ds_segment_grads import MODEL

    cfg = RunConfig().with_overrides(MODEL)
    torch.manual_seed(0)
    model = initialize(build_model(cfg.model), "v5.2-2023", seed=0).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 64), generator=g)
    loss = lm_loss(model(x)[0], torch.roll(x, -1, 1), use_l2wrap=True)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [2, 3])
def test_segmented_deepspeed_gradients_equal_whole_window_backprop(tmp_path, stage) -> None:
    out = tmp_path / "grads.pt"
    res = subprocess.run(_deepspeed(str(HERE / "ds_segment_grads.py"), str(stage), "16", str(out)),
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    got = torch.load(out, weights_only=True)
    loss, want = whole_window_gradients()
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert set(got["grads"]) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _train(run: Path, data: Path, *extra: str) -> subprocess.Popen:
    cmd = _deepspeed("--module", "rwkvctl", "train", "--run-dir", str(run), "--data", str(data),
                     "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.vocab_size=64",
                     "--set", "model.head_size=32", "--ctx-len", "64", "--segment-len", "16", "--micro-bsz", "2",
                     "--lr-init", "3e-3", "--lr-final", "3e-3", "--warmup-steps", "1", "--strategy", "deepspeed",
                     "--zero-stage", "2", "--precision", "bf16", "--save-every", "2", "--max-steps", "8", *extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_a_killed_segmented_deepspeed_run_resumes_to_the_same_losses(tmp_path, motif_data) -> None:
    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = _train(run, motif_data)
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step-00000004").is_dir():  # killed once a later checkpoint is committed
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    resumed = _train(run, motif_data, "--resume")
    out = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from step" in out
    ref = _train(straight, motif_data)
    out = ref.communicate(timeout=900)[0]
    assert ref.returncode == 0, out[-3000:]
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]  # a step logged before the kill and again after: the same
    assert [by_step[s] for s in sorted(by_step)] == _losses(straight)
    assert sorted(by_step) == list(range(1, 9))
