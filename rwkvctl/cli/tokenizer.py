"""`rwkvctl tokenizer train|encode|decode`: SentencePiece training and quick tokenizer checks."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import typer

from rwkvctl.cli._common import app, console, handles_errors
from rwkvctl.cli.terminal import shown

tokenizer_app = typer.Typer(
    help="Train a SentencePiece tokenizer, or encode/decode with any tokenizer.", no_args_is_help=True
)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
@handles_errors
def train_cmd(
    inputs: list[str] = typer.Argument(..., help="Corpus files, directories or globs (same formats as prepare)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Model file to write (e.g. tok.model; tok.vocab is written too)."
    ),
    vocab_size: int = typer.Option(32000, help="Vocabulary size, 259..65536 (includes 256 byte-fallback pieces)."),
    sample_mb: float = typer.Option(200.0, help="Train on at most this many MB of text from the inputs."),
    text_key: str = typer.Option("text", help="JSON field holding the document text."),
    force: bool = typer.Option(False, "--force", help="Replace the .model/.vocab files if they exist."),
) -> None:
    """Train a BPE SentencePiece model with byte fallback (use it with `prepare --tokenizer spm:MODEL`)."""
    from rwkvctl.data.corpus import Doc, DocumentStream, expand_inputs
    from rwkvctl.data.tokenizer import train_sentencepiece
    from rwkvctl.errors import DataError

    files = expand_inputs(inputs)
    if not files:
        raise DataError(f"no input files matched {' '.join(inputs)!r}")

    def texts():
        for f in files:
            for item in DocumentStream(f, text_key=text_key):
                if isinstance(item, Doc):
                    yield item.data.decode("utf-8")

    with console.status("training SentencePiece (BPE, byte fallback)..."):
        stats = train_sentencepiece(
            texts(), out, vocab_size=vocab_size, max_sample_bytes=int(sample_mb * 1e6), overwrite=force
        )
    console.print(
        f"wrote [bold]{shown(str(out))}[/] (vocab {stats['vocab_size']}, trained on {stats['docs']:,} docs, "
        f"{stats['bytes'] / 1e6:.1f} MB); use: rwkvctl prepare ... --tokenizer spm:{shown(str(out))}"
    )


@tokenizer_app.command("encode")
@handles_errors
def encode_cmd(
    text: str = typer.Argument(..., help="Text to encode."),
    tokenizer: str = typer.Option("world", help="'world' or 'spm:PATH'."),
) -> None:
    """Print the token ids of TEXT and the pieces they stand for."""
    from rwkvctl.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    ids = tok.encode(text)
    console.print(f"{len(ids)} tokens: {ids}", markup=False)
    # Decoded pieces are user text: never parsed as Rich markup.
    console.print(" | ".join(repr(tok.decode([i])) for i in islice(ids, 200)), markup=False, highlight=False)


@tokenizer_app.command("decode")
@handles_errors
def decode_cmd(
    ids: list[int] = typer.Argument(..., help="Token ids."),
    tokenizer: str = typer.Option("world", help="'world' or 'spm:PATH'."),
) -> None:
    """Print the text for a list of token ids."""
    from rwkvctl.data.tokenizer import load_tokenizer

    console.print(repr(load_tokenizer(tokenizer).decode(ids)), markup=False, highlight=False)
