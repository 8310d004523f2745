"""The one training loop: schedule, accumulation, NaN policy, validation, metrics and checkpoints.

It drives an `Engine` (single process or DeepSpeed ranks) and never touches devices or collectives
itself, so the same code is what the CPU tests exercise and what runs on a GPU cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rwkvctl.data.loader import DataPosition, TrainWindows, ValWindows
from rwkvctl.errors import TrainingError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.train.config import RunConfig
from rwkvctl.train.engine import Engine
from rwkvctl.train.metrics import MetricsLog, WandbSink
from rwkvctl.train.run_dir import CheckpointDir
from rwkvctl.train.run_state import CheckpointWriter, TrainerState
from rwkvctl.train.schedule import lr_at


@dataclass
class TrainProgress:
    """What the loop reports to `on_progress` (the CLI renders it; rank 0 only)."""

    kind: str  # "step" | "val" | "checkpoint" | "message"
    step: int
    total_steps: int
    tokens: int
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    val_loss: float | None = None
    skipped: bool = False
    path: Path | None = None
    message: str = ""


@dataclass
class LoopContext:
    engine: Engine
    cfg: RunConfig
    windows: TrainWindows
    val: ValWindows | None
    writer: CheckpointWriter
    total_steps: int
    metrics: MetricsLog | None = None
    wandb: WandbSink | None = None
    on_progress: Callable[[TrainProgress], None] | None = None
    stop_requested: Callable[[], bool] = lambda: False
    init_scheme: str | None = None
    tokenizer: str = "world"
    """The tokenizer the data was made with (the dataset manifest's; RWKV-LM binidx data: world)."""


@dataclass
class FitOutcome:
    state: TrainerState
    last_loss: float | None = None
    last_val_loss: float | None = None
    last_checkpoint: Path | None = None
    export_path: Path | None = None
    interrupted: bool = False
    steps_this_run: int = 0
    step_times: list[float] = field(default_factory=list)


def _emit(ctx: LoopContext, event: TrainProgress) -> None:
    if ctx.on_progress is not None and ctx.engine.is_main:
        ctx.on_progress(event)


def _record(ctx: LoopContext, record: dict) -> None:
    if ctx.engine.is_main:
        if ctx.metrics is not None:
            ctx.metrics.write(record)
        if ctx.wandb is not None:
            ctx.wandb.write(record)


def evaluate(ctx: LoopContext) -> float | None:
    """Mean loss over the fixed validation windows (all ranks take part)."""
    if ctx.val is None:
        return None
    e = ctx.engine
    batches = ctx.val.batches(ctx.cfg.train.micro_bsz, e.rank, e.world_size)
    local = sum(e.eval_loss(b) * b.x.shape[0] for b in batches)
    total, count = e.all_reduce_sum([local, float(sum(b.x.shape[0] for b in batches))])
    return total / count if count else None


def export_weights(weights: dict[str, Tensor], cfg: RunConfig) -> dict[str, Tensor]:
    """The exported .pth in the configured dtype (auto: the training precision, as RWKV-LM saves bf16 runs)."""
    name = cfg.train.precision if cfg.train.export_dtype == "auto" else cfg.train.export_dtype
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}


