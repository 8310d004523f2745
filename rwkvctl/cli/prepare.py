"""`rwkvctl prepare` (corpus -> tokenized binidx shards + manifest) and `rwkvctl sample-corpus`."""

from __future__ import annotations

from pathlib import Path

import typer

from rwkvctl.cli._common import app, console, handles_errors
from rwkvctl.cli.terminal import clean, shown


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
    console.print(f"wrote {len(paths)} files ({size / 1e6:.1f} MB compressed) under [bold]{shown(str(out_dir))}[/]")
    for p in paths:
        console.print(f"  {clean(str(p))}", markup=False, highlight=False)


def _parse_weights(items: list[str]) -> dict[str, float]:
    from rwkvctl.errors import DataError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise DataError(f"--source-weight {item!r}: expected SOURCE=WEIGHT, e.g. RedPajamaGithub=0.5") from None
    return out


@app.command("prepare")
@handles_errors
def prepare_cmd(
    inputs: list[str] = typer.Argument(
        ..., help="Input files, directories or globs (.jsonl, .jsonl.zst, .jsonl.gz, .parquet, a `datasets` dir)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (shards + manifest.json); resumable."),
    val_input: list[str] = typer.Option(
        [], "--val-input", help="Validation inputs (repeatable), e.g. SlimPajama's validation/ directory."
    ),
    tokenizer: str = typer.Option("world", help="'world' (RWKV World, 65536 ids) or 'spm:PATH' (SentencePiece)."),
    text_key: str = typer.Option("text", help="JSON field holding the document text."),
    source_key: str = typer.Option(
        "meta.redpajama_set_name", help="Dotted field naming the source (meta may be a dict or a JSON string)."
    ),
    val_fraction: float = typer.Option(
        0.0, help="Send this fraction of training documents to the val split (by a seeded hash of the text)."
    ),
    seed: int = typer.Option(0, help="Seed for the val split and source weighting."),
    source_weight: list[str] = typer.Option(
        [], "--source-weight", help="SOURCE=W: repeat/keep docs of SOURCE W times on average (0.5 = half)."
    ),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes (one input file at a time each)."),
    num_nodes: int = typer.Option(1, help="Machines sharing the job; inputs are split by index."),
    node_rank: int = typer.Option(0, help="This machine's rank in 0..num_nodes-1."),
    ctx_len: int | None = typer.Option(None, help="Also report RWKV-LM's --magic_prime/--my_exit_tokens for it."),
    verify_every: int = typer.Option(64, help="Check decode(encode(x)) == x on every Nth document."),
    max_line_bytes: int | None = typer.Option(
        None, help="A JSONL line longer than this many bytes is a bad document (line_too_long), never read whole "
        "[default: 67108864, 64 MiB]."
    ),
) -> None:
    """Tokenize a corpus (e.g. SlimPajama) into RWKV-LM binidx shards + manifest.json. Rerun to resume."""
    from rwkvctl.cli.data_view import PrepareView, render_summary
    from rwkvctl.data.corpus import MAX_LINE_BYTES
    from rwkvctl.errors import DataError
    from rwkvctl.lifecycle.prepare import PrepareOptions, prepare

    if max_line_bytes is not None and max_line_bytes < 1:
        raise DataError(f"--max-line-bytes {max_line_bytes}: give a positive number of bytes (default "
                        f"{MAX_LINE_BYTES})")

    opts = PrepareOptions(
        inputs=inputs,
        out_dir=out,
        val_inputs=val_input,
        tokenizer=tokenizer,
        text_key=text_key,
        source_key=source_key,
        val_fraction=val_fraction,
        seed=seed,
        source_weights=_parse_weights(source_weight),
        verify_every=verify_every,
        workers=workers,
        num_nodes=num_nodes,
        node_rank=node_rank,
        ctx_len=ctx_len,
        max_line_bytes=MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes,
    )
    with PrepareView(console) as view:
        result = prepare(opts, on_progress=view.update)
    render_summary(console, result)


@app.command("merge-binidx")
@handles_errors
def merge_cmd(
    data: Path = typer.Argument(..., help="A prepared dataset (dir or manifest.json) or a binidx prefix."),
    out_prefix: Path = typer.Argument(..., help="Output prefix: writes OUT_PREFIX.bin and OUT_PREFIX.idx."),
    split: str = typer.Option("train", help="Which split to merge: train or val."),
    ctx_len: int | None = typer.Option(None, help="Print RWKV-LM's --magic_prime for this ctx_len."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_PREFIX.bin/.idx if they exist."),
) -> None:
    """Concatenate a dataset's shards into one .bin/.idx pair that RWKV-LM's trainer reads as-is."""
    from rwkvctl.data.manifest import resolve_prefixes
    from rwkvctl.data.merge import merge_binidx
    from rwkvctl.errors import DataError
    from rwkvctl.lifecycle.prepare import rwkv_lm_numbers

    if ctx_len is not None and ctx_len < 1:
        raise DataError(f"--ctx-len must be at least 1, got {ctx_len}")

    prefixes = resolve_prefixes(data, split, check_counts=True)
    info = merge_binidx(prefixes, out_prefix, overwrite=force)
    console.print(
        f"merged {len(prefixes)} shards -> [bold]{shown(str(out_prefix))}.bin/.idx[/] "
        f"({info['docs']:,} docs, {info['tokens']:,} tokens, {info['dtype']})"
    )
    if ctx_len is not None:
        n = rwkv_lm_numbers(info["tokens"], ctx_len)
        if n["magic_prime"] is None:
            console.print(f"[yellow]{shown(n['note'])}[/]")
        else:
            console.print(
                f"RWKV-LM: --data_file {clean(str(out_prefix))} --data_type binidx --ctx_len {ctx_len} "
                f"--my_exit_tokens {n['my_exit_tokens']} --magic_prime {n['magic_prime']}",
                markup=False,
            )
