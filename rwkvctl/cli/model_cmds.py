"""`rwkvctl init`: a freshly initialised RWKV-5.2 checkpoint from a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rwkvctl.cli._common import app, console, fail, handles_errors, human
from rwkvctl.cli.terminal import shown
from rwkvctl.config import PRESETS, param_count, preset


@app.command("init")
@handles_errors
def init_command(
    out: Annotated[
        Path | None,
        typer.Argument(help="Checkpoint to write (.pth for RWKV-LM format, or .safetensors). Not needed with --meta."),
    ] = None,
    preset_name: Annotated[
        str, typer.Option("--preset", "-p", help=f"Model size: {', '.join(PRESETS)}.", show_default=True)
    ] = "tiny",
    gate: Annotated[
        bool,
        typer.Option("--gate/--no-gate", help="v5.2 output gate; --no-gate: the gate-less layout (same FFN)."),
    ] = True,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary rows (65536 = RWKV World).")] = 65536,
    init: Annotated[
        str,
        typer.Option(help="Init scheme: v5.2-2023 (the v5.2 release's, which the 7B run used) or rwkv-lm-2024 "
                     "(RWKV-LM's since 2024-04)."),
    ] = "v5.2-2023",
    seed: Annotated[int, typer.Option(help="Random seed of the initialisation.")] = 0,
    dtype: Annotated[str, typer.Option(help="Stored dtype: fp32 or bf16 (RWKV-LM trains in bf16).")] = "fp32",
    meta: Annotated[bool, typer.Option("--meta", help="Only count parameters; allocate and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Create a freshly initialised RWKV-5.2 checkpoint (RWKV-LM x052 names and shapes)."""
    cfg = preset(preset_name, gate=gate, vocab_size=vocab_size)
    table = Table(show_header=False, box=None)
    for key, value in cfg.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("n_head", str(cfg.n_head))
    n = param_count(cfg)
    table.add_row("parameters", f"[bold]{n:,}[/] ({human(n)})")
    if meta:
        console.print(table)
        return
    if out is None:
        raise fail("give an output file (e.g. model.pth), or --meta to only count parameters")
    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to overwrite it")
    from rwkvctl.lifecycle.models import create_checkpoint

    with console.status(f"initialising {preset_name} ({human(n)} parameters)..."):
        result = create_checkpoint(out, cfg, scheme=init, seed=seed, dtype=dtype)
    console.print(table)
    size = human(result.bytes_written, "B")
    console.print(f"wrote [bold]{shown(str(result.path))}[/] ({size}) and {shown(result.path.name)}.json")
