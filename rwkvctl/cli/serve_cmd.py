"""`rwkvctl serve`: an OpenAI-compatible server (needs `pip install 'rwkvctl[serve]'`)."""

from __future__ import annotations

import ipaddress
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
    shown,
)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
@handles_errors
def serve_command(
    model_path: Annotated[Path, typer.Argument(help="Checkpoint (.pth or .safetensors, plain or quantized).")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="RWKVCTL_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="The model id clients ask for (default: file stem).")] = None,
    cache_mb: Annotated[int, typer.Option(help="Memory for cached conversation states (0: no cache).")] = 1024,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Spill states evicted from memory here (safetensors).")
    ] = None,
    cache_disk_mb: Annotated[int, typer.Option(help="Disk budget of --cache-dir.")] = 4096,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together in one batched step.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting or running at most; more get HTTP 429.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 32768,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    chat_max_tokens: Annotated[int, typer.Option(help="Reply limit when a chat request gives none.")] = 512,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "fp32",
    keep_quantized: KeepQuantizedOption = False,
) -> None:
    """Serve the model over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions, /health,
    /metrics). States at the end of each prompt and reply are cached, so the next turn of a conversation ingests
    only its new message; concurrent requests share one batched decode step per token."""
    if not 0 < port < 65536:
        raise fail(f"--port must be 1-65535, got {port}")
    for flag, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-prompt-tokens",
                        max_prompt_tokens), ("--max-tokens-limit", max_tokens_limit),
                        ("--chat-max-tokens", chat_max_tokens)):
        if value < 1:
            raise fail(f"{flag} must be at least 1, got {value}")
    if cache_mb < 0 or cache_disk_mb < 0:
        raise fail("--cache-mb and --cache-disk-mb must be >= 0")
    if not _loopback(host) and not api_key:
        raise fail(f"binding {host} exposes the server beyond this machine: give --api-key (or RWKVCTL_API_KEY)")
    try:
        from rwkvctl.serve.app import ServeSettings, build_server, serve_forever
        from rwkvctl.serve.prefix_cache import PrefixStateCache
    except ImportError as e:
        raise fail(f"serve needs its extra ({e.name} is missing): pip install 'rwkvctl[serve]'") from None
    from rwkvctl.lifecycle.infer import open_engine
    from rwkvctl.lifecycle.models import parse_dtype
    from rwkvctl.train.engine import resolve_device

    device = str(resolve_device(device, setting="--device"))
    with console.status(f"loading {shown(str(model_path))}..."):
        engine, _ = open_engine(model_path, tokenizer=tokenizer, dtype=parse_dtype(dtype), device=device,
                                keep_quantized=keep_quantized)
    name = model_name or model_path.name.split(".")[0]
    cache = None
    if cache_mb > 0:
        cache = PrefixStateCache(cache_mb << 20, spill_dir=cache_dir, spill_bytes=cache_disk_mb << 20)
    settings = ServeSettings(name, api_key, max_prompt_tokens, max_tokens_limit, chat_max_tokens)
    server, scheduler = build_server(engine, settings, cache=cache, max_batch=max_batch, max_queue=max_queue)
    where = f"http://{host}:{port}/v1"
    console.print(f"serving [bold]{shown(name)}[/] at {shown(where)} (Ctrl-C stops)"
                  + ("" if api_key else " [dim]no API key: loopback only[/]"))
    serve_forever(server, scheduler, host, port)
    c = scheduler.counters
    console.print(f"[dim]served {c.completed} requests, {c.completion_tokens} tokens generated, "
                  f"{c.prompt_tokens} prompt tokens ingested"
                  + (f", {cache.stats.cached_tokens} prompt tokens from the cache ({cache.stats.hits} hits)"
                     if cache is not None else "") + "[/]")
