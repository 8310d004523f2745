"""`rwkvctl chat`: talk to a model in RNN mode; the state carries over between turns and can be saved."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from rwkvctl.cli._common import (
    DeviceOption,
    DtypeOption,
    TokenizerOption,
    app,
    console,
    fail,
    handles_errors,
    human,
    print_error,
)
from rwkvctl.cli.chat_input import MessageReader
from rwkvctl.cli.terminal import clean, shown
from rwkvctl.errors import RwkvctlError

HELP = (
    "/retry  new reply to the last message    /reset  back to the start\n"
    "/save PATH, /load PATH  conversation state   /info  tokens seen, state size\n"
    "/quit or Ctrl-D  end (Ctrl-C stops a reply and forgets that turn)\n"
    "Up/Down: earlier messages; a message spans lines when pasted, with Esc-Enter, or with a trailing \\"
)


@app.command("chat")
@handles_errors
def chat_command(
    model_path: Annotated[Path, typer.Argument(help="Checkpoint (.pth or .safetensors, ours or RWKV-LM's).")],
    message: Annotated[
        list[str] | None,
        typer.Option("--message", "-m", help="Send this message and print the reply (repeatable); no prompt."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="Instructions or persona, fed once as 'System: ...'.")] = None,
    user: Annotated[str, typer.Option(help="The user's role name in the prompt format.")] = "User",
    bot: Annotated[str, typer.Option(help="The model's role name in the prompt format.")] = "Assistant",
    tokenizer: TokenizerOption = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.3,
    top_k: Annotated[int, typer.Option(help="Keep only the k most likely tokens (0 = off).")] = 0,
    presence: Annotated[float, typer.Option(help="Penalty for any token already in the reply.")] = 0.0,
    frequency: Annotated[float, typer.Option(help="Penalty per (decayed) occurrence in the reply.")] = 1.0,
    decay: Annotated[float, typer.Option(help="Per-token decay of the occurrence counts.")] = 0.996,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 500,
    seed: Annotated[int | None, typer.Option(help="Random seed (replies repeat exactly with the same seed).")] = None,
    load: Annotated[Path | None, typer.Option("--load-state", help="Start from a saved conversation state.")] = None,
    save: Annotated[Path | None, typer.Option("--save-state", help="Save the state here when the chat ends.")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "fp32",
    keep_quantized: Annotated[
        bool,
        typer.Option(
            "--keep-quantized",
            help="A quantized model's weights stay packed (~4.5 bits each in memory; decoded by a compiled kernel).",
        ),
    ] = False,
) -> None:
    """Chat with a model in RNN mode: constant memory however long the conversation, state save/load."""
    finite = all(math.isfinite(v) for v in (temperature, top_p, presence, frequency, decay))
    if not finite or not 0 < top_p <= 1 or temperature < 0 or top_k < 0 or max_tokens < 1 or not 0 < decay <= 1:
        raise fail(
            "need finite values with 0 < --top-p <= 1, --temperature >= 0, --top-k >= 0, --max-tokens >= 1 "
            "and 0 < --decay <= 1"
        )
    if system is not None and load is not None:
        raise fail("--system is fed at the start of a new chat; a --load-state conversation already has its start")
    conv = _open(model_path, tokenizer, device, dtype, load, locals())
    stats = {"turns": 0, "tokens": 0, "seconds": 0.0}
    if message:
        for text in message:
            pieces = conv.say(text)
            console.print(f"[bold green]{shown(conv.settings.user)}:[/] {shown(text)}", emoji=False)
            if not _print_reply(conv, pieces, stats):
                break  # Ctrl-C: stop, do not go on to the next message
    else:
        _interactive(conv, stats)
    # Saved only after a clean end: an error mid-run must not overwrite a good state file with a bad one.
    if save is not None:
        if conv.state is None:
            console.print("[yellow]nothing to save: no turn was completed[/]")
        else:
            conv.save(save.expanduser())
            console.print(f"[dim]state saved to {shown(str(save))}[/]")
    if stats["turns"]:
        rate = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
        console.print(
            f"[dim]{stats['turns']} replies, {stats['tokens']} tokens at {rate:.1f} tokens/s; "
            f"{conv.tokens_seen} tokens seen, state {human(conv.state_bytes(), 'B')} (constant)[/]"
        )


def _open(model_path: Path, tokenizer: str | None, device: str, dtype: str, load: Path | None, opts: dict) -> Any:
    from rwkvctl.generate import Penalties, SamplingConfig
    from rwkvctl.lifecycle.chat import ChatSettings, Conversation
    from rwkvctl.lifecycle.infer import open_engine
    from rwkvctl.lifecycle.models import parse_dtype
    from rwkvctl.train.engine import resolve_device

    device = str(resolve_device(device, setting="--device"))  # a missing GPU is one line, before any loading
    with console.status(f"loading {shown(str(model_path))}..."):
        engine, _ = open_engine(model_path, tokenizer=tokenizer, dtype=parse_dtype(dtype), device=device,
                                keep_quantized=opts["keep_quantized"])
    settings = ChatSettings(
        user=opts["user"],
        bot=opts["bot"],
        system=opts["system"],
        sampling=SamplingConfig(temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"]),
        penalties=Penalties(presence=opts["presence"], frequency=opts["frequency"], decay=opts["decay"]),
        max_reply_tokens=opts["max_tokens"],
        seed=opts["seed"],
    )
    conv = Conversation(engine.model, engine.tokenizer, settings)
    if load is not None:
        conv.load(load)
        console.print(f"[dim]continuing from {shown(str(load))} ({conv.tokens_seen} tokens seen)[/]")
    return conv


def _print_reply(conv: Any, pieces: Iterator[str], stats: dict) -> bool:
    """Stream a reply to the terminal as it is generated; False when Ctrl-C stopped it (the turn is undone)."""
    console.print(f"[bold cyan]{shown(conv.settings.bot)}:[/] ", end="")
    try:
        for piece in pieces:  # model output: control characters are shown, never obeyed (cli/terminal.py)
            console.print(clean(piece), end="", markup=False, highlight=False, emoji=False, soft_wrap=True)
            console.file.flush()
    except KeyboardInterrupt:
        conv.cancel()
        console.print("\n[yellow](stopped; this turn is forgotten)[/]")
        return False
    console.print()
    reply = conv.last_reply
    stats["turns"] += 1
    stats["tokens"] += reply.tokens
    stats["seconds"] += reply.seconds
    if reply.stopped == "max_tokens":
        console.print(f"[dim](reply cut at --max-tokens {conv.settings.max_reply_tokens})[/]")
    return True


def _interactive(conv: Any, stats: dict) -> None:
    console.print(f"[dim]{shown(HELP)}[/]")
    user = shown(conv.settings.user)
    reader = MessageReader(console)
    while True:
        try:
            line = reader.read(f"[bold green]{user}:[/] ", clean(conv.settings.user) + ":")
            if not sys.stdin.isatty():  # piped input is not echoed: show what was said
                console.print(clean(line), markup=False, highlight=False, emoji=False)
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        try:
            if not line.startswith("/"):
                _print_reply(conv, conv.say(line), stats)  # the typed line is already on screen
            elif not _command(conv, line, stats):
                return
        except RwkvctlError as e:  # a bad /load or /save path must not end the chat
            print_error(str(e))


def _command(conv: Any, line: str, stats: dict) -> bool:
    """Run one /command; False ends the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        console.print(f"[dim]{shown(HELP)}[/]")
    elif name == "/reset":
        conv.reset()
        console.print("[dim](back to the start)[/]")
    elif name == "/retry":
        _print_reply(conv, conv.retry(), stats)
    elif name in ("/save", "/load"):
        if not arg:
            console.print(f"[yellow]usage: {name} PATH[/]")
        elif name == "/save":
            conv.save(Path(arg).expanduser())
            console.print(f"[dim]state saved to {shown(arg)}[/]")
        else:
            conv.load(Path(arg).expanduser())
            console.print(f"[dim]loaded {shown(arg)} ({conv.tokens_seen} tokens seen)[/]")
    elif name == "/info":
        console.print(
            f"[dim]{conv.tokens_seen} tokens seen, {len(conv.transcript)} transcript entries, "
            f"state {human(conv.state_bytes(), 'B')} (does not grow with the conversation)[/]"
        )
    else:
        console.print(f"[yellow]unknown command {shown(name)}; /help lists them[/]")
    return True
