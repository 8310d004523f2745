"""`rwkvctl demo`: the whole lifecycle on the bundled sample corpus, end to end on a CPU in minutes.

Each stage runs the real command through the same CLI a user types, so the demo doubles as a smoke
test of the commands and shows their progress bars and summaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

from rwkvctl.cli._common import app, console, handles_errors, live_output
from rwkvctl.cli.terminal import clean, shown

PROMPT = "def main():\n"


def _heading(title: str) -> None:
    # a rule spans the console: on a terminal that is its width; in a log, a plain line is the readable form
    console.print(Rule(f"[bold cyan]{title}") if live_output() else f"== {title} ==", markup=False)


def _run(title: str, argv: list[str]) -> None:
    _heading(title)
    console.print(Text(clean(f"$ rwkvctl {' '.join(argv)}"), style="dim"))
    code = app(argv, standalone_mode=False)
    if code:  # the failing command already printed its one-line error
        raise typer.Exit(code)


@app.command("demo")
@handles_errors
def demo_command(
    workdir: Annotated[Path, typer.Argument(help="Where the demo writes its corpus, dataset, run and plot.")] = Path(
        "runs/demo"
    ),
    steps: Annotated[int, typer.Option(help="Training steps (about 0.5-1 s each on a 2-core CPU).")] = 100,
    tokens: Annotated[int, typer.Option(help="Tokens to generate at the end.")] = 48,
) -> None:
    """Run the lifecycle on the bundled sample: corpus -> prepare -> train -> plot -> inspect -> generate ->
    quantize -> chat."""
    corpus, data, run = workdir / "corpus", workdir / "data", workdir / "run"
    _run("1. a small real-text corpus in SlimPajama's layout", ["sample-corpus", str(corpus)])
    _run(
        "2. prepare: World-tokenize into binidx shards + manifest",
        [
            "prepare",
            str(corpus / "train"),
            "--val-input",
            str(corpus / "validation"),
            "-o",
            str(data),
            "--ctx-len",
            "64",
        ],
    )
    _run(
        f"3. train the tiny model (L2 D128) for {steps} steps on the CPU",
        [
            "train", "--preset", "tiny", "--data", str(data), "--run-dir", str(run), "--ctx-len", "64",
            "--micro-bsz", "8", "--max-steps", str(steps), "--lr-init", "2e-3", "--lr-final", "2e-4",
            "--warmup-steps", "10", "--val-every", str(max(steps // 4, 1)), "--save-every", str(steps),
            "--device", "cpu", "--precision", "fp32", "--resume",  # a rerun continues instead of refusing
        ],
    )  # fmt: skip
    _run("4. plot the loss curve", ["plot", str(run), "-o", str(workdir / "loss.png")])
    from rwkvctl.train.run_dir import RunDir

    latest = RunDir(run).latest()
    if latest is None or not latest.export.is_file():
        raise typer.Exit(1)
    exported = latest.export
    _run("5. inspect the exported RWKV-LM checkpoint", ["inspect", str(exported), "--no-tensors"])
    _heading("6. generate in RNN mode from the trained model")
    _generate(exported, tokens)
    quantized = workdir / "model-q4.safetensors"
    eval_text = workdir / "eval.txt"
    eval_text.write_text(_validation_text(corpus), encoding="utf-8")
    _run(
        "7. quantize to 4 bits and compare with the original on validation text",
        ["quantize", str(exported), str(quantized), "--eval", str(eval_text), "--eval-tokens", "512", "--force"],
    )
    _run(
        "8. chat with the 4-bit model (RNN mode, one scripted turn)",
        ["chat", str(quantized), "-m", "def main():", "--max-tokens", str(tokens), "--seed", "0"],
    )


def _validation_text(corpus: Path) -> str:
    from rwkvctl.data.corpus import Doc, DocumentStream

    texts: list[str] = []
    for path in sorted((corpus / "validation").rglob("*.jsonl*")):
        texts += [d.data.decode() for d in DocumentStream(str(path)) if isinstance(d, Doc)]
        if sum(map(len, texts)) > 20_000:
            break
    return "\n\n".join(texts)[:20_000]


def _generate(checkpoint: Path, n_tokens: int) -> None:
    import torch

    from rwkvctl.data.tokenizer import load_tokenizer
    from rwkvctl.generate import SamplingConfig, generate
    from rwkvctl.lifecycle.models import load_model

    model, _ = load_model(checkpoint)
    tokenizer = load_tokenizer("world")
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        seq_logits, _ = model(torch.tensor([ids]))
        state, rnn_logits = None, []
        for t in ids:
            logits, state = model.step(torch.tensor([t]), state)
            rnn_logits.append(logits[0])
    diff = (seq_logits[0] - torch.stack(rnn_logits)).abs().max().item()
    console.print(shown(f"prompt {PROMPT!r} = World tokens {ids}; max |sequence - RNN| logit difference {diff:.1e}"))
    out = list(generate(model, ids, n_tokens, SamplingConfig(temperature=0.8, top_p=0.9), seed=0))
    text = tokenizer.decode(out) if out else "(end of document)"
    title = shown(f"{checkpoint.name} continues the prompt")
    console.print(Panel(Text(clean(PROMPT + text)), title=title, expand=False))  # not stretched to a log's width
