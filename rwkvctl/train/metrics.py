"""Per-step metrics (metrics.jsonl, optional Weights & Biases) and throughput/MFU arithmetic."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rwkvctl.arch import arch_of
from rwkvctl.config import ModelConfig
from rwkvctl.errors import ConfigError, TrainingError
from rwkvctl.fs import atomic_write_text
from rwkvctl.train.run_dir import RunDir

# Dense bf16 peak TFLOP/s by GPU name substring, for the MFU estimate (first match wins).
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0), ("4090", 165.0),
                ("A10", 125.0), ("V100", 125.0), ("3090", 71.0))


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token, by the architecture's formula (rwkvctl.arch; x052: 6 x matmul parameters plus the
    WKV recurrence)."""
    return arch_of(cfg).flops_per_token(cfg)


def peak_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in _PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, cfg: ModelConfig, peak: float | None, world_size: int) -> float | None:
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token(cfg) / (peak * world_size)


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null so every line stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON lines, flushed per record so a kill -9 loses at most the line being written."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.metrics
        try:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        except OSError as e:
            raise TrainingError(f"{self.path}: cannot open the metrics log ({e.strerror})") from None

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_after(run: RunDir, step: int) -> int:
    """Before resuming at `step`, move records of later steps (the abandoned trajectory) aside."""
    path = run.metrics
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by kill -9
            continue
        (keep if rec.get("step", 0) <= step else drop).append(line)
    if drop:
        with open(run.metrics_superseded, "a", encoding="utf-8") as f:
            f.write("\n".join(drop) + "\n")
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(drop)


def read_metrics(run_dir: RunDir | str | Path) -> list[dict[str, Any]]:
    path = RunDir.of(run_dir).metrics
    if not path.is_file():
        raise TrainingError(f"{path}: no metrics log (is {run_dir} a `rwkvctl train` run directory?)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class WandbSink:
    """Optional Weights & Biases mirror of the metrics. The run id is kept in the run dir so a resume
    continues the same W&B run; WANDB_MODE=offline works without network."""

    def __init__(self, project: str, run: RunDir, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
        id_file = run.wandb_id
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        atomic_write_text(id_file, run_id)
        try:
            self.run = wandb.init(project=project, dir=str(run.path), id=run_id, resume="allow", config=config,
                                  name=run.path.name, mode=os.environ.get("WANDB_MODE") or None)
        except Exception as e:  # wandb raises many types (auth, network); one line is what the user needs
            raise TrainingError(f"wandb.init failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                "set WANDB_MODE=offline to log locally") from None

    def write(self, record: dict[str, Any]) -> None:
        data = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
