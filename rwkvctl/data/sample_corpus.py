"""A small real-text corpus in SlimPajama's exact layout, built from the Python standard library.

Every machine with Python has the standard library's sources, docstrings and `pydoc_data` help topics, so
tests and the README quick-start can run without any download. Files and fields match SlimPajama-627B:

    train/chunk1/example_train_{i}.jsonl.zst
    validation/chunk1/example_holdout_{i}.jsonl.zst
    {"text": "...", "meta": {"redpajama_set_name": "RedPajamaGithub"}}

Sources: RedPajamaGithub (module sources), RedPajamaWikipedia (module docstrings as articles),
RedPajamaStackExchange (function docstrings as Q&A), RedPajamaBook (pydoc help topics, long prose),
RedPajamaC4 (class docstrings, short web-like paragraphs). Output is deterministic given `seed` on a given
Python installation (~5 MB of text, ~1.5-2M World tokens, ~1.5 MB compressed).
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_write_bytes

TRAIN_FILES = 4
VAL_FILES = 1
TARGET_TEXT_BYTES = 5_000_000  # train + validation text, before compression
VAL_SHARE = 0.05
MAX_FILES = 450  # stdlib modules sampled (keeps generation to a few seconds)
MAX_DOC_BYTES = 12_000


def _stdlib_modules(rng: random.Random) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"{root}: Python standard library sources not found; cannot build the sample corpus")
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3", "ensurepip"}
    files = sorted(
        p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.stat().st_size > 2000
    )
    rng.shuffle(files)
    return sorted(files[:MAX_FILES])


def _cut(text: str, limit: int = MAX_DOC_BYTES) -> str:
    """Trim to about `limit` characters at a line boundary, so code documents stay whole lines."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit]


def _module_docs(path: Path, root: Path) -> Iterator[tuple[str, str]]:
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return
    name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    yield "RedPajamaGithub", _cut(src)
    doc = ast.get_docstring(tree)
    if doc and len(doc) > 120:
        yield "RedPajamaWikipedia", f"{name}\n\n{doc}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 160 and not node.name.startswith("_"):
                args = ", ".join(a.arg for a in node.args.args)
                yield (
                    "RedPajamaStackExchange",
                    (f"Q: What does {name}.{node.name}({args}) do, and how should I call it?\n\nA: {d}"),
                )
        elif isinstance(node, ast.ClassDef):
            d = ast.get_docstring(node)
            if d and len(d) > 80:
                yield "RedPajamaC4", f"{node.name} in {name}. {d}"


def _book_docs() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the other sources still work
        return
    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) > 400:
            yield "RedPajamaBook", _cut(text, 3 * MAX_DOC_BYTES)


def sample_documents(seed: int = 0) -> list[tuple[str, str]]:
    """(source, text) pairs in a seeded order, about TARGET_TEXT_BYTES in all."""
    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = list(_book_docs())
    for path in _stdlib_modules(rng):
        docs.extend(_module_docs(path, root))
    rng.shuffle(docs)
    out, total = [], 0
    for source, text in docs:
        if total >= TARGET_TEXT_BYTES:
            break
        out.append((source, text))
        total += len(text.encode("utf-8"))
    return out


def write_sample_corpus(root: str | Path, *, seed: int = 0) -> list[Path]:
    """Write the corpus under `root` in SlimPajama's layout; return the written `.jsonl.zst` paths (sorted)."""
    import zstandard

    root = Path(root)
    rng = random.Random(seed + 1)
    train: list[list[str]] = [[] for _ in range(TRAIN_FILES)]
    val: list[list[str]] = [[] for _ in range(VAL_FILES)]
    for source, text in sample_documents(seed):
        line = json.dumps({"text": text, "meta": {"redpajama_set_name": source}})
        bucket = val if rng.random() < VAL_SHARE else train
        bucket[rng.randrange(len(bucket))].append(line)
    cctx = zstandard.ZstdCompressor(level=3)
    written = []
    for split_dir, stem, groups in (("train", "example_train", train), ("validation", "example_holdout", val)):
        for i, lines in enumerate(groups):
            path = root / split_dir / "chunk1" / f"{stem}_{i}.jsonl.zst"
            atomic_write_bytes(path, cctx.compress(("\n".join(lines) + "\n").encode("utf-8")))
            written.append(path)
    return sorted(written)
