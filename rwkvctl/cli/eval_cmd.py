"""`rwkvctl eval`: perplexity, bits per byte and loss by position of one or more models, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rwkvctl.cli._common import (
    DeviceOption,
    DtypeOption,
    KeepQuantizedOption,
    LogTicker,
    TokenizerOption,
    app,
    console,
    err_console,
    handles_errors,
    human,
    live_output,
)
from rwkvctl.cli.terminal import clean, shown


@app.command("eval")
@handles_errors
def eval_command(
    models: Annotated[
        list[Path], typer.Argument(help="Checkpoints to compare (.pth/.safetensors, plain or quantized).")
    ],
    data: Annotated[
        list[Path],
        typer.Option("--data", "-d", help="A prepared dataset (its val split), a binidx prefix, or text files "
                     "(repeatable)."),
    ],
    window: Annotated[int, typer.Option(help="Tokens per window; the state is carried across the window.")] = 4096,
    segment: Annotated[int, typer.Option(help="Tokens run at once (memory: one segment's logits).")] = 1024,
    windows: Annotated[int, typer.Option(help="Windows to score, from the start of the data (0: all).")] = 8,
    label: Annotated[
        list[str] | None, typer.Option(help="Name per model, in order (repeatable; default: the file names).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the loss-by-position plot here (.png, .svg, .pdf).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON, and nothing else, on stdout.")] = (
        False
    ),
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "fp32",
    keep_quantized: KeepQuantizedOption = False,
) -> None:
    """Score models on the same text: loss, perplexity, bits per byte, and loss by position in the window
    (log2 buckets: does the model use long context?). Windows run in segments, so 128k tokens fit in memory."""
    from rwkvctl.lifecycle.evaluate import evaluate_models, plot_result
    from rwkvctl.lifecycle.models import parse_dtype
    from rwkvctl.train.engine import resolve_device

    torch_dtype = parse_dtype(dtype)
    device = str(resolve_device(device, setting="--device"))  # a missing GPU is one line, before any loading
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    live, ticker = live_output() and err_console.is_terminal, LogTicker()
    with Progress(*columns, console=err_console, transient=True, disable=not live) as progress:
        task = progress.add_task("loading", total=None, rate="")

        def report(p: Any) -> None:
            name = f"{p.model} ({p.index + 1}/{p.models})" if p.models > 1 else p.model
            progress.update(task, description=f"scoring {shown(name)}", total=p.tokens_total * p.models,
                            completed=p.index * p.tokens_total + p.tokens_done,
                            rate=f"{human(p.tokens_done)}/{human(p.tokens_total)} tokens")
            if not live and not as_json and ticker.due(force=p.tokens_done == p.tokens_total):
                err_console.print(f"scoring {clean(name)}: {p.tokens_done}/{p.tokens_total} tokens", markup=False,
                                  highlight=False)

        result = evaluate_models(models, data, window=window, segment=segment, max_windows=windows, labels=label,
                                 tokenizer=tokenizer, device=device, dtype=torch_dtype, keep_quantized=keep_quantized,
                                 on_progress=report)
    if plot is not None:
        plot_result(result, plot)
    if as_json:
        console.file.write(result.to_json() + "\n")  # exactly the JSON: no markup, no wrapping
        console.file.flush()
        return
    _render(result, plot)


def _render(result: Any, plot: Path | None) -> None:
    bytes_note = f", {human(result.bytes, 'B')} of text" if result.bytes else ""
    console.print(f"{shown(result.data)} ({result.kind}): {result.windows} window(s) of {result.window:,} tokens in "
                  f"segments of {result.segment:,}, {human(result.tokens)} tokens{bytes_note}, tokenizer "
                  f"{shown(result.tokenizer)}")
    table = Table(title="scores")
    table.add_column("model")
    for name in ("loss (nats/token)", "perplexity", "bits/byte", "tokens/s"):
        table.add_column(name, justify="right")
    for m in result.models:
        bpb = f"{m.bits_per_byte:.4f}" if m.bits_per_byte is not None else "-"
        table.add_row(shown(m.label), f"{m.loss:.4f}", f"{m.perplexity:.3f}", bpb, f"{m.tokens_per_s:,.0f}")
    console.print(table)
    by_pos = Table(title="loss by position (nats/token, mean over the windows)")
    by_pos.add_column("positions", justify="right")
    for m in result.models:
        by_pos.add_column(shown(m.label), justify="right")
    for i, bucket in enumerate(result.models[0].by_position):
        span = f"{bucket.first:,}" if bucket.first == bucket.last else f"{bucket.first:,}-{bucket.last:,}"
        by_pos.add_row(span, *(f"{m.by_position[i].loss:.4f}" for m in result.models))
    console.print(by_pos)
    if plot is not None:
        console.print(f"wrote [bold]{shown(str(plot))}[/]")
