"""The README's main command, shortened: every lifecycle stage runs and leaves its artefacts."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_lifecycle(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvctl", "demo", str(work), "--steps", "3", "--tokens", "5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "data" / "manifest.json").exists()
    assert (work / "loss.png").stat().st_size > 1000
    assert list(work.glob("run/checkpoints/step-*/rwkv-3.pth"))
    assert "continues the prompt" in proc.stdout
