"""Tokenizer selection (`world`, `spm:PATH`) and the SentencePiece tokenizer/trainer.

Every tokenizer offers the same small surface that `prepare`, `inspect` and chat need: `name`, `vocab_size`,
`eod_id`, `backend`, `backend_note`, `encode(str) -> list[int]`, `decode(ids) -> str`, `encode_batch(bytes, offsets)`
and `describe()` (recorded in the dataset manifest so a dataset says how it was tokenized).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from rwkvctl.data.tokenizer_world import WorldTokenizer
from rwkvctl.errors import TokenizerError
from rwkvctl.fs import publish, scratch_dir

MAX_SPM_VOCAB = 65536


class SentencePieceTokenizer:
    """A SentencePiece model; its `eos` id is the end-of-document token (our trainer sets it to 0)."""

    backend = "sentencepiece"
    backend_note = ""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such SentencePiece model (train one with `rwkvctl tokenizer train`)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.name = f"spm:{self.path.name}"
        self.vocab_size = int(self.sp.get_piece_size())
        self.eod_id = int(self.sp.eos_id())
        if self.eod_id < 0:
            raise TokenizerError(f"{self.path}: model has no end-of-sentence id; retrain it with an eos piece")

    def describe(self) -> dict:
        return {
            "name": "sentencepiece",
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "model": self.path.name,
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
        }

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = [int(i) for i in np.asarray(ids).ravel() if int(i) != self.eod_id]
        if arr and (min(arr) < 0 or max(arr) >= self.vocab_size):
            raise TokenizerError(f"token id outside the SentencePiece vocab 0..{self.vocab_size - 1}")
        return self.sp.decode(arr)

    def encode_batch(self, data: bytes, offsets: np.ndarray, append_eod: bool = True) -> tuple[np.ndarray, np.ndarray]:
        texts = [data[offsets[d] : offsets[d + 1]].decode("utf-8") for d in range(len(offsets) - 1)]
        encoded = self.sp.encode(texts)
        if append_eod:
            encoded = [e + [self.eod_id] for e in encoded]
        counts = np.array([len(e) for e in encoded], dtype=np.int64)
        flat = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(counts.sum()))
        return flat, counts


@lru_cache(maxsize=4)
def _world(backend: str) -> WorldTokenizer:
    # Immutable once built, so one instance per process is shared (building it costs ~0.3 s).
    return WorldTokenizer(backend=backend)


def load_tokenizer(spec: str = "world") -> WorldTokenizer | SentencePieceTokenizer:
    """`world` (default), `world-python` (no C++), or `spm:PATH` for a SentencePiece model."""
    if spec in ("world", "rwkv", "world-native"):
        return _world("native" if spec == "world-native" else "auto")
    if spec == "world-python":
        return _world("python")
    if spec.startswith("spm:"):
        return SentencePieceTokenizer(spec[4:])
    if spec.endswith(".model") and Path(spec).is_file():
        return SentencePieceTokenizer(spec)
    raise TokenizerError(f"unknown tokenizer {spec!r}: use 'world' or 'spm:PATH/TO/model.model'")


def train_sentencepiece(
    texts: Iterable[str],
    out_model: str | Path,
    *,
    vocab_size: int = 32000,
    max_sample_bytes: int = 200_000_000,
    character_coverage: float = 0.9995,
    threads: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Train a BPE SentencePiece model with byte fallback on (a prefix of) `texts`.

    Text is kept as-is (identity normalisation, no dummy prefix, whitespace preserved) so that
    decode(encode(x)) == x; unseen characters fall back to the 256 byte pieces. Ids: eos (end of document)
    = 0, unk = 1, no bos/pad. Writes `out_model` (and `.vocab` next to it) atomically, refusing to replace
    existing files unless `overwrite`; returns stats.
    """
    import sentencepiece as spm

    if not 256 + 3 <= vocab_size <= MAX_SPM_VOCAB:
        raise TokenizerError(
            f"vocab size {vocab_size} out of range: need 259..{MAX_SPM_VOCAB} (256 byte pieces + specials)"
        )
    out_model = Path(out_model)
    out_vocab = out_model.with_suffix(".vocab")
    if not overwrite:
        for p in (out_model, out_vocab):
            if p.exists():
                raise TokenizerError(f"{p}: already exists; pass --force to overwrite it")
    n_docs = n_bytes = 0
    with scratch_dir(out_model.parent, ".spm-train-") as tmp:
        sample = tmp / "sample.txt"
        with open(sample, "w", encoding="utf-8") as f:
            for text in texts:
                # SentencePiece reads one sentence per line, so every line of a document is a sentence.
                lines = [ln for ln in text.splitlines() if ln.strip()]
                if not lines:
                    continue
                chunk = "\n".join(lines) + "\n"
                f.write(chunk)
                n_docs += 1
                n_bytes += len(chunk.encode("utf-8", "replace"))
                if n_bytes >= max_sample_bytes:
                    break
        if n_docs == 0:
            raise TokenizerError("no text to train the SentencePiece model on (inputs empty?)")
        prefix = tmp / "model"
        try:
            spm.SentencePieceTrainer.train(
                input=str(sample),
                model_prefix=str(prefix),
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=character_coverage,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                max_sentence_length=1 << 16,
                eos_id=0,
                unk_id=1,
                bos_id=-1,
                pad_id=-1,
                num_threads=threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
        publish([(prefix.with_suffix(".model"), out_model), (prefix.with_suffix(".vocab"), out_vocab)])
    return {"docs": n_docs, "bytes": n_bytes, "vocab_size": vocab_size, "model": str(out_model)}
