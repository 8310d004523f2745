"""`manifest.json`: what a prepared dataset contains, written atomically by `rwkvctl prepare`.

It lists every shard (a binidx prefix relative to the manifest, its split, token/doc counts, per-source
counts and the input file it came from), the tokenizer, per-split per-source totals, the inputs done, and
every bad-input problem found. Trainers call `resolve_prefixes()` to get the shard list for a split; it
also accepts a plain RWKV-LM binidx prefix, so data made by other tools works too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from rwkvctl.data.binidx import BinIdxReader, split_prefix
from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_write_text
from rwkvctl.io import bounded_json
from rwkvctl.io.bounded_json import field as field_of

MANIFEST_NAME = "manifest.json"
FORMAT = "rwkvctl-binidx-manifest"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
MAX_COUNT = 1 << 62  # docs/tokens/bytes: far above any dataset, and an int64 in every reader


@dataclass
class SourceCounts:
    """Counts for one source (e.g. RedPajamaGithub) within a shard or split."""

    docs: int = 0
    tokens: int = 0
    bytes: int = 0

    @classmethod
    def from_json(cls, d: Any, where: str) -> SourceCounts:
        d = _obj(d, where)
        return cls(**{k: _count(d, k, where, default=0) for k in ("docs", "tokens", "bytes")})

    def add(self, other: SourceCounts) -> None:
        self.docs += other.docs
        self.tokens += other.tokens
        self.bytes += other.bytes


@dataclass
class BadInput:
    """One kind of problem in one input file: how often, and the first line where it happened."""

    input: str
    kind: str  # corrupt_compression | truncated_compression | malformed_json | missing_text | non_string_text |
    # empty_text | invalid_utf8 | roundtrip_mismatch | unreadable | line_too_long
    count: int
    first_line: int
    detail: str = ""

    @classmethod
    def from_json(cls, d: Any, where: str) -> BadInput:
        d = _obj(d, where)
        return cls(input=_str(d, "input", where), kind=_str(d, "kind", where), count=_count(d, "count", where),
                   first_line=_count(d, "first_line", where), detail=_str(d, "detail", where, default=""))


@dataclass
class Shard:
    prefix: str  # relative to the manifest's directory, POSIX separators
    split: str  # "train" | "val"
    input: str  # the input file it was made from
    docs: int
    tokens: int
    sources: dict[str, SourceCounts] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Any, where: str) -> Shard:
        """A shard record (of a manifest or of prepare's per-input record): every field checked, the prefix kept
        inside the dataset directory."""
        d = _obj(d, where)
        prefix = _str(d, "prefix", where)
        parts = PurePosixPath(prefix).parts
        if not parts or PurePosixPath(prefix).is_absolute() or ".." in parts or "\\" in prefix or "\0" in prefix:
            raise DataError(f"{where}: shard prefix {prefix!r} must be a relative path inside the dataset directory")
        split = _str(d, "split", where)
        if split not in SPLITS:
            raise DataError(f"{where}: shard field 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
        sources = field_of(d, "sources", dict, where, DataError, default={}, where="shard field")
        return cls(prefix=prefix, split=split, input=_str(d, "input", where), docs=_count(d, "docs", where),
                   tokens=_count(d, "tokens", where),
                   sources={str(k): SourceCounts.from_json(v, f"{where} source {k!r}") for k, v in sources.items()})


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
        """The manifest a JSON object describes; any field of the wrong type or range is one DataError naming it."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: malformed manifest (not a JSON object)")
        if d.get("format") != FORMAT:
            raise DataError(f"{where}: not an rwkvctl dataset manifest (format={_short(d.get('format'))})")
        bounded_json.format_version(d, "version", FORMAT_VERSION, where, DataError, what="manifest")
        if "shards" not in d or "tokenizer" not in d or "dtype" not in d:
            missing = [k for k in ("shards", "tokenizer", "dtype") if k not in d]
            raise DataError(f"{where}: malformed manifest (no {', '.join(missing)})")
        shards = field_of(d, "shards", list, where, DataError, where="malformed manifest: field")
        bad = field_of(d, "bad_inputs", list, where, DataError, default=[], where="malformed manifest: field")
        done = field_of(d, "inputs_done", list, where, DataError, default=[], where="malformed manifest: field")
        if not all(isinstance(x, str) for x in done):
            raise DataError(f"{where}: malformed manifest: 'inputs_done' must be a list of strings")
        return cls(
            tokenizer=field_of(d, "tokenizer", dict, where, DataError, where="malformed manifest: field"),
            dtype=_str(d, "dtype", where),
            shards=[Shard.from_json(s, f"{where}: shard {i}") for i, s in enumerate(shards)],
            inputs_done=list(done),
            bad_inputs=[BadInput.from_json(b, f"{where}: bad_inputs[{i}]") for i, b in enumerate(bad)],
            **{k: field_of(d, k, dict, where, DataError, default={}, where="malformed manifest: field")
               for k in ("options", "rwkv_lm", "encoder")},
        )

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            d = bounded_json.read(path, DataError, what="manifest", expect=object)
        except FileNotFoundError:
            raise DataError(f"{path}: no such manifest") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
        if not isinstance(d, dict):
            raise DataError(f"{path}: manifest must be a JSON object")
        return cls.from_dict(d, where=str(path))


