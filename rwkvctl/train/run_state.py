"""Resumable checkpoints: one directory per step, written under a temp name and renamed when complete.

    RUN/checkpoints/step-00000200/
        trainer_state.json   step, samples seen, tokens, elapsed, NaN skips, resolved run config (no pickle)
        rng-rank{R}.pt       torch/CUDA/numpy/python RNG states of rank R (tensors only: weights_only loads)
        engine_state.pt      model + AdamW state (single strategy)   | deepspeed/  ZeRO shards (deepspeed)
        rwkv-200.pth(.json)  the exported RWKV-LM state dict (loads in the `rwkv` package and `rwkvctl chat`)

A crash (kill -9, full disk) at any moment leaves either no `step-N` directory or a complete one; the
newest complete one is what `--resume` picks. Only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkvctl import fs
from rwkvctl.errors import CheckpointError

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Everything besides weights and optimizer that a resume needs to continue exactly."""

    step: int = 0
    """Optimizer steps done (the schedule is a function of this)."""
    samples_seen: int = 0
    """Windows consumed over all ranks: the data position."""
    tokens: int = 0
    """Training tokens consumed (samples_seen * ctx_len)."""
    elapsed_s: float = 0.0
    """Training wall time summed over all invocations."""
    nan_skips: int = 0
    world_size: int = 1
    engine: str = "single"
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints by step (temp directories and superseded ones are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    out: dict[int, Path] = {}
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / STATE_JSON).is_file():
                out[int(m.group(1))] = d
    return dict(sorted(out.items()))


def find_checkpoint(run_dir: Path, which: str | int = "latest") -> Path | None:
    """`latest` -> newest complete checkpoint or None; a step number -> that one or a CheckpointError."""
    found = list_checkpoints(run_dir)
    if which == "latest":
        return found[max(found)] if found else None
    step = int(which)
    if step not in found:
        have = ", ".join(str(s) for s in found) or "none"
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS}: no checkpoint for step {step} (available: {have})")
    return found[step]


def read_state(directory: Path) -> TrainerState:
    path = directory / STATE_JSON
    try:
        return TrainerState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable trainer state ({e})") from None


def capture_rng() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": torch.tensor([int(np_state[2]), int(np_state[3])], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_state[4])], dtype=torch.float64),
        "python": torch.tensor(list(py_state[1]), dtype=torch.int64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    keys = rng["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(v) for v in rng["numpy_meta"])
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(rng["numpy_gauss"][0])))
    random.setstate((3, tuple(int(v) for v in rng["python"]), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng-rank{rank}.pt"
    if not path.is_file():  # e.g. resumed with more ranks than saved: those start from the seeded state
        return
    try:
        restore_rng(torch.load(path, weights_only=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable RNG state ({e})") from None


class CheckpointWriter:
    """Writes a checkpoint directory in the three phases a multi-rank save needs."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep_last = keep_last

    def temp_dir(self, step: int) -> Path:
        return fs.dir_temp(self.root / step_dir_name(step))

    def begin(self, step: int) -> Path:
        """Rank 0, before anyone writes: a fresh, empty temp directory."""
        return fs.begin_dir(self.root / step_dir_name(step))

    def write_rank_files(self, tmp: Path, rank: int) -> None:
        torch.save(capture_rng(), tmp / f"rng-rank{rank}.pt")

    def commit(self, step: int, state: TrainerState) -> Path:
        """Rank 0, after every rank has written: state json last, fsync, rename into place, prune.
        Re-saving a step after resuming from an earlier one replaces that step's directory whole."""
        tmp = self.temp_dir(step)
        (tmp / STATE_JSON).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        final = fs.commit_dir(self.root / step_dir_name(step))
        self.prune()
        return final

    def abort(self, step: int) -> None:
        fs.abort_dir(self.root / step_dir_name(step))

    def prune(self) -> None:
        """Delete all but the newest keep_last checkpoints. Each is first renamed out of the `step-N` namespace,
        so a crash mid-delete never leaves a half-deleted directory that `--resume` would take as complete;
        leftovers of such a crash are removed here the next time."""
        found = list_checkpoints(self.root.parent)
        for step in list(found)[: max(len(found) - self.keep_last, 0)]:
            fs.remove_tree(found[step])
        fs.remove_leftovers(self.root)

    def supersede_after(self, step: int) -> list[Path]:
        """Resuming from an earlier step: later checkpoints belong to an abandoned trajectory. They are
        renamed (never deleted) so that `latest` and pruning ignore them."""
        moved = []
        for s, d in list_checkpoints(self.root.parent).items():
            if s > step:
                target = self.root / f"superseded-{d.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                moved.append(fs.rename(d, target))
        return moved


def write_run_config(run_dir: Path, yaml_text: str) -> None:
    fs.atomic_write_text(Path(run_dir) / "run_config.yaml", yaml_text)
