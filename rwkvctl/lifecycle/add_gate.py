"""`rwkvctl add-gate` as a lifecycle stage: add the output gate to a run (or a checkpoint file) and carry on.

For a run (single strategy, or DeepSpeed ZeRO-1/2, whose shards are gathered parameter by parameter), the chosen
checkpoint (`latest` or an earlier step, as the RWKV-5 7B team did) becomes step N of a new run directory: the
weights gain the gate (rwkvctl.surgery), AdamW's moments and step counts follow their parameters by name (the new
parameters start fresh), and the data position, RNG states, learning-rate schedule and metrics up to step N are
carried over, so `rwkvctl train --resume` on the new run continues the same trajectory with the gate. The original
run is only read. The new step N holds the per-parameter state file, which both strategies load.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from rwkvctl.arch import arch_of
from rwkvctl.config import ModelConfig
from rwkvctl.dir_lock import is_lock_file, writer_lock
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.fs import atomic_write_text
from rwkvctl.io.checkpoint import SUFFIXES, CheckpointMeta, save_checkpoint, sidecar_path
from rwkvctl.model.registry import build_model
from rwkvctl.names import canonical
from rwkvctl.quant.format import load_checkpoint_expanded
from rwkvctl.surgery import GATE_INITS, add_gate, added_gate_names
from rwkvctl.train.config import RunConfig
from rwkvctl.train.engine import load_deepspeed_engine
from rwkvctl.train.metrics import truncate_after
from rwkvctl.train.optim import param_groups, remap_adamw_state
from rwkvctl.train.run_dir import CheckpointDir, RunDir
from rwkvctl.train.run_state import CheckpointWriter, read_state, write_run_config


@dataclass
class GateResult:
    out: Path  # the new run dir, or the new checkpoint file
    step: int | None  # the run step it continues from (None for a file)
    added_params: int
    config: RunConfig | None  # the new run's config (None for a file)


def add_gate_to_checkpoint(
    src: str | Path, dst: str | Path, *, init: str = "rwkv-lm-2024", seed: int = 0
) -> GateResult:
    """Weights only: a gate-less checkpoint file -> a gated one (RWKV-LM names, loads in the `rwkv` package)."""
    src, dst = Path(src), Path(dst)
    init = canonical("init", init).name  # recorded in the new file's metadata: the one spelling
    if dst.suffix not in SUFFIXES:
        raise CheckpointError(f"{dst}: name the output .pth or .safetensors")
    with writer_lock(dst.parent, "rwkvctl add-gate", part=dst.name):
        state_dict, meta = load_checkpoint_expanded(src)  # a quantized source is expanded
        new_sd, new_cfg = _gated(state_dict, meta.model, init, seed, source=src)
        # written in full precision: a quantized source's quantization record no longer applies
        kept = {k: v for k, v in meta.extra.items() if k != "quantization"}
        extra = {**kept, "surgery": {"add_gate": init, "seed": seed, "source": src.name}}
        save_checkpoint(dst, new_sd, replace(meta, model=new_cfg, extra=extra))
    return GateResult(dst, meta.step, _count(new_cfg), None)


def add_gate_to_run(
    run_dir: str | Path, out_dir: str | Path, *, step: str | int = "latest", init: str = "rwkv-lm-2024", seed: int = 0
) -> GateResult:
    init = canonical("init", init).name  # the old spelling rwkv-lm too, for one release
    if init not in GATE_INITS:  # before reading a possibly large training state
        raise CheckpointError(f"unknown gate init {init!r}; choose one of {', '.join(GATE_INITS)}")

    def gate(weights: dict[str, Tensor], cfg: ModelConfig, source: Path) -> tuple[dict[str, Tensor], ModelConfig]:
        return _gated(weights, cfg, init, seed, source=source)

    result = branch_run(run_dir, out_dir, step=step, transform=gate, note={"add_gate": init, "seed": seed})
    assert result.config is not None
    return replace(result, added_params=_count(result.config.model))


Transform = Callable[[dict[str, Tensor], ModelConfig, Path], tuple[dict[str, Tensor], ModelConfig]]


def branch_run(
    run_dir: str | Path, out_dir: str | Path, *, step: str | int = "latest", transform: Transform | None = None,
    note: dict | None = None,
) -> GateResult:
    """Start a new run directory at a checkpoint of `run_dir`, its model changed by `transform` (None: unchanged),
    with the optimizer state re-addressed by parameter name and written in the per-parameter form both strategies
    load (for a ZeRO run this also un-shards it). See the module docstring."""
    src, out = RunDir(run_dir), RunDir(out_dir)
    ckpt = src.find(step)
    if ckpt is None:
        raise CheckpointError(f"{src}: no checkpoints to start from (is it a `rwkvctl train` run dir?)")
    if out.path.resolve() == src.path.resolve():
        raise CheckpointError(f"{out}: choose a new directory; the original run is kept as it is")
    _check_empty(out)  # before a lock file lands in a directory that is not ours
    with writer_lock(out.path, "rwkvctl add-gate"):
        _check_empty(out)  # again, held: another add-gate may have filled it meanwhile
        return _write_branch(src, out, ckpt, transform, note)


def _check_empty(out: RunDir) -> None:
    if _interrupted_branch(out):
        return  # what a killed add-gate left (no checkpoint, so nothing trained): this one writes it again
    if out.path.exists() and any(not is_lock_file(p) for p in out.path.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --out")


def _interrupted_branch(out: RunDir) -> bool:
    """An add-gate killed before its last step: the branch's own files (branch.json) without the checkpoint, which
    is committed last (`train` refuses such a directory and says to rerun add-gate)."""
    return out.branch_note.is_file() and not out.checkpoints()


def _write_branch(src: RunDir, out: RunDir, ckpt: CheckpointDir, transform: Transform | None,
                  note: dict | None) -> GateResult:
    saved = read_state(ckpt)
    cfg = RunConfig.from_dict(saved.config, source=str(ckpt))
    weights, optimizer = training_state(ckpt, saved.engine, cfg)
    new_sd, new_model_cfg = transform(weights, cfg.model, ckpt.path) if transform else (weights, cfg.model)
    new_cfg = replace(cfg, run_dir=str(out.path), model=new_model_cfg)
    try:
        new_optimizer = remap_adamw_state(optimizer, _groups(cfg), _groups(new_cfg))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: {e}; was it written by this version of rwkvctl?") from None
    note = {**(note or {}), "from_run": str(src), "from_step": saved.step}

    writer = CheckpointWriter(out, cfg.train.keep_last)
    writer.remove_stale_temps()  # an earlier, killed attempt's (perhaps of another step): this one owns the dir
    tmp = writer.begin(saved.step)
    try:
        torch.save({"model": new_sd, "optimizer": new_optimizer}, tmp.engine_state)
        for rank, rng in ckpt.rng_files().items():
            shutil.copy2(rng, tmp.rng(rank))
        meta = CheckpointMeta(model=new_model_cfg, step=saved.step, tokens=saved.position.tokens,
                              tokenizer=_exported_tokenizer(ckpt),
                              extra={"run_dir": str(out), "engine": saved.engine, "branch": note})  # fmt: skip
        save_checkpoint(tmp.export, new_sd, meta)
        # branch.json first, the run's own files next and the checkpoint last, so the checkpoint's presence means
        # the branch is complete: killed before it, the directory holds branch.json without a checkpoint, which
        # `train` refuses and add-gate redoes (a run_config.yaml without branch.json would look like a fresh run).
        atomic_write_text(out.branch_note, json.dumps(note, indent=1) + "\n")
        write_run_config(out, new_cfg.to_yaml())
        out.metrics_superseded.unlink(missing_ok=True)  # later steps belong to the other run
        if src.metrics.is_file():  # the loss history up to the branch point, for plots
            shutil.copy2(src.metrics, out.metrics)
            truncate_after(out, saved.step)
            out.metrics_superseded.unlink(missing_ok=True)
        else:  # an interrupted earlier attempt's copy, from another source
            out.metrics.unlink(missing_ok=True)
        # The step is stored per parameter (the single strategy's file): any strategy and rank count may resume it.
        writer.commit(saved.step, replace(saved, config=new_cfg.to_dict(), engine="single"))
    except BaseException:
        writer.abort(saved.step)
        raise
    return GateResult(out.path, saved.step, 0, new_cfg)


def training_state(ckpt: CheckpointDir, engine: str, cfg: RunConfig) -> tuple[dict[str, Tensor], dict]:
    """A checkpoint's weights and AdamW state in the single strategy's per-parameter form, whoever wrote it: the
    single strategy's file as is, or a ZeRO-1/2 checkpoint's shards gathered parameter by parameter."""
    if engine.startswith("deepspeed"):
        if engine == "deepspeed-zero3":
            raise CheckpointError(f"{ckpt}: ZeRO-3 checkpoints cannot be re-addressed yet (stages 1 and 2 can)")
        expected = arch_of(cfg.model).param_shapes(cfg.model)  # the mapping must name exactly these parameters
        weights, moments, step = load_deepspeed_engine().read_zero_checkpoint(ckpt, expected)  # imports deepspeed
        o = cfg.optim
        dummy = torch.nn.Parameter(torch.zeros(1))
        defaults = torch.optim.AdamW([dummy], lr=o.lr_init, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                     weight_decay=0.0).state_dict()["param_groups"][0]  # fmt: skip
        state, groups, index = {}, [], 0
        for group in _groups(cfg):
            ids = list(range(index, index + len(group["names"])))
            for i, name in zip(ids, group["names"], strict=True):
                state[i] = {"step": torch.tensor(step), **moments[name]}
            settings = {k: v for k, v in group.items() if k not in ("params", "names")}
            groups.append({**defaults, **settings, "params": ids})
            index += len(ids)
        return weights, {"state": state, "param_groups": groups}
    try:
        engine_state = torch.load(ckpt.engine_state, map_location="cpu", weights_only=True)
        return engine_state["model"], engine_state["optimizer"]
    except (OSError, RuntimeError, KeyError, EOFError) as e:
        raise CheckpointError(f"{ckpt.engine_state}: unreadable training state ({str(e).splitlines()[0]})") from None


def _gated(
    weights: dict[str, Tensor], cfg: ModelConfig, init: str, seed: int, *, source: Path
) -> tuple[dict[str, Tensor], ModelConfig]:
    try:
        return add_gate(weights, cfg, init=init, seed=seed)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _groups(cfg: RunConfig) -> list[dict]:
    with torch.device("meta"):  # names and grouping only: no memory for the weights
        model = build_model(cfg.model)
    return param_groups(model, cfg.optim)


def _count(cfg: ModelConfig) -> int:
    shapes = arch_of(cfg).param_shapes(cfg)
    return sum(math.prod(shapes[name]) for name in added_gate_names(cfg))


def _exported_tokenizer(ckpt: CheckpointDir) -> str:
    """The tokenizer recorded in the sidecar of the run's own export of this step (the dataset's), else World."""
    try:
        name = json.loads(sidecar_path(ckpt.export).read_text()).get("tokenizer", "world")
    except (OSError, ValueError, AttributeError):
        return "world"
    return name if isinstance(name, str) else "world"
