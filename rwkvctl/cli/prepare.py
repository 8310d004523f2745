"""`rwkvctl prepare` (corpus -> tokenized binidx shards + manifest) and `rwkvctl sample-corpus`."""

from __future__ import annotations

from pathlib import Path

import typer

from rwkvctl.cli._common import app, console, handles_errors


@app.command("sample-corpus")
@handles_errors
def sample_corpus(
    out_dir: Path = typer.Argument(..., help="Directory to create (SlimPajama layout: train/, validation/)."),
    seed: int = typer.Option(0, help="Seed for document choice and order; same seed -> same files."),
) -> None:
    """Write a small real-text corpus (from Python's standard library) in SlimPajama's exact layout and fields."""
    from rwkvctl.data.sample_corpus import write_sample_corpus

    paths = write_sample_corpus(out_dir, seed=seed)
    size = sum(p.stat().st_size for p in paths)
    console.print(f"wrote {len(paths)} files ({size / 1e6:.1f} MB compressed) under [bold]{out_dir}[/]")
    for p in paths:
        console.print(f"  {p}")
