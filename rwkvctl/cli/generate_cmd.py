"""`rwkvctl generate`: continue a prompt in RNN mode, streaming the text as it is produced."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from rwkvctl.cli._common import app, console, fail, handles_errors
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
    tokenizer: Annotated[str, typer.Option(help="'world' or spm:PATH (must match the model).")] = "world",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (fp16 needs a GPU).")] = "fp32",
    keep_quantized: Annotated[
        bool, typer.Option("--keep-quantized", help="Keep a quantized model's weights packed (less memory).")
    ] = False,
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
    from rwkvctl.data.tokenizer import load_tokenizer
    from rwkvctl.generate import SamplingConfig, TextStream, generate
    from rwkvctl.lifecycle.models import load_model, parse_dtype
    from rwkvctl.train.engine import resolve_device

    device = str(resolve_device(device, setting="--device"))  # a missing GPU is one line, before any loading
    with console.status("loading the model..."):
        model, _ = load_model(model_path, dtype=parse_dtype(dtype), device=device, keep_quantized=keep_quantized)
        tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise fail(f"{model_path}: {model.cfg.vocab_size} vocabulary rows, but the tokenizer has {tok.vocab_size} ids")
    ids = tok.encode(prompt)
    if not ids:
        raise fail("the prompt is empty")
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
    stream = TextStream(getattr(tok, "decode_bytes", None), tok.decode)
    stops = [x for x in (stop or []) if x]
    # a terminal never gets raw control characters; a pipe or file gets the text exactly as generated
    show = clean if console.is_terminal else (lambda t: t)
    out = console.file
    out.write(show(prompt))
    text, written = "", 0
    for token in generate(model, ids, max_tokens, sampling, seed=seed, stop_tokens=(tok.eod_id,)):
        text += stream.push(token)
        hits = [i for i in (text.find(x, max(written - len(x), 0)) for x in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            break
        # hold back a tail that could still become a stop text
        held = max((k for x in stops for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
        out.write(show(text[written : len(text) - held]))
        out.flush()
        written = len(text) - held
    else:
        text += stream.flush()
    out.write(show(text[written:]) + "\n")
    out.flush()
