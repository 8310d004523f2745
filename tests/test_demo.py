"""The README's main command, shortened: every lifecycle stage runs, the loss falls, and it reruns."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_lifecycle(tmp_path):
    work = tmp_path / "demo"
    argv = [sys.executable, "-m", "rwkvctl", "demo", str(work), "--steps", "12", "--tokens", "5"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "data" / "manifest.json").exists()
    assert (work / "loss.png").stat().st_size > 1000
    assert list(work.glob("run/checkpoints/step-*/rwkv-12.pth"))
    assert "continues the prompt" in proc.stdout
    # a log (stdout is a pipe here) is never hard-wrapped, and nothing is stretched to the unwrapped log width
    assert max(len(line) for line in proc.stdout.splitlines()) < 400
    assert (work / "model-q4.safetensors").is_file() and "perplexity" in proc.stdout and "Assistant:" in proc.stdout
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and r.get("step")]
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # the loss visibly falls
    # the README's main command can be run again in the same place
    again = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