def save_step(ctx: LoopContext, state: TrainerState) -> CheckpointDir:
    """A complete resumable checkpoint + exported .pth, atomically; raises TrainingError on a write failure
    (the previous checkpoint is left as it was)."""
    e, step = ctx.engine, state.step
    tmp = ctx.writer.temp(step)
    error = ""
    try:
        if e.is_main:
            ctx.writer.begin(step)
    except OSError as exc:
        error = f"{exc.strerror or exc}"
    if e.all_reduce_sum([1.0 if error else 0.0])[0] == 0:
        try:
            weights = export_weights(e.export_state_dict(), ctx.cfg)  # every rank (ZeRO-3 gathers)
            e.save(tmp)
            ctx.writer.write_rank_files(tmp, e.rank)
            if e.is_main:
                meta = CheckpointMeta(model=ctx.cfg.model, tokenizer=ctx.tokenizer, step=step,
                                      tokens=state.position.tokens, init=ctx.init_scheme,
                                      extra={"run_dir": ctx.cfg.run_dir, "engine": e.name})
                save_checkpoint(tmp.export, weights, meta)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            error = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    failed = e.all_reduce_sum([1.0 if error else 0.0])[0] > 0
    final: CheckpointDir | None = None
    if not failed and e.is_main:
        try:
            final = ctx.writer.commit(step, state)
        except OSError as exc:
            error = f"{exc.strerror or exc}"
    failed = e.all_reduce_sum([1.0 if error else 0.0])[0] > 0
    if failed:
        if e.is_main:
            ctx.writer.abort(step)
        last = ctx.writer.run.latest()
        raise TrainingError(f"cannot write the checkpoint for step {step} in {ctx.writer.root} "
                            f"({error or 'failed on another rank'}); last good checkpoint: {last or 'none yet'}")
    return final or ctx.writer.run.checkpoint(step)


@dataclass
class _StepResult:
    """One optimizer step as all ranks agreed on it."""

    lr: float
    loss: float
    """Mean over the finite micro-batches of all ranks (NaN if none was finite)."""
    grad_norm: float
    """Before clipping; NaN when the update was skipped for a non-finite loss."""
    bad_micro: int
    """Micro-batches with a non-finite loss, over all ranks."""
    skipped: bool
    stop: bool
    """Some rank was asked to stop (a signal): checkpoint after this step and return."""


def _train_step(ctx: LoopContext, state: TrainerState) -> _StepResult:
    """Accumulate the step's micro-batches, agree across ranks, then apply the update (or skip it)."""
    cfg, e = ctx.cfg, ctx.engine
    t, o = cfg.train, cfg.optim
    lr = lr_at(state.step, lr_init=o.lr_init, lr_final=o.lr_final, warmup_steps=o.warmup_steps,
                total_steps=ctx.total_steps)
    loss_sum, bad = 0.0, 0
    for a in range(t.accum):
        batch = ctx.windows.micro_batch(state.position.samples_seen, a, t.micro_bsz, e.rank, e.world_size)
        loss = e.micro_step(batch, t.accum)
        if math.isfinite(loss):
            loss_sum += loss
        else:
            bad += 1
    stop_flag = 1.0 if ctx.stop_requested() else 0.0
    loss_sum, bad_total, stop_total = e.all_reduce_sum([loss_sum, float(bad), stop_flag])
    skipped = bad_total > 0
    grad_norm = float("nan")
    if skipped:
        e.skip_step()
    else:
        grad_norm = e.optimizer_step(lr)
        skipped = not math.isfinite(grad_norm)  # the engine refused to apply a non-finite gradient
    micro_total = t.accum * e.world_size
    step_loss = loss_sum / (micro_total - bad_total) if bad_total < micro_total else math.nan
    return _StepResult(lr=lr, loss=step_loss, grad_norm=grad_norm, bad_micro=int(bad_total), skipped=skipped,
                      stop=stop_total > 0)


def _apply_nan_policy(ctx: LoopContext, state: TrainerState, step: _StepResult, consecutive_bad: int) -> int:
    """Count a skipped step, or stop the run when the policy says so. Returns the new run of skipped steps."""
    if not step.skipped:
        return 0
    t = ctx.cfg.train
    consecutive_bad += 1
    state.nan_skips += 1
    what = f"non-finite loss in {step.bad_micro} micro-batch(es)" if step.bad_micro else "non-finite gradient norm"
    if t.nan_policy == "stop" or consecutive_bad > t.max_nan_skips:
        why = "nan_policy=stop" if t.nan_policy == "stop" else f"{consecutive_bad} consecutive skipped steps"
        raise TrainingError(f"step {state.step + 1}: {what} ({why}); lower optim.lr_init or check the data "
                            f"near sample {state.position.samples_seen}; resume from the last checkpoint with --resume")
    _emit(ctx, TrainProgress("message", state.step + 1, ctx.total_steps, state.position.tokens,
                             message=f"step {state.step + 1}: {what}, update skipped"))
    return consecutive_bad


