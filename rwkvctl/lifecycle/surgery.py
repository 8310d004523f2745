"""`rwkvctl add-gate` as a lifecycle stage: add the output gate to a run (or a checkpoint file) and carry on.

For a run, the chosen checkpoint (`latest` or an earlier step, as the RWKV-5 7B team did) becomes step N of a new
run directory: the weights gain the gate (rwkvctl.surgery), AdamW's moments and step counts follow their parameters
by name (the new parameters start fresh), and the data position, RNG states, learning-rate schedule and metrics up to
step N are carried over, so `rwkvctl train --resume` on the new run continues the same trajectory with the gate. The
original run is only read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.atomic import atomic_write_text
from rwkvctl.io.checkpoint import SUFFIXES, CheckpointMeta, load_checkpoint, save_checkpoint, sidecar_path
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.surgery import add_gate, added_gate_names
from rwkvctl.train.config import RunConfig
from rwkvctl.train.metrics import METRICS_FILE, truncate_after
from rwkvctl.train.optim import param_groups, remap_adamw_state
from rwkvctl.train.plain import STATE_FILE
from rwkvctl.train.run_state import CheckpointWriter, find_checkpoint, read_state, write_run_config


@dataclass
class GateResult:
    out: Path  # the new run dir, or the new checkpoint file
    step: int | None  # the run step it continues from (None for a file)
    added_params: int
    config: RunConfig | None  # the new run's config (None for a file)


def add_gate_to_checkpoint(src: str | Path, dst: str | Path, *, init: str = "rwkv-lm", seed: int = 0) -> GateResult:
    """Weights only: a gate-less checkpoint file -> a gated one (RWKV-LM names, loads in the `rwkv` package)."""
    src, dst = Path(src), Path(dst)
    if dst.suffix not in SUFFIXES:
        raise CheckpointError(f"{dst}: name the output .pth or .safetensors")
    state_dict, meta = load_checkpoint(src)
    new_sd, new_cfg = _gated(state_dict, meta.model, init, seed, source=src)
    extra = {**meta.extra, "surgery": {"add_gate": init, "seed": seed, "source": src.name}}
    save_checkpoint(dst, new_sd, replace(meta, model=new_cfg, extra=extra))
    return GateResult(dst, meta.step, _count(new_sd, new_cfg), None)


def add_gate_to_run(
    run_dir: str | Path, out_dir: str | Path, *, step: str | int = "latest", init: str = "rwkv-lm", seed: int = 0
) -> GateResult:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = find_checkpoint(run_dir, step)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoints to start from (is it a `rwkvctl train` run dir?)")
    if out_dir.resolve() == run_dir.resolve():
        raise CheckpointError(f"{out_dir}: choose a new directory; the original run is kept as it is")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new --out")
    saved = read_state(ckpt)
    if not saved.engine.startswith("single"):
        raise CheckpointError(
            f"{ckpt}: written by the {saved.engine} strategy; add-gate carries optimizer state over for the single "
            "strategy only so far (DeepSpeed ZeRO shards are flat per-rank buffers)"
        )
    cfg = RunConfig.from_dict(saved.config, source=str(ckpt))
    try:
        engine_state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        weights, optimizer = engine_state["model"], engine_state["optimizer"]
    except (OSError, RuntimeError, KeyError, EOFError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable training state ({str(e).splitlines()[0]})") from None
    new_sd, new_model_cfg = _gated(weights, cfg.model, init, seed, source=ckpt)
    new_cfg = replace(cfg, run_dir=str(out_dir), model=new_model_cfg)
    try:
        new_optimizer = remap_adamw_state(optimizer, _groups(cfg), _groups(new_cfg))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: {e}; was it written by this version of rwkvctl?") from None

    writer = CheckpointWriter(out_dir, cfg.train.keep_last)
    tmp = writer.begin(saved.step)
    try:
        torch.save({"model": new_sd, "optimizer": new_optimizer}, tmp / STATE_FILE)
        for rng in ckpt.glob("rng-rank*.pt"):
            shutil.copy2(rng, tmp / rng.name)
        meta = CheckpointMeta(model=new_model_cfg, step=saved.step, tokens=saved.tokens,
                              tokenizer=_exported_tokenizer(ckpt, saved.step),
                              extra={"run_dir": str(out_dir), "engine": saved.engine,
                                     "surgery": {"add_gate": init, "seed": seed, "source": str(ckpt)}})  # fmt: skip
        save_checkpoint(tmp / f"rwkv-{saved.step}.pth", new_sd, meta)
        state = replace(saved, config=new_cfg.to_dict())
        writer.commit(saved.step, state)
    except BaseException:
        writer.abort(saved.step)
        raise
    write_run_config(out_dir, new_cfg.to_yaml())
    if (run_dir / METRICS_FILE).is_file():  # the loss history up to the branch point, for plots
        shutil.copy2(run_dir / METRICS_FILE, out_dir / METRICS_FILE)
        truncate_after(out_dir, saved.step)
        (out_dir / "metrics.superseded.jsonl").unlink(missing_ok=True)  # later steps belong to the other run
    record = {"add_gate": init, "seed": seed, "from_run": str(run_dir), "from_step": saved.step}
    atomic_write_text(out_dir / "surgery.json", json.dumps(record, indent=1) + "\n")
    return GateResult(out_dir, saved.step, _count(new_sd, new_model_cfg), new_cfg)


def _gated(
    weights: dict[str, Tensor], cfg: ModelConfig, init: str, seed: int, *, source: Path
) -> tuple[dict[str, Tensor], ModelConfig]:
    try:
        return add_gate(weights, cfg, init=init, seed=seed)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _groups(cfg: RunConfig) -> list[dict]:
    with torch.device("meta"):  # names and grouping only: no memory for the weights
        model = RWKV5(cfg.model)
    return param_groups(model, cfg.optim)


def _count(state_dict: dict[str, Tensor], cfg: ModelConfig) -> int:
    return sum(state_dict[name].numel() for name in added_gate_names(cfg))


def _exported_tokenizer(ckpt: Path, step: int) -> str:
    """The tokenizer recorded in the sidecar of the run's own export of this step (the dataset's), else World."""
    try:
        name = json.loads(sidecar_path(ckpt / f"rwkv-{step}.pth").read_text()).get("tokenizer", "world")
    except (OSError, ValueError, AttributeError):
        return "world"
    return name if isinstance(name, str) else "world"
