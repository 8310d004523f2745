"""`rwkvctl add-gate`: give a gate-less RWKV-5 run (or checkpoint) the v5.2 output gate, then resume training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rwkvctl.cli._common import app, console, fail, handles_errors, human, one_spelling
from rwkvctl.cli.terminal import shown


@app.command("add-gate")
@handles_errors
def add_gate_command(
    source: Annotated[Path, typer.Argument(help="A `rwkvctl train` run dir, or a checkpoint file (weights only).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="New run dir or checkpoint file (default: SOURCE-gate).")
    ] = None,
    step: Annotated[
        int | None, typer.Option(help="Run checkpoint step to branch from (default: the newest).")
    ] = None,
    init: Annotated[
        str,
        typer.Option(help="Gate init: rwkv-lm-2024 (orthogonal, gain 0.1) or v5.2-2023 (orthogonal, gain 1.0)."),
    ] = "rwkv-lm-2024",
    seed: Annotated[int, typer.Option(help="Seed of the gate's initialisation.")] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue training the new run right away (rwkvctl train --resume).")
    ] = False,
    max_steps: Annotated[int | None, typer.Option(help="With --resume: a new planned step count.")] = None,
    stop_after_steps: Annotated[int | None, typer.Option(help="With --resume: stop after N steps.")] = None,
) -> None:
    """Add the output gate (att.gate + time_mix_g) and keep everything else: weights, AdamW moments, data
    position, RNG and schedule. The original run is left untouched; the new one continues from the same step."""
    from rwkvctl.lifecycle.add_gate import add_gate_to_checkpoint, add_gate_to_run

    init = one_spelling("init", init, "--init")
    source = source.resolve() if source.exists() else source
    if not source.exists():
        raise fail(f"{source}: no such run dir or checkpoint file")
    if not resume and (max_steps is not None or stop_after_steps is not None):
        raise fail("--max-steps and --stop-after-steps apply to the training that --resume starts; add --resume")
    if source.is_dir():
        out = out or source.with_name(source.name + "-gate")
        result = add_gate_to_run(source, out, step="latest" if step is None else step, init=init, seed=seed)
        console.print(
            f"added the output gate ({human(result.added_params)} parameters, init {shown(init)}) at step "
            f"{result.step}: new run [bold]{shown(str(out))}[/] (AdamW state carried over; the gate starts fresh)"
        )
        if not resume:
            console.print(f"continue with: rwkvctl train --run-dir {shown(str(out))} --resume")
            return
        argv = ["train", "--run-dir", str(out), "--resume"]
        if max_steps is not None:
            argv += ["--max-steps", str(max_steps)]
        if stop_after_steps is not None:
            argv += ["--stop-after-steps", str(stop_after_steps)]
        code = app(argv, standalone_mode=False)
        if code:
            raise typer.Exit(code)
        return
    if resume or step is not None:
        raise fail("--resume and --step need a run dir; a checkpoint file carries no training state")
    out = out or source.with_name(f"{source.stem}-gate{source.suffix}")
    if out.exists():
        raise fail(f"{out} exists; choose another --out")
    result = add_gate_to_checkpoint(source, out, init=init, seed=seed)
    console.print(
        f"added the output gate ({human(result.added_params)} parameters, init {shown(init)}): "
        f"wrote [bold]{shown(str(out))}[/]"
    )
