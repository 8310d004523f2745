"""The layout of a training run directory: the one module that spells its file and directory names.

    RUN/
        run_config.yaml                the resolved run config (`--resume` without --config reads it)
        metrics.jsonl                  one JSON record per logged step
        metrics.superseded.jsonl       records of an abandoned trajectory, moved aside on resume
        wandb_id.txt                   the W&B run id, so that a resume continues the same W&B run
        branch.json                    (add-gate) the run and step this run was branched from
        checkpoints/
            step-00000200/             a complete checkpoint (CheckpointDir)
                trainer_state.json     written last: its presence is what makes the checkpoint complete
                rng-rank{R}.pt         RNG states of rank R
                engine_state.pt        model + AdamW (single strategy)  | deepspeed/state/  ZeRO files (deepspeed)
                rwkv-200.pth(.json)    the exported RWKV-LM weights (+ sidecar)
            (temp, replaced and half-deleted step directories, named by rwkvctl.fs, are never taken as complete)
            superseded-step-…-YYYYmmdd-HHMMSS         after a resume from an earlier step: kept, never `latest`

Only names live here. What a file holds belongs to its writer: trainer state and RNG to run_state, the engine
and ZeRO files to the engines (DeepSpeed names the files inside deepspeed/state/), records to metrics, the
exported weights and their sidecar to io.checkpoint. Everything that reads or writes a run goes through
`RunDir`/`CheckpointDir`, so a change of layout is made here alone (tests/test_layering.py checks it).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from rwkvctl import fs
from rwkvctl.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")
_RNG_FILE = re.compile(r"^rng-rank(\d+)\.pt$")


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint directory (`step-N`, or its temporary twin while it is being written)."""

    path: Path
    step: int

    DEEPSPEED_TAG = "state"  # the tag DeepSpeed saves under: deepspeed/<tag>/

    def __str__(self) -> str:  # messages name the directory
        return str(self.path)

    @property
    def trainer_state(self) -> Path:
        return self.path / "trainer_state.json"

    @property
    def is_complete(self) -> bool:
        return self.trainer_state.is_file()

    def rng(self, rank: int) -> Path:
        return self.path / f"rng-rank{rank}.pt"

    def rng_files(self) -> dict[int, Path]:
        """The RNG files present, by rank."""
        found = {}
        if self.path.is_dir():
            for p in self.path.iterdir():
                m = _RNG_FILE.match(p.name)
                if m:
                    found[int(m.group(1))] = p
        return dict(sorted(found.items()))

    @property
    def engine_state(self) -> Path:
        """The per-parameter model + optimizer file (single strategy; also what add-gate writes for any run)."""
        return self.path / "engine_state.pt"

    @property
    def deepspeed_dir(self) -> Path:
        """The directory DeepSpeed's save_checkpoint writes into (with tag DEEPSPEED_TAG)."""
        return self.path / "deepspeed"

    @property
    def deepspeed_state(self) -> Path:
        """The ZeRO files themselves (deepspeed_dir / tag)."""
        return self.deepspeed_dir / self.DEEPSPEED_TAG

    @property
    def export(self) -> Path:
        """The exported RWKV-LM weights of this step (io.checkpoint names their sidecar)."""
        return self.path / f"rwkv-{self.step}.pth"


class RunDir:
    """A training run directory. Pure naming: nothing is read or written except by `create` and the listings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, run: RunDir | str | Path) -> RunDir:
        return run if isinstance(run, RunDir) else cls(run)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # --- files at the top of the run ---

    @property
    def config_file(self) -> Path:
        return self.path / "run_config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_superseded(self) -> Path:
        return self.path / "metrics.superseded.jsonl"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def branch_note(self) -> Path:
        return self.path / "branch.json"

    def create(self) -> None:
        """Make the directory and prove it writable before anything heavy starts (raises OSError)."""
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"ok")
        probe.unlink()

    # --- checkpoints ---

    @property
    def checkpoints_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> CheckpointDir:
        """Where the checkpoint of `step` lives (whether or not it exists)."""
        return CheckpointDir(self.checkpoints_root / _step_name(step), step)

    def temp_checkpoint(self, step: int) -> CheckpointDir:
        """Where the checkpoint of `step` is written before the rename that publishes it (rwkvctl.fs names temps)."""
        return CheckpointDir(fs.dir_temp(self.checkpoint(step).path), step)

    def checkpoints(self) -> dict[int, CheckpointDir]:
        """Complete checkpoints by step, oldest first (temporary, half-deleted and superseded ones are ignored)."""
        out: dict[int, CheckpointDir] = {}
        if self.checkpoints_root.is_dir():
            for d in self.checkpoints_root.iterdir():
                m = _STEP_DIR.match(d.name)
                if m:
                    ckpt = CheckpointDir(d, int(m.group(1)))
                    if ckpt.is_complete:
                        out[ckpt.step] = ckpt
        return dict(sorted(out.items()))

    def latest(self) -> CheckpointDir | None:
        found = self.checkpoints()
        return found[max(found)] if found else None

    def find(self, which: str | int = "latest") -> CheckpointDir | None:
        """`latest` -> the newest complete checkpoint or None; a step number -> that one or a CheckpointError."""
        if which == "latest":
            return self.latest()
        found, step = self.checkpoints(), int(which)
        if step not in found:
            have = ", ".join(str(s) for s in found) or "none"
            raise CheckpointError(f"{self.checkpoints_root}: no checkpoint for step {step} (available: {have})")
        return found[step]

    # Names a checkpoint is moved to on its way out: none matches `step-N`, so `checkpoints()` never lists them.

    def superseded_path(self, ckpt: CheckpointDir) -> Path:
        """Where a checkpoint beyond a resume point goes: kept for the user, out of `latest` and pruning."""
        return self.checkpoints_root / f"superseded-{ckpt.path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
