"""Small real-text JSONL.zst corpora for the prepare tests (fast to build; stdlib sources as text)."""

from __future__ import annotations

import argparse
import json
import random
import textwrap
from pathlib import Path

import zstandard

SOURCES = ("RedPajamaGithub", "RedPajamaC4", "RedPajamaBook")
EXTRA = ["naïve café 中文 日本語 🎉", "Ωμέγα — “quotes” … \t tabs", "\x00 control \x1b bytes"]


def make_corpus(root: Path, n_files: int = 3, docs_per_file: int = 40, seed: int = 0) -> list[dict]:
    """Write train/chunk1/example_train_{i}.jsonl.zst; return every row (text, source) in file order."""
    rng = random.Random(seed)
    text = Path(argparse.__file__).read_text(encoding="utf-8") + Path(textwrap.__file__).read_text(encoding="utf-8")
    rows = []
    for f in range(n_files):
        lines = []
        for _ in range(docs_per_file):
            start = rng.randrange(len(text) - 4000)
            doc = text[start : start + rng.randrange(100, 3000)] + " " + rng.choice(EXTRA)
            row = {"text": doc, "meta": {"redpajama_set_name": rng.choice(SOURCES)}}
            rows.append(row)
            lines.append(json.dumps(row))
        path = root / "train" / "chunk1" / f"example_train_{f}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return rows


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), for byte-identical comparisons of outputs."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
