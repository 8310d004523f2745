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

from rwkvctl.data.loader import TrainWindows, ValWindows
from rwkvctl.errors import TrainingError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.train.config import RunConfig
from rwkvctl.train.engine import Engine
from rwkvctl.train.metrics import MetricsLog, WandbSink
from rwkvctl.train.run_state import CheckpointWriter, TrainerState, list_checkpoints
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


def save_step(ctx: LoopContext, state: TrainerState) -> tuple[Path, Path]:
    """A complete resumable checkpoint + exported .pth, atomically; raises TrainingError on a write failure
    (the previous checkpoint is left as it was)."""
    e, step = ctx.engine, state.step
    tmp = ctx.writer.temp_dir(step)
    export_name = f"rwkv-{step}.pth"
    error = ""
    try:
        if e.is_main:
            ctx.writer.begin(step)
    except OSError as exc:
        error = f"{exc.strerror or exc}"
    if e.all_reduce_sum([1.0 if error else 0.0])[0] == 0:
        try:
            weights = e.export_state_dict()  # every rank (ZeRO-3 gathers)
            e.save(tmp)
            ctx.writer.write_rank_files(tmp, e.rank)
            if e.is_main:
                meta = CheckpointMeta(model=ctx.cfg.model, tokenizer=ctx.tokenizer, step=step, tokens=state.tokens,
                                      init=ctx.init_scheme,
                                      extra={"run_dir": ctx.cfg.run_dir, "engine": e.name})
                save_checkpoint(tmp / export_name, weights, meta)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            error = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    failed = e.all_reduce_sum([1.0 if error else 0.0])[0] > 0
    final: Path | None = None
    if not failed and e.is_main:
        try:
            final = ctx.writer.commit(step, state)
        except OSError as exc:
            error = f"{exc.strerror or exc}"
    failed = e.all_reduce_sum([1.0 if error else 0.0])[0] > 0
    if failed:
        if e.is_main:
            ctx.writer.abort(step)
        previous = list_checkpoints(Path(ctx.cfg.run_dir))
        last = f"{previous[max(previous)]}" if previous else "none yet"
        raise TrainingError(f"cannot write the checkpoint for step {step} in {ctx.writer.root} "
                            f"({error or 'failed on another rank'}); last good checkpoint: {last}")
    path = final or ctx.writer.root / f"step-{step:08d}"
    return path, path / export_name


def fit(ctx: LoopContext, state: TrainerState, *, resumed: bool) -> FitOutcome:
    """Train from `state` until the plan ends, a stop is requested, or stop_after_steps is reached."""
    cfg, e = ctx.cfg, ctx.engine
    t, o = cfg.train, cfg.optim
    samples_per_step = cfg.samples_per_step(e.world_size)
    out = FitOutcome(state=state)
    consecutive_bad = 0
    mark_resume = resumed  # on the first *logged* record after the resume (log_every may skip the first step)
    while state.step < ctx.total_steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, lr_init=o.lr_init, lr_final=o.lr_final, warmup_steps=o.warmup_steps,
                    total_steps=ctx.total_steps)
        loss_sum, bad = 0.0, 0
        for a in range(t.accum):
            batch = ctx.windows.micro_batch(state.samples_seen, a, t.micro_bsz, e.rank, e.world_size)
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
        step_loss = loss_sum / (t.accum * e.world_size - bad_total) if bad_total < t.accum * e.world_size else math.nan
        if skipped:
            consecutive_bad += 1
            state.nan_skips += 1
            what = f"non-finite loss in {int(bad_total)} micro-batch(es)" if bad_total else "non-finite gradient norm"
            if t.nan_policy == "stop" or consecutive_bad > t.max_nan_skips:
                why = "nan_policy=stop" if t.nan_policy == "stop" else f"{consecutive_bad} consecutive skipped steps"
                raise TrainingError(f"step {state.step + 1}: {what} ({why}); lower optim.lr_init or check the data "
                                    f"near sample {state.samples_seen}; resume from the last checkpoint with --resume")
            _emit(ctx, TrainProgress("message", state.step + 1, ctx.total_steps, state.tokens,
                                     message=f"step {state.step + 1}: {what}, update skipped"))
        else:
            consecutive_bad = 0
        state.step += 1
        state.samples_seen += samples_per_step
        state.tokens = state.samples_seen * cfg.data.ctx_len
        dt = time.perf_counter() - t0
        state.elapsed_s += dt
        out.step_times.append(dt)
        out.steps_this_run += 1
        out.last_loss = step_loss
        tps = samples_per_step * cfg.data.ctx_len / dt
        recent = out.step_times[-20:]
        eta = (ctx.total_steps - state.step) * sum(recent) / len(recent)
        if state.step % t.log_every == 0 or state.step == ctx.total_steps:
            _record(ctx, {"step": state.step, "tokens": state.tokens, "loss": step_loss, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": tps, "elapsed": state.elapsed_s,
                          "resumed": mark_resume, "skipped": skipped})
            mark_resume = False
        _emit(ctx, TrainProgress("step", state.step, ctx.total_steps, state.tokens, loss=step_loss, lr=lr,
                                 grad_norm=grad_norm, tokens_per_s=tps, elapsed_s=state.elapsed_s, eta_s=eta,
                                 skipped=skipped))
        if ctx.val is not None and cfg.data.val_every and state.step % cfg.data.val_every == 0:
            out.last_val_loss = evaluate(ctx)
            _record(ctx, {"step": state.step, "tokens": state.tokens, "val_loss": out.last_val_loss,
                          "elapsed": state.elapsed_s})
            _emit(ctx, TrainProgress("val", state.step, ctx.total_steps, state.tokens, val_loss=out.last_val_loss,
                                     elapsed_s=state.elapsed_s))
        stopping = stop_total > 0 or (t.stop_after_steps and out.steps_this_run >= t.stop_after_steps)
        if state.step % t.save_every == 0 or state.step == ctx.total_steps or stopping:
            out.last_checkpoint, out.export_path = save_step(ctx, state)
            _emit(ctx, TrainProgress("checkpoint", state.step, ctx.total_steps, state.tokens,
                                     elapsed_s=state.elapsed_s, path=out.last_checkpoint))
        if stopping:
            out.interrupted = stop_total > 0
            break
    return out
