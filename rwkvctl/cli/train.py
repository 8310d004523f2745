"""`rwkvctl train`: pre-train or finetune RWKV-5.2 with a live display, exact resume and DeepSpeed ZeRO."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rwkvctl.cli._common import app, console, handles_errors, human


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


class LiveDisplay:
    """Progress bar + one line of the latest numbers; messages scroll above it.

    The live region starts with the first progress event, i.e. after train() has validated the config,
    the run dir and the data, so an early error is printed alone rather than glued to an empty bar.
    """

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=None)
        self.latest: dict[str, str] = {}
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
        self.started = False

    def stop(self) -> None:
        if self.started:
            self.live.stop()
            self.started = False
            console.line()  # the live display leaves its last line open when stdout is not a terminal

    def _render(self) -> Group:
        table = Table(box=None, show_header=True, header_style="bold cyan", pad_edge=False)
        for key in ("loss", "val", "lr", "grad-norm", "tokens/s", "tokens", "ETA"):
            table.add_column(key, justify="right")
        table.add_row(
            *(self.latest.get(k, "-") for k in ("loss", "val", "lr", "grad-norm", "tokens/s", "tokens", "ETA"))
        )
        return Group(self.progress, table)

    def __call__(self, event: Any) -> None:
        if not self.started:
            self.live.start()
            self.started = True
        if event.kind == "message":
            self.live.console.print(f"[yellow]{escape(event.message)}[/]")
        elif event.kind == "checkpoint":
            self.live.console.print(f"step {event.step}: checkpoint [bold]{escape(str(event.path))}[/]")
        elif event.kind == "val":
            self.latest["val"] = _fmt(event.val_loss, ".4f")
            self.live.console.print(f"step {event.step}: val loss [bold]{_fmt(event.val_loss, '.4f')}[/]")
        self.progress.update(self.task, total=event.total_steps, completed=event.step)
        if event.kind == "step":
            self.latest.update(
                {
                    "loss": _fmt(event.loss, ".4f") + (" [red](skipped)[/]" if event.skipped else ""),
                    "lr": _fmt(event.lr, ".3g"),
                    "grad-norm": _fmt(event.grad_norm, ".3g"),
                    "tokens/s": human(event.tokens_per_s or 0),
                    "tokens": human(event.tokens),
                    "ETA": _duration(event.eta_s),
                }
            )
        self.live.update(self._render())


def _summary(result: Any) -> Table:
    table = Table(title="training summary", show_header=False, title_justify="left")
    rows = [
        (
            "steps",
            f"{result.step} / {result.total_steps} ({result.steps_this_run} this run"
            + (f", resumed from {result.resumed_from})" if result.resumed_from is not None else ")"),
        ),
        ("tokens", f"{result.tokens:,}"),
        ("final loss", _fmt(result.final_loss, ".4f")),
        ("val loss", _fmt(result.val_loss, ".4f")),
        (
            "throughput",
            f"{human(result.tokens_per_s)} tokens/s ({result.engine} x{result.world_size}, {escape(result.device)})",
        ),
        ("MFU", f"{result.mfu:.1%}" if result.mfu is not None else "n/a (no known peak; --peak-tflops)"),
        ("peak memory", human(result.peak_memory_bytes, "B")),
        ("wall time", _duration(result.elapsed_s)),
        ("NaN-skipped steps", str(result.nan_skips)),
        ("checkpoint", escape(str(result.last_checkpoint or "-"))),
        ("exported weights", escape(str(result.export_path or "-"))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _parse_sets(items: list[str]) -> dict[str, str]:
    from rwkvctl.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. optim.weight_decay=0.01")
        out[key.strip()] = value.strip()
    return out


@app.command("train")
@handles_errors
def train_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML (see examples/).")] = None,
    run_dir: Annotated[
        str | None, typer.Option(help="Run directory: checkpoints, metrics.jsonl, run_config.yaml.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset: prepare's output dir/manifest, or a binidx prefix.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Model size preset (tiny, 0.1b, 0.4b, 1.5b, 3b, 7b).")] = None,
    ctx_len: Annotated[int | None, typer.Option(help="Tokens per training window.")] = None,
    micro_bsz: Annotated[int | None, typer.Option(help="Sequences per micro-batch per process.")] = None,
    accum: Annotated[int | None, typer.Option(help="Micro-batches accumulated per optimizer step.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Planned optimizer steps (the lr schedule spans them).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Planned tokens (alternative to --max-steps).")] = None,
    lr_init: Annotated[float | None, typer.Option(help="Peak learning rate (after warm-up).")] = None,
    lr_final: Annotated[float | None, typer.Option(help="Final learning rate of the cosine decay.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (never repeated on resume).")] = None,
    strategy: Annotated[str | None, typer.Option(help="single, or deepspeed (launch with deepspeed/torchrun).")] = None,
    zero_stage: Annotated[int | None, typer.Option(help="DeepSpeed ZeRO stage 1, 2 or 3.")] = None,
    offload: Annotated[
        bool | None, typer.Option("--offload/--no-offload", help="DeepSpeed CPU optimizer offload.")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 or bf16.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto (single strategy).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, data order and RNGs.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (and at the end).")] = None,
    keep_last: Annotated[int | None, typer.Option(help="Keep the newest K checkpoints.")] = None,
    val_every: Annotated[int | None, typer.Option(help="Validation loss every N steps (0: off).")] = None,
    grad_cp: Annotated[bool | None, typer.Option("--grad-cp/--no-grad-cp", help="Gradient checkpointing.")] = None,
    segment_len: Annotated[
        int | None,
        typer.Option(help="Long windows: exact backprop through --ctx-len in segments of N tokens (memory of one)."),
    ] = None,
    l2wrap: Annotated[bool | None, typer.Option("--l2wrap/--no-l2wrap", help="RWKV-LM's L2Wrap logit penalty.")] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    nan_policy: Annotated[str | None, typer.Option(help="On NaN/Inf loss: skip (the step) or stop.")] = None,
    init_from: Annotated[
        str | None, typer.Option(help="Start from these weights (finetune) instead of a fresh init.")
    ] = None,
    stop_after_steps: Annotated[
        int | None, typer.Option(help="Stop (with a checkpoint) after N steps of this run.")
    ] = None,
    wandb: Annotated[
        str | None, typer.Option(help="Log to this Weights & Biases project (WANDB_MODE=offline ok).")
    ] = None,
    peak_tflops: Annotated[float | None, typer.Option(help="Accelerator peak TFLOP/s for the MFU estimate.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any config key: SECTION.KEY=VALUE (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run dir.")
    ] = False,
    resume_step: Annotated[int | None, typer.Option(help="Continue from the checkpoint of this step.")] = None,
) -> None:
    """Train an RWKV-5.2 model: resumable bit-exactly, single process or DeepSpeed ZeRO.

    Flags override the --config file, which overrides the defaults (the published RWKV-5 7B recipe).
    With --resume and no --config, the run's own run_config.yaml is used. Multi-process:
    `deepspeed --no_local_rank --num_gpus N --module rwkvctl train ... --strategy deepspeed`
    or `torchrun --nproc_per_node N -m rwkvctl train ... --strategy deepspeed`.
    """
    from rwkvctl.errors import ConfigError
    from rwkvctl.lifecycle.train import end_distributed, train
    from rwkvctl.train.config import RunConfig
    from rwkvctl.train.run_dir import RunDir

    resuming = resume or resume_step is not None
    if config is not None:
        cfg = RunConfig.from_yaml(config)
    elif resuming and run_dir and RunDir(run_dir).config_file.is_file():
        cfg = RunConfig.from_yaml(RunDir(run_dir).config_file)
    else:
        cfg = RunConfig()
    flags: dict[str, Any] = {
        "run_dir": run_dir,
        "data.path": data,
        "model.preset": preset,
        "data.ctx_len": ctx_len,
        "train.micro_bsz": micro_bsz,
        "train.accum": accum,
        "train.max_steps": max_steps,
        "train.max_tokens": max_tokens,
        "optim.lr_init": lr_init,
        "optim.lr_final": lr_final,
        "optim.warmup_steps": warmup_steps,
        "train.strategy": strategy,
        "train.zero_stage": zero_stage,
        "train.offload": offload,
        "train.precision": precision,
        "train.device": device,
        "train.seed": seed,
        "train.save_every": save_every,
        "train.keep_last": keep_last,
        "data.val_every": val_every,
        "train.grad_checkpointing": grad_cp,
        "train.segment_len": segment_len,
        "train.l2wrap": l2wrap,
        "train.compile": compile_model,
        "train.nan_policy": nan_policy,
        "train.init_from": init_from,
        "train.stop_after_steps": stop_after_steps,
        "train.wandb": wandb,
        "train.peak_tflops": peak_tflops,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(_parse_sets(set_ or []))
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    if not cfg.data.path:
        raise ConfigError("no training data: give --data (prepare's output) or data.path in --config")

    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        train(cfg, resume=resume_step if resume_step is not None else ("latest" if resuming else None))
        end_distributed()
        return
    display = LiveDisplay()
    try:
        result = train(
            cfg,
            resume=resume_step if resume_step is not None else ("latest" if resuming else None),
            on_progress=display,
        )
    finally:  # also before an error message, so it starts on a line of its own
        display.stop()
    end_distributed()
    console.print(_summary(result))
    if result.interrupted:
        console.print(
            f"[yellow]stopped by a signal at step {result.step}; continue with:[/] "
            f"rwkvctl train --run-dir {escape(cfg.run_dir)} --resume"
        )
