"""Resumable checkpoints: one directory per step, written under a temp name and renamed when complete.

Each checkpoint holds the trainer state (step, data position, elapsed, NaN skips, resolved run config; JSON, no
pickle), every rank's torch/CUDA/numpy/python RNG states (tensors only: weights_only loads), the engine's state
and the exported RWKV-LM weights; rwkvctl.train.run_dir names them all.

A crash (kill -9, full disk) at any moment leaves either no `step-N` directory or a complete one; the
newest complete one is what `--resume` picks. Only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkvctl import fs
from rwkvctl.data.loader import DataPosition
from rwkvctl.errors import CheckpointError
from rwkvctl.io import bounded_json
from rwkvctl.io.bounded_json import field as checked_field
from rwkvctl.train.run_dir import CheckpointDir, RunDir

MAX_COUNT = 1 << 62  # steps: far above any run, and an int64 everywhere they go
FORMAT_VERSION = 1  # trainer_state.json's "format_version"; absent (files before it was recorded): 1


@dataclass
class TrainerState:
    """Everything besides weights and optimizer that a resume needs to continue exactly: the one definition of
    trainer_state.json for the writer (`to_dict`) and the reader (`from_dict`)."""

    step: int = 0
    """Optimizer steps done (the schedule is a function of this)."""
    position: DataPosition = field(default_factory=DataPosition)
    """The data position: samples consumed over all ranks and their tokens (stored as two top-level keys)."""
    elapsed_s: float = 0.0
    """Training wall time summed over all invocations."""
    nan_skips: int = 0
    world_size: int = 1
    engine: str = "single"
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "step": self.step, **self.position.to_dict(),
                "elapsed_s": self.elapsed_s, "nan_skips": self.nan_skips, "world_size": self.world_size,
                "engine": self.engine, "config": self.config}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "trainer state") -> TrainerState:
        """The state a JSON object describes, every field checked (type and range): a state of the wrong shape must
        be refused by name, never read as a fresh start at step 0. Absent fields (older files) take the defaults,
        except `step`."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: trainer state must be a JSON object, found {type(data).__name__}")
        bounded_json.format_version(data, "format_version", FORMAT_VERSION, source, CheckpointError,
                                    what="trainer state")

        def get(key: str, kind: type | tuple[type, ...], **kw: Any) -> Any:
            return checked_field(data, key, kind, source, CheckpointError, where="trainer state field", **kw)

        config = get("config", dict, default={})
        for section in ("model", "data", "optim", "train"):
            if section in config and not isinstance(config[section], dict):
                raise CheckpointError(f"{source}: trainer state field 'config.{section}' must be an object, got "
                                      f"{type(config[section]).__name__}")
        if "path" in config.get("data", {}) and not isinstance(config["data"]["path"], str):
            raise CheckpointError(f"{source}: trainer state field 'config.data.path' must be a string")
        return cls(step=get("step", int, minimum=0, maximum=MAX_COUNT),
                   position=DataPosition.from_dict(data, source, CheckpointError, where="trainer state field"),
                   elapsed_s=get("elapsed_s", float, minimum=0.0, default=0.0),
                   nan_skips=get("nan_skips", int, minimum=0, maximum=MAX_COUNT, default=0),
                   world_size=get("world_size", int, minimum=1, maximum=1 << 24, default=1),
                   engine=get("engine", str, default="single"), config=config)


def read_state(ckpt: CheckpointDir) -> TrainerState:
    """A checkpoint's trainer state, checked: well-formed, and for the step its directory is named after."""
    path = ckpt.trainer_state
    try:
        data = bounded_json.read(path, CheckpointError, what="trainer state", expect=object)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable trainer state ({e.strerror or e})") from None
    state = TrainerState.from_dict(data, source=str(path))
    if state.step != ckpt.step:
        raise CheckpointError(f"{path}: says step {state.step} but belongs to the checkpoint of step {ckpt.step}; "
                              "the file is damaged or was copied from another checkpoint")
    return state


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

    def remove_stale_temps(self) -> None:
        """Delete the temp directories of checkpoints a killed writer never committed (full-size, and of steps a
        resumed run may never save again). Only for the run dir's one writer (it holds the run dir's lock)."""
        fs.remove_dir_temps(self.root)

    def write_rank_files(self, tmp: CheckpointDir, rank: int) -> None:
        torch.save(capture_rng(), tmp.rng(rank))

    def commit(self, step: int, state: TrainerState) -> CheckpointDir:
        """Rank 0, after every rank has written: state json last, fsync, rename into place, prune.
        Re-saving a step after resuming from an earlier one replaces that step's directory whole."""
        self.temp(step).trainer_state.write_text(json.dumps(state.to_dict(), indent=1), encoding="utf-8")
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
