"""`rwkvctl train`: pre-train or finetune RWKV-5.2 with a live display, exact resume and DeepSpeed ZeRO."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rwkvctl.cli._common import LogTicker, app, console, handles_errors, human, live_output
from rwkvctl.cli.terminal import shown
from rwkvctl.train.config import field_docs


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
        self.live_output = live_output()
        self.ticker = LogTicker()
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
        if self.started and self.live_output:
            self.live.stop()
        if self.started and not self.live_output and self.pending is not None:
            console.print(self.pending, markup=False, highlight=False)  # the last step is always logged
        self.started = False
        self.pending = None

    pending: str | None = None

    def _log_line(self, event: Any) -> None:
        """One plain line per step when due (output that is not a terminal: Slurm, tee, CI)."""
        line = f"step {event.step}/{event.total_steps} " + " ".join(
            f"{k} {self.latest.get(k, '-')}" for k in ("loss", "lr", "grad-norm", "tokens/s", "tokens", "ETA")
        )
        if self.ticker.due(force=event.step == event.total_steps):
            console.print(line, markup=False, highlight=False)
            self.pending = None
        else:
            self.pending = line

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
            if self.live_output:
                self.live.start()
            self.started = True
        if event.kind == "message":
            console.print(f"[yellow]{shown(event.message)}[/]")
        elif event.kind == "checkpoint":
            console.print(f"step {event.step}: checkpoint [bold]{shown(str(event.path))}[/]")
        elif event.kind == "val":
            self.latest["val"] = _fmt(event.val_loss, ".4f")
            console.print(f"step {event.step}: val loss [bold]{_fmt(event.val_loss, '.4f')}[/]")
        self.progress.update(self.task, total=event.total_steps, completed=event.step)
        if event.kind == "step":
            skipped = " (skipped)" if event.skipped else ""
            self.latest.update(
                {
                    "loss": _fmt(event.loss, ".4f") + (f"[red]{skipped}[/]" if self.live_output else skipped),
                    "lr": _fmt(event.lr, ".3g"),
                    "grad-norm": _fmt(event.grad_norm, ".3g"),
                    "tokens/s": human(event.tokens_per_s or 0),
                    "tokens": human(event.tokens),
                    "ETA": _duration(event.eta_s),
                }
            )
            if not self.live_output:
                self._log_line(event)
        if self.live_output:
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
            f"{human(result.tokens_per_s)} tokens/s ({result.engine} x{result.world_size}, {shown(result.device)})",
        ),
        ("MFU", f"{result.mfu:.1%}" if result.mfu is not None else "n/a (no known peak; --peak-tflops)"),
        ("peak memory", human(result.peak_memory_bytes, "B")),
        ("wall time", _duration(result.elapsed_s)),
        ("NaN-skipped steps", str(result.nan_skips)),
        ("checkpoint", shown(str(result.last_checkpoint or "-"))),
        ("exported weights", shown(str(result.export_path or "-"))),
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


# option parameter -> the run config key it overrides; the option's --help is that field's docstring
# (rwkvctl/train/config.py), so one text describes a setting in the YAML, in --set and on the command line
CONFIG_FLAGS = {
    "run_dir": "run_dir", "data": "data.path", "ctx_len": "data.ctx_len", "micro_bsz": "train.micro_bsz",
    "accum": "train.accum", "max_steps": "train.max_steps", "max_tokens": "train.max_tokens",
    "lr_init": "optim.lr_init", "lr_final": "optim.lr_final", "warmup_steps": "optim.warmup_steps",
    "strategy": "train.strategy", "zero_stage": "train.zero_stage", "offload": "train.offload",
    "precision": "train.precision", "device": "train.device", "seed": "train.seed", "save_every": "train.save_every",
    "keep_last": "train.keep_last", "val_every": "data.val_every", "grad_cp": "train.grad_checkpointing",
    "segment_len": "train.segment_len", "l2wrap": "train.l2wrap", "compile_model": "train.compile",
    "nan_policy": "train.nan_policy", "init_from": "train.init_from", "stop_after_steps": "train.stop_after_steps",
    "wandb": "train.wandb", "peak_tflops": "train.peak_tflops", "start_step": "train.start_step",
    "export_dtype": "train.export_dtype",
}


def _doc(param: str) -> str:
    """--help of a config option: its field's docstring (plain text; brackets must not read as Rich markup)."""
    return shown(field_docs()[CONFIG_FLAGS[param]])


