"""`rwkvctl generate`: continue a prompt in RNN mode, streaming the text as it is produced."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from rwkvctl.cli._common import (
    DeviceOption,
    DtypeOption,
    KeepQuantizedOption,
    TokenizerOption,
    app,
    console,
    fail,
    handles_errors,
)
from rwkvctl.cli.terminal import clean


@app.command("generate")
@handles_errors
def generate_command(
    model_path: Annotated[Path, typer.Argument(help="Checkpoint (.pth or .safetensors, plain or quantized).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The text to continue.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="Read the prompt from this UTF-8 file ('-': stdin).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 200,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.85,
    top_k: Annotated[int, typer.Option(help="Keep only the k most likely tokens (0 = off).")] = 0,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop when the output contains this text (repeatable).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (the same seed repeats the output).")] = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "fp32",
    keep_quantized: KeepQuantizedOption = False,
) -> None:
    """Continue a prompt: the prompt goes through the sequence form, then one RNN step per token (constant
    memory however long the output). Stops at --max-tokens, a --stop text or the end-of-document token."""
    if (prompt is None) == (prompt_file is None):
        raise fail("give the prompt with exactly one of --prompt or --prompt-file")
    if not all(math.isfinite(v) for v in (temperature, top_p)) or temperature < 0 or not 0 < top_p <= 1:
        raise fail("need a finite --temperature >= 0 and 0 < --top-p <= 1")
    if max_tokens < 1 or top_k < 0:
        raise fail("--max-tokens must be at least 1 and --top-k at least 0")
    if prompt_file is not None:
        try:
            prompt = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"{prompt_file}: cannot read the prompt ({e})") from None
    assert prompt is not None
    from rwkvctl.generate import DecodeSettings, SamplingConfig
    from rwkvctl.lifecycle.infer import open_engine
    from rwkvctl.lifecycle.models import parse_dtype
    from rwkvctl.train.engine import resolve_device

    device = str(resolve_device(device, setting="--device"))  # a missing GPU is one line, before any loading
    with console.status("loading the model..."):
        engine, _ = open_engine(model_path, tokenizer=tokenizer, dtype=parse_dtype(dtype), device=device,
                                keep_quantized=keep_quantized)
    ids = engine.tokenizer.encode(prompt)
    if not ids:
        raise fail("the prompt is empty")
    settings = DecodeSettings(
        SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k),
        max_tokens=max_tokens,
        stop_texts=tuple(stop or ()),
        stop_tokens=(engine.eod_id,),
        seed=seed,
    )
    # a terminal never gets raw control characters; a pipe or file gets the text exactly as generated
    show = clean if console.is_terminal else (lambda t: t)
    out = console.file
    out.write(show(prompt))
    for piece in engine.generate(ids, settings):
        out.write(show(piece))
        out.flush()
    out.write("\n")
    out.flush()