def _obj(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"{where}: malformed manifest entry (expected a JSON object, got {_short(d)})")
    return d


def _str(d: dict[str, Any], key: str, where: str, **kw: Any) -> str:
    return field_of(d, key, str, where, DataError, where="field", **kw)


def _count(d: dict[str, Any], key: str, where: str, **kw: Any) -> int:
    return field_of(d, key, int, where, DataError, minimum=0, maximum=MAX_COUNT, where="field", **kw)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_shard(mpath: Path, shard: Shard) -> Path:
    """The prefix of a manifest's shard, after checking that its files hold what the manifest says (a shard
    replaced or damaged since prepare wrote the manifest is refused by name, not trained on)."""
    reader = BinIdxReader(mpath.parent / shard.prefix)
    if reader.num_tokens != shard.tokens or len(reader) != shard.docs:
        raise DataError(f"{mpath}: shard {shard.prefix!r} holds {reader.num_tokens} tokens in {len(reader)} documents "
                        f"but the manifest says {shard.tokens} in {shard.docs}; the data changed after prepare wrote "
                        "the manifest (rerun prepare)")
    return reader.prefix


def find_manifest(path: str | Path) -> Path | None:
    """The manifest file `path` refers to (the file itself or DIR/manifest.json), or None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return p
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return p / MANIFEST_NAME
    return None


def resolve_prefixes(path: str | Path, split: str = "train", *, check_counts: bool = False) -> list[Path]:
    """Binidx prefixes for `split`, from a manifest file, a directory holding manifest.json, or one bare prefix.

    A bare prefix (`data/x`, `data/x.bin` or `data/x.idx`, e.g. made by RWKV-LM's make_data.py) is returned
    as-is whatever the split, since the caller named it explicitly. Raises DataError if nothing is found.
    `check_counts`: also check that each shard's files hold the tokens and documents the manifest says (readers
    of the data ask for it; listing the shards does not need the files).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    mpath = find_manifest(path)
    if mpath is not None:
        m = Manifest.load(mpath)
        shards = m.shards_for(split)
        return [checked_shard(mpath, s) if check_counts else mpath.parent / s.prefix for s in shards]
    prefix = split_prefix(path)
    if prefix.with_name(prefix.name + ".idx").is_file() and prefix.with_name(prefix.name + ".bin").is_file():
        return [prefix]
    if Path(path).is_dir():
        raise DataError(f"{path}: directory has no {MANIFEST_NAME} (run `rwkvctl prepare` or point at a .bin/.idx)")
    raise DataError(f"{path}: not a dataset (expected a manifest.json, a directory with one, or a binidx prefix)")
