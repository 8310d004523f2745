"""`rwkvctl plot`: loss curves of training runs to a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rwkvctl.cli._common import app, console, handles_errors
from rwkvctl.cli.terminal import shown


@app.command("plot")
@handles_errors
def plot_command(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (each holds a metrics.jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Image to write (.png, .svg or .pdf).")] = Path("loss.png"),
    x: Annotated[str, typer.Option(help="X axis: tokens or step.")] = "tokens",
    smooth: Annotated[
        int | None,
        typer.Option(help="Moving-average window in logged points (default: ~1/50 of the points; 1: raw only)."),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Chart title.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Legend label per run, in order (repeatable; default: the directory names)."),
    ] = None,
) -> None:
    """Draw loss vs tokens for one or more runs, overlaid; dotted lines mark where a run resumed."""
    from rwkvctl.lifecycle.plot import plot_runs

    result = plot_runs(runs, out, x=x, smooth=smooth, title=title, labels=label)
    console.print(
        f"wrote [bold]{shown(str(result.path))}[/]: {len(result.runs)} run(s), {result.points} points, "
        f"{result.resumes} resume(s) marked"
    )
