"""`rwkvctl inspect`: what a checkpoint (or a prepared dataset) contains."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rwkvctl.cli._common import app, console, handles_errors, human
from rwkvctl.cli.terminal import clean, shown


@app.command("inspect")
@handles_errors
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A checkpoint (.pth/.safetensors) or a dataset (manifest/dir/binidx).")],
    tensors: Annotated[bool, typer.Option("--tensors/--no-tensors", help="Show the per-tensor table.")] = True,
    limit: Annotated[int, typer.Option(help="Rows of the per-tensor table (0 = all).")] = 40,
) -> None:
    """Show a checkpoint (architecture, version, parameters, dtypes, tensors) or a prepared dataset."""
    from rwkvctl.data.inspect import is_dataset_path

    if path.is_dir() or is_dataset_path(path):
        from rwkvctl.cli.data_view import render_dataset
        from rwkvctl.data.inspect import describe_dataset

        render_dataset(console, describe_dataset(path))
        return
    from rwkvctl.io.state_file import is_state_file

    if is_state_file(path):
        _render_state_file(path)
        return
    from rwkvctl.lifecycle.models import describe_checkpoint

    info = describe_checkpoint(path)
    cfg = info.meta.model
    summary = Table(title=shown(info.path), show_header=False, title_justify="left")
    summary.add_row("architecture", f"RWKV-{info.version} (x052){'' if cfg.gate else ', no output gate'}")
    summary.add_row("layers / width", f"{cfg.n_layer} x {cfg.n_embd} (att {cfg.dim_att}, ffn {cfg.dim_ffn})")
    summary.add_row("heads", f"{cfg.n_head} x {cfg.head_size} (head_size_divisor {cfg.head_size_divisor})")
    summary.add_row("vocab", f"{cfg.vocab_size} ({shown(info.meta.tokenizer)})")
    summary.add_row("parameters", f"{info.params:,} ({human(info.params)})")
    summary.add_row("dtypes", shown(", ".join(f"{d}: {human(n)}" for d, n in info.dtypes.items())))
    summary.add_row("file size", f"{info.file_bytes:,} bytes ({human(info.file_bytes, 'B')})")
    summary.add_row("config source", "sidecar" if info.has_sidecar else "inferred from tensor shapes")
    if info.meta.step is not None:
        summary.add_row("step / tokens", f"{info.meta.step:,} / {info.meta.tokens or 0:,}")
    if info.meta.init:
        summary.add_row("init", shown(info.meta.init))
    quant = info.meta.extra.get("quantization")
    if isinstance(quant, dict):
        by_bits = ", ".join(f"{human(n)} at {b} bits" for b, n in quant.get("params_by_bits", {}).items())
        summary.add_row("quantized", shown(f"{by_bits} (group {quant.get('group')}); loaded dequantized"))
    console.print(summary)
    if not tensors:
        return
    table = Table("tensor", "shape", "dtype", "params")
    rows = info.tensors if limit <= 0 else info.tensors[:limit]
    for t in rows:
        table.add_row(shown(t.name), "x".join(map(str, t.shape)), shown(t.dtype), f"{t.numel:,}")
    if len(rows) < len(info.tensors):
        table.caption = f"{len(info.tensors) - len(rows)} more tensors (--limit 0 shows all)"
    console.print(table)


def _render_state_file(path: Path) -> None:
    """A `chat` conversation state: which model it belongs to and where the conversation stands."""
    from rwkvctl.io.state_file import describe_state_file

    d = describe_state_file(path)
    model, info = d["model"], d["info"]
    table = Table(title=shown(f"{path} (chat state)"), show_header=False, title_justify="left")
    shape = ", ".join(f"{k} {v}" for k, v in model.items())
    table.add_row("for a model with", shown(shape))
    table.add_row("tokenizer / roles", shown(f"{info.get('tokenizer', '?')} / {info.get('user')}, {info.get('bot')}"))
    table.add_row("tokens seen", shown(info.get("tokens_seen", "?")))
    state_bytes = sum(4 * math.prod(shape) for shape in d["shapes"].values())  # fp32 tensors
    table.add_row(
        "file size", f"{human(d['bytes'], 'B')}: state {human(state_bytes, 'B')} (never grows), the rest transcript"
    )
    console.print(table)
    transcript = info.get("transcript") if isinstance(info.get("transcript"), list) else []
    for entry in transcript[-6:]:
        if isinstance(entry, list) and len(entry) == 2:
            console.print(f"[bold]{shown(entry[0])}:[/] ", end="")
            console.print(clean(str(entry[1])[:300]), markup=False, highlight=False, emoji=False)
