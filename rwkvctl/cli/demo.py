"""`rwkvctl demo`: the whole lifecycle on the bundled sample, end to end on a CPU in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.rule import Rule

from rwkvctl.cli._common import app, console, handles_errors
from rwkvctl.cli.inspect_cmd import inspect_command
from rwkvctl.cli.model_cmds import init_command

PROMPT = "def main():\n"


def _stage(title: str) -> None:
    console.print(Rule(f"[bold cyan]{title}"))


@app.command("demo")
@handles_errors
def demo_command(
    workdir: Annotated[Path, typer.Argument(help="Where the demo writes its model files.")] = Path("runs/demo"),
    tokens: Annotated[int, typer.Option(help="Tokens to generate at the end.")] = 32,
) -> None:
    """Create a tiny RWKV-5.2 model, inspect it, and run it in both sequence and RNN form."""
    import torch

    from rwkvctl.data.tokenizer import load_tokenizer
    from rwkvctl.generate import SamplingConfig, generate
    from rwkvctl.lifecycle.models import load_model

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "tiny-init.pth"

    _stage("1. init: a freshly initialised tiny model (RWKV-LM x052 names and shapes)")
    init_command(out=ckpt, preset_name="tiny", force=True)

    _stage("2. inspect")
    inspect_command(path=ckpt, tensors=True, limit=12)

    _stage("3. run: sequence form vs RNN form, then generation")
    model, _ = load_model(ckpt)
    tokenizer = load_tokenizer("world")
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        seq_logits, _ = model(torch.tensor([ids]))
        state, rnn_logits = None, []
        for t in ids:
            logits, state = model.step(torch.tensor([t]), state)
            rnn_logits.append(logits[0])
    diff = (seq_logits[0] - torch.stack(rnn_logits)).abs().max().item()
    console.print(f"prompt {PROMPT!r} -> {len(ids)} World tokens {ids}")
    console.print(f"max |sequence - RNN| logits difference: {diff:.2e} (fp32)")
    out = list(generate(model, ids, tokens, SamplingConfig(temperature=1.0, top_p=0.9), seed=0))
    console.print(Panel(tokenizer.decode(out) if out else "(end of document)", title="untrained model says"))
