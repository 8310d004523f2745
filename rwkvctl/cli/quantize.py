"""`rwkvctl quantize`: a checkpoint -> a 4-bit (or 8-bit) `.safetensors` that every command loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rwkvctl.cli._common import LogTicker, app, console, fail, handles_errors, human, live_output
from rwkvctl.cli.terminal import clean, shown


@app.command("quantize")
@handles_errors
def quantize_command(
    src: Annotated[Path | None, typer.Argument(help="Checkpoint to quantize (.pth or .safetensors).")] = None,
    out: Annotated[
        Path | None, typer.Argument(help="Output .safetensors (a JSON sidecar is written next to it).")
    ] = None,
    bits: Annotated[int, typer.Option(help="Bits per weight of the block matrices: 4 or 8.")] = 4,
    group: Annotated[int, typer.Option(help="Weights per scale/minimum pair (64: 4.5 bits per weight at 4).")] = 64,
    embed_bits: Annotated[
        int, typer.Option(help="Bits for emb and head: 8 (default), 4, or 16 to keep them unquantized.")
    ] = 8,
    embed_group: Annotated[
        int | None,
        typer.Option(help="Group of emb and head (default: --group). A 7B in 4 GB: --group 128 --embed-bits 4."),
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="UTF-8 text file: weight each layer's range search by its input activations."),
    ] = None,
    calib_tokens: Annotated[int, typer.Option(help="Tokens of --calib text to use.")] = 4096,
    calib_method: Annotated[
        str,
        typer.Option(
            "--calib-method",
            help="With --calib: 'range' (weight each group's range search) or 'gptq' (error feedback across "
            "columns from the inputs' second moments; slower). Same file format either way.",
        ),
    ] = "range",
    estimate: Annotated[
        bool, typer.Option("--estimate", help="Print the exact output size of these settings; read no weights.")
    ] = False,
    preset_name: Annotated[
        str | None, typer.Option("--preset", help="With --estimate: a preset instead of a checkpoint (e.g. 7b).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="With --estimate --preset: the source's dtype (fp32, bf16, fp16).")
    ] = "bf16",
    search: Annotated[
        bool, typer.Option("--search/--no-search", help="Search each group's range for least error.")
    ] = True,
    eval_text: Annotated[
        Path | None,
        typer.Option("--eval", help="UTF-8 text file: compare perplexity and next-token KL with the original."),
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Tokens of --eval text to use.")] = 1024,
    tokenizer: Annotated[str, typer.Option(help="Tokenizer for --eval ('world' or spm:PATH).")] = "world",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Quantize a checkpoint to 4 bits (or 8): group-wise codes with searched ranges; emb/head at 8 bits."""
    if embed_bits not in (4, 8, 16):
        raise fail("--embed-bits must be 4, 8 or 16 (16 keeps emb and head unquantized)")
    if eval_tokens < 2 or calib_tokens < 2:
        raise fail("--eval-tokens and --calib-tokens must be at least 2")
    from rwkvctl.lifecycle.quantize import CALIB_METHODS, estimate_quantized_size, quantize_checkpoint, read_text_tokens

    if calib_method not in CALIB_METHODS:
        raise fail(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {calib_method!r}")
    if calib_method != "range" and calib is None:
        raise fail(f"--calib-method {calib_method} needs calibration text: pass --calib FILE")
    from rwkvctl.quant.policy import QuantSpec

    spec = QuantSpec(
        bits=bits, group=group, embed_bits=None if embed_bits == 16 else embed_bits, search=search,
        embed_group=embed_group,
    )  # fmt: skip
    if estimate:
        if out is not None:
            raise fail("--estimate writes nothing: pass a checkpoint or --preset, not an output")
        est = estimate_quantized_size(
            spec, src=src, preset_name=preset_name, dtype=dtype, calibrated=calib is not None,
            calib_method=calib_method,
        )
        console.print(
            f"{shown(est.source)}: [bold]{est.bytes:,} bytes[/] ({est.bytes / 1e9:.3f} GB, "
            f"{est.bytes / 2**30:.3f} GiB) for {est.params:,} weights, {est.bits_per_param:.3f} bits per weight"
        )
        return
    if src is None or out is None or preset_name is not None:
        raise fail("pass a checkpoint and an output .safetensors (--preset is only for --estimate)")
    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to overwrite it")
    tokens = read_text_tokens(eval_text, tokenizer, eval_tokens, "evaluation") if eval_text is not None else None
    calibration = read_text_tokens(calib, tokenizer, calib_tokens, "calibration") if calib is not None else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    live, ticker, done = live_output(), LogTicker(), 0
    with Progress(*columns, console=console, transient=True, disable=not live) as progress:
        task = progress.add_task("quantizing", total=None)

        def advance(name: str, total: int) -> None:
            nonlocal done
            done += 1
            progress.update(task, total=total, advance=1, description=f"quantizing {shown(name)}")
            if not live and ticker.due(force=done == total):  # a log, not a terminal: a plain line now and then
                console.print(f"quantizing {done}/{total} {clean(name)}", markup=False, highlight=False)

        if calibration is not None:
            progress.update(task, description="calibrating (one pass of the model over the --calib text)")
        result = quantize_checkpoint(src, out, spec, eval_tokens=tokens, calib_tokens=calibration,
                                     calib_method=calib_method, on_tensor=advance)  # fmt: skip
    _summary(result, spec)


def _summary(result, spec) -> None:  # noqa: ANN001  (lifecycle result types are imported lazily)
    table = Table(title=f"quantized {shown(str(result.path))}")
    table.add_column("tensors")
    table.add_column("count", justify="right")
    table.add_column("bits", justify="right")
    table.add_column("bits/weight", justify="right")
    table.add_column("worst rel. error", justify="right")
    groups: dict[str, list] = {}
    for t in result.tensors:
        kind = "emb/head" if t.kind == "embedding" else "block matrices" if t.bits else "other"
        groups.setdefault(kind, []).append(t)
    for kind, rows in groups.items():
        bits = rows[0].bits
        worst = max(r.rel_error for r in rows)
        bpw = f"{result.bits_per_weight(bits):.2f}" if bits else "-"
        table.add_row(kind, str(len(rows)), str(bits or "kept"), bpw, f"{worst:.4f}" if bits else "-")
    console.print(table)
    ratio = result.source_bytes / result.output_bytes if result.output_bytes else 0
    console.print(
        f"{human(result.source_bytes, 'B')} -> [bold]{human(result.output_bytes, 'B')}[/] ({ratio:.1f}x smaller)"
    )
    q = result.quality
    if q is not None:
        console.print(
            f"on {q.tokens} tokens: perplexity {q.ppl_original:.3f} -> {q.ppl_quantized:.3f} "
            f"([bold]{100 * q.ppl_increase:+.2f}%[/]), mean KL {q.mean_kl:.4f} nats/token, "
            f"top-1 agreement {100 * q.top1_agreement:.1f}%"
        )