@app.command("train")
@handles_errors
def train_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML (see examples/).")] = None,
    run_dir: Annotated[str | None, typer.Option(help=_doc("run_dir"))] = None,
    data: Annotated[str | None, typer.Option(help=_doc("data"))] = None,
    preset: Annotated[str | None, typer.Option(help="Model size preset (tiny, 0.1b, 0.4b, 1.5b, 3b, 7b).")] = None,
    ctx_len: Annotated[int | None, typer.Option(help=_doc("ctx_len"))] = None,
    micro_bsz: Annotated[int | None, typer.Option(help=_doc("micro_bsz"))] = None,
    accum: Annotated[int | None, typer.Option(help=_doc("accum"))] = None,
    max_steps: Annotated[int | None, typer.Option(help=_doc("max_steps"))] = None,
    max_tokens: Annotated[int | None, typer.Option(help=_doc("max_tokens"))] = None,
    lr_init: Annotated[float | None, typer.Option(help=_doc("lr_init"))] = None,
    lr_final: Annotated[float | None, typer.Option(help=_doc("lr_final"))] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=_doc("warmup_steps"))] = None,
    strategy: Annotated[str | None, typer.Option(help=_doc("strategy"))] = None,
    zero_stage: Annotated[int | None, typer.Option(help=_doc("zero_stage"))] = None,
    offload: Annotated[bool | None, typer.Option("--offload/--no-offload", help=_doc("offload"))] = None,
    precision: Annotated[str | None, typer.Option(help=_doc("precision"))] = None,
    device: Annotated[str | None, typer.Option(help=_doc("device"))] = None,
    seed: Annotated[int | None, typer.Option(help=_doc("seed"))] = None,
    save_every: Annotated[int | None, typer.Option(help=_doc("save_every"))] = None,
    keep_last: Annotated[int | None, typer.Option(help=_doc("keep_last"))] = None,
    val_every: Annotated[int | None, typer.Option(help=_doc("val_every"))] = None,
    grad_cp: Annotated[bool | None, typer.Option("--grad-cp/--no-grad-cp", help=_doc("grad_cp"))] = None,
    segment_len: Annotated[int | None, typer.Option(help=_doc("segment_len"))] = None,
    l2wrap: Annotated[bool | None, typer.Option("--l2wrap/--no-l2wrap", help=_doc("l2wrap"))] = None,
    compile_model: Annotated[bool | None, typer.Option("--compile/--no-compile", help=_doc("compile_model"))] = None,
    nan_policy: Annotated[str | None, typer.Option(help=_doc("nan_policy"))] = None,
    init_from: Annotated[str | None, typer.Option(help=_doc("init_from"))] = None,
    stop_after_steps: Annotated[int | None, typer.Option(help=_doc("stop_after_steps"))] = None,
    start_step: Annotated[int | None, typer.Option(help=_doc("start_step"))] = None,
    export_dtype: Annotated[str | None, typer.Option(help=_doc("export_dtype"))] = None,
    wandb: Annotated[str | None, typer.Option(help=_doc("wandb"))] = None,
    peak_tflops: Annotated[float | None, typer.Option(help=_doc("peak_tflops"))] = None,
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
    given = dict(locals())  # the parameters (nothing else is bound yet), for CONFIG_FLAGS
    from rwkvctl.errors import ConfigError
    from rwkvctl.lifecycle.train import end_distributed, resume_config, train
    from rwkvctl.train.config import RunConfig

    resuming = resume or resume_step is not None
    source = ""
    saved = None
    if config is None and resuming and run_dir:
        # the run's own config (its run_config.yaml, else the checkpoint's), less the previous invocation's
        # --stop-after-steps (older versions saved it)
        saved = resume_config(run_dir, resume_step if resume_step is not None else "latest")
    if config is not None:
        cfg, source = RunConfig.from_yaml(config), f" ({config} has no data.path)"
    elif saved is not None:
        cfg = saved.with_overrides({"train.stop_after_steps": 0})
        source = f" (the run's saved config in {run_dir} has no data.path)"
    else:
        cfg = RunConfig()
        if resuming and run_dir:
            source = (f"; {run_dir} holds no run_config.yaml and no checkpoint (the run stopped before it started), "
                      "so start it again with its own --config or flags")
    flags: dict[str, Any] = {key: given[param] for param, key in CONFIG_FLAGS.items()}
    flags["model.preset"] = preset
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(_parse_sets(set_ or []))
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    if not cfg.data.path:
        raise ConfigError(f"no training data: give --data (prepare's output) or data.path in --config{source}")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps}: give at least 1 step (leave it out for one pass over the data, "
                          "or use --max-tokens)")

    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        result = train(cfg, resume=resume_step if resume_step is not None else ("latest" if resuming else None))
        end_distributed()
        if result.interrupted:  # every rank tells the launcher it was stopped, not finished
            raise typer.Exit(128 + (result.stop_signal or signal.SIGTERM))
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
            f"rwkvctl train --run-dir {shown(cfg.run_dir)} --resume"
        )
        # non-zero, as shells and schedulers expect of a signalled process: 130 (SIGINT) or 143 (SIGTERM)
        raise typer.Exit(128 + (result.stop_signal or signal.SIGTERM))
