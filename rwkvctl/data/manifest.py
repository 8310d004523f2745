"""`manifest.json`: what a prepared dataset contains, written atomically by `rwkvctl prepare`.

It lists every shard (a binidx prefix relative to the manifest, its split, token/doc counts, per-source
counts and the input file it came from), the tokenizer, per-split per-source totals, the inputs done, and
every bad-input problem found. Trainers call `resolve_prefixes()` to get the shard list for a split; it
also accepts a plain RWKV-LM binidx prefix, so data made by other tools works too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rwkvctl.data.binidx import split_prefix
from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_write_text

MANIFEST_NAME = "manifest.json"
FORMAT = "rwkvctl-binidx-manifest"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass
class SourceCounts:
    """Counts for one source (e.g. RedPajamaGithub) within a shard or split."""

    docs: int = 0
    tokens: int = 0
    bytes: int = 0

    def add(self, other: SourceCounts) -> None:
        self.docs += other.docs
        self.tokens += other.tokens
        self.bytes += other.bytes


@dataclass
class BadInput:
    """One kind of problem in one input file: how often, and the first line where it happened."""

    input: str
    kind: str  # corrupt_compression | truncated_compression | malformed_json | missing_text | non_string_text |
    # empty_text | invalid_utf8 | roundtrip_mismatch | unreadable
    count: int
    first_line: int
    detail: str = ""


@dataclass
class Shard:
    prefix: str  # relative to the manifest's directory, POSIX separators
    split: str  # "train" | "val"
    input: str  # the input file it was made from
    docs: int
    tokens: int
    sources: dict[str, SourceCounts] = field(default_factory=dict)


@dataclass
class Manifest:
    tokenizer: dict[str, Any]  # {"name": "world", "vocab_size": 65536, "eod_id": 0, "sha256": ...}
    dtype: str  # "uint16" | "int32"
    shards: list[Shard] = field(default_factory=list)
    inputs_done: list[str] = field(default_factory=list)
    bad_inputs: list[BadInput] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # seed, val_fraction, source weights, text key, ...
    rwkv_lm: dict[str, Any] = field(default_factory=dict)  # {"ctx_len", "magic_prime", "my_exit_tokens"} if asked
    encoder: dict[str, str] = field(default_factory=dict)  # {"backend", "note"} of the run that wrote it
    format: str = FORMAT
    version: int = FORMAT_VERSION

    # --- derived views -------------------------------------------------------------------------------------------
    def shards_for(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.shards_for(split))

    def docs(self, split: str = "train") -> int:
        return sum(s.docs for s in self.shards_for(split))

    def source_totals(self, split: str = "train") -> dict[str, SourceCounts]:
        out: dict[str, SourceCounts] = {}
        for s in self.shards_for(split):
            for name, c in s.sources.items():
                out.setdefault(name, SourceCounts()).add(c)
        return dict(sorted(out.items()))

    # --- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = {
            split: {
                "docs": self.docs(split),
                "tokens": self.tokens(split),
                "sources": {k: asdict(v) for k, v in self.source_totals(split).items()},
            }
            for split in SPLITS
        }
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT:
            raise DataError(f"{where}: not an rwkvctl dataset manifest (format={d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise DataError(f"{where}: unsupported manifest version {d.get('version')!r} (expected {FORMAT_VERSION})")
        try:
            shards = [
                Shard(**{**s, "sources": {k: SourceCounts(**v) for k, v in s.get("sources", {}).items()}})
                for s in d["shards"]
            ]
            return cls(
                tokenizer=dict(d["tokenizer"]),
                dtype=str(d["dtype"]),
                shards=shards,
                inputs_done=list(d.get("inputs_done", [])),
                bad_inputs=[BadInput(**b) for b in d.get("bad_inputs", [])],
                options=dict(d.get("options", {})),
                rwkv_lm=dict(d.get("rwkv_lm", {})),
                encoder=dict(d.get("encoder", {})),
            )
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: no such manifest") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: manifest is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise DataError(f"{path}: manifest must be a JSON object")
        return cls.from_dict(d, where=str(path))


def find_manifest(path: str | Path) -> Path | None:
    """The manifest file `path` refers to (the file itself or DIR/manifest.json), or None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return p
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return p / MANIFEST_NAME
    return None


def resolve_prefixes(path: str | Path, split: str = "train") -> list[Path]:
    """Binidx prefixes for `split`, from a manifest file, a directory holding manifest.json, or one bare prefix.

    A bare prefix (`data/x`, `data/x.bin` or `data/x.idx`, e.g. made by RWKV-LM's make_data.py) is returned
    as-is whatever the split, since the caller named it explicitly. Raises DataError if nothing is found.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    mpath = find_manifest(path)
    if mpath is not None:
        m = Manifest.load(mpath)
        return [mpath.parent / s.prefix for s in m.shards_for(split)]
    prefix = split_prefix(path)
    if prefix.with_name(prefix.name + ".idx").is_file() and prefix.with_name(prefix.name + ".bin").is_file():
        return [prefix]
    if Path(path).is_dir():
        raise DataError(f"{path}: directory has no {MANIFEST_NAME} (run `rwkvctl prepare` or point at a .bin/.idx)")
    raise DataError(f"{path}: not a dataset (expected a manifest.json, a directory with one, or a binidx prefix)")
