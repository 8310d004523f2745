"""Resumable checkpoints: one directory per step, written under a temp name and renamed when complete.

Each checkpoint holds the trainer state (step, samples seen, tokens, elapsed, NaN skips, resolved run config; JSON,
no pickle), every rank's torch/CUDA/numpy/python RNG states (tensors only: weights_only loads), the engine's state
and the exported RWKV-LM weights; rwkvctl.train.run_dir names them all.

A crash (kill -9, full disk) at any moment leaves either no `step-N` directory or a complete one; the
newest complete one is what `--resume` picks. Only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkvctl import fs
from rwkvctl.errors import CheckpointError
from rwkvctl.train.run_dir import CheckpointDir, RunDir


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


def read_state(ckpt: CheckpointDir) -> TrainerState:
    path = ckpt.trainer_state
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


def load_rng(ckpt: CheckpointDir, rank: int) -> None:
    path = ckpt.rng(rank)
    if not path.is_file():  # e.g. resumed with more ranks than saved: those start from the seeded state
        return
    try:
        restore_rng(torch.load(path, weights_only=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable RNG state ({e})") from None


class CheckpointWriter:
    """Writes a checkpoint directory in the three phases a multi-rank save needs. RunDir names the directories,
    rwkvctl.fs does the crash-safe mechanics (temp directory, fsync, rename, rename-aside before deleting)."""

    def __init__(self, run: RunDir, keep_last: int) -> None:
        self.run = run
        self.root = run.checkpoints_root
        self.keep_last = keep_last

    def temp(self, step: int) -> CheckpointDir:
        return self.run.temp_checkpoint(step)

    def begin(self, step: int) -> CheckpointDir:
        """Rank 0, before anyone writes: a fresh, empty temp directory."""
        fs.begin_dir(self.run.checkpoint(step).path)
        return self.temp(step)

    def write_rank_files(self, tmp: CheckpointDir, rank: int) -> None:
        torch.save(capture_rng(), tmp.rng(rank))

    def commit(self, step: int, state: TrainerState) -> CheckpointDir:
        """Rank 0, after every rank has written: state json last, fsync, rename into place, prune.
        Re-saving a step after resuming from an earlier one replaces that step's directory whole."""
        self.temp(step).trainer_state.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        final = self.run.checkpoint(step)
        fs.commit_dir(final.path)
        self.prune()
        return final

    def abort(self, step: int) -> None:
        fs.abort_dir(self.run.checkpoint(step).path)

    def prune(self) -> None:
        """Delete all but the newest keep_last checkpoints. Each is first renamed out of the `step-N` namespace,
        so a crash mid-delete never leaves a half-deleted directory that `--resume` would take as complete;
        leftovers of such a crash are removed here the next time."""
        found = self.run.checkpoints()
        for step in list(found)[: max(len(found) - self.keep_last, 0)]:
            fs.remove_tree(found[step].path)
        fs.remove_leftovers(self.root)

    def supersede_after(self, step: int) -> list[Path]:
        """Resuming from an earlier step: later checkpoints belong to an abandoned trajectory. They are
        renamed (never deleted) so that `latest` and pruning ignore them."""
        return [fs.rename(d.path, self.run.superseded_path(d)) for s, d in self.run.checkpoints().items() if s > step]


def write_run_config(run: RunDir, yaml_text: str) -> None:
    fs.atomic_write_text(run.config_file, yaml_text)