def _advance(ctx: LoopContext, state: TrainerState, out: FitOutcome, step: _StepResult, t0: float) -> float:
    """Move the trainer state past the step (data position, tokens, time); returns the step's wall time."""
    samples_per_step = ctx.cfg.samples_per_step(ctx.engine.world_size)
    state.step += 1
    state.position = DataPosition.at(state.position.samples_seen + samples_per_step, ctx.cfg.data.ctx_len)
    dt = time.perf_counter() - t0
    state.elapsed_s += dt
    out.step_times.append(dt)
    out.steps_this_run += 1
    out.last_loss = step.loss
    return dt


def _report_step(ctx: LoopContext, state: TrainerState, out: FitOutcome, step: _StepResult, dt: float,
                 mark_resume: bool) -> bool:
    """Metrics record (every log_every steps and the last) and progress event; returns whether a record was
    written (the first one after a resume carries the resume mark)."""
    cfg = ctx.cfg
    tps = cfg.samples_per_step(ctx.engine.world_size) * cfg.data.ctx_len / dt
    recent = out.step_times[-20:]
    eta = (ctx.total_steps - state.step) * sum(recent) / len(recent)
    logged = state.step % cfg.train.log_every == 0 or state.step == ctx.total_steps
    if logged:
        _record(ctx, {"step": state.step, "tokens": state.position.tokens, "loss": step.loss, "lr": step.lr,
                      "grad_norm": step.grad_norm, "tokens_per_s": tps, "elapsed": state.elapsed_s,
                      "resumed": mark_resume, "skipped": step.skipped})
    _emit(ctx, TrainProgress("step", state.step, ctx.total_steps, state.position.tokens, loss=step.loss, lr=step.lr,
                             grad_norm=step.grad_norm, tokens_per_s=tps, elapsed_s=state.elapsed_s, eta_s=eta,
                             skipped=step.skipped))
    return logged


def _validate_if_due(ctx: LoopContext, state: TrainerState, out: FitOutcome) -> None:
    if ctx.val is None or not ctx.cfg.data.val_every or state.step % ctx.cfg.data.val_every:
        return
    out.last_val_loss = evaluate(ctx)
    _record(ctx, {"step": state.step, "tokens": state.position.tokens, "val_loss": out.last_val_loss,
                  "elapsed": state.elapsed_s})
    _emit(ctx, TrainProgress("val", state.step, ctx.total_steps, state.position.tokens, val_loss=out.last_val_loss,
                             elapsed_s=state.elapsed_s))


def _checkpoint(ctx: LoopContext, state: TrainerState, out: FitOutcome) -> None:
    ckpt = save_step(ctx, state)
    out.last_checkpoint, out.export_path = ckpt.path, ckpt.export
    _emit(ctx, TrainProgress("checkpoint", state.step, ctx.total_steps, state.position.tokens,
                             elapsed_s=state.elapsed_s, path=out.last_checkpoint))


def fit(ctx: LoopContext, state: TrainerState, *, resumed: bool) -> FitOutcome:
    """Train from `state` until the plan ends, a stop is requested, or stop_after_steps is reached."""
    t = ctx.cfg.train
    out = FitOutcome(state=state)
    consecutive_bad = 0
    mark_resume = resumed  # on the first *logged* record after the resume (log_every may skip the first step)
    while state.step < ctx.total_steps:
        t0 = time.perf_counter()
        step = _train_step(ctx, state)
        consecutive_bad = _apply_nan_policy(ctx, state, step, consecutive_bad)
        dt = _advance(ctx, state, out, step, t0)
        if _report_step(ctx, state, out, step, dt, mark_resume):
            mark_resume = False
        _validate_if_due(ctx, state, out)
        stopping = step.stop or (t.stop_after_steps and out.steps_this_run >= t.stop_after_steps)
        if state.step % t.save_every == 0 or state.step == ctx.total_steps or stopping:
            _checkpoint(ctx, state, out)
        if stopping:
            out.interrupted = step.stop
            break
    return out
