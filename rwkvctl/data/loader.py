"""Training windows from binidx data: RWKV-LM's magic-prime order (or uniform random), deterministic in
(seed, sample index), so a resumed run reads exactly the batches it would have read.

Every window is `ctx_len + 1` consecutive tokens of the flat stream (one or more binidx files viewed as
one concatenated array, as RWKV-LM does): inputs are the first ctx_len, targets the last ctx_len.
Windows cross document (and file) boundaries; token 0 is an ordinary target, with no mask and no state reset, as
in RWKV-LM's RWKV-v5/src/dataset.py.

Sample numbering: the g-th sample of the whole run (over all ranks) is
`g = samples_seen + (accum_idx * micro_bsz + b) * world_size + rank`, which for one process and no
accumulation is RWKV-LM's own `ii - 1` numbering; so seed 0 reproduces RWKV-LM's data order.

The data position (`DataPosition`: samples_seen and the tokens they held) is therefore all a resume needs besides the
settings that fix the order (path, ctx_len, sampling, seed, batch shape); the trainer state stores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rwkvctl.data.binidx import BinIdxReader, magic_prime
from rwkvctl.data.manifest import Manifest, find_manifest, resolve_prefixes
from rwkvctl.errors import DataError, RwkvctlError
from rwkvctl.io.bounded_json import field

MAX_SAMPLES = 1 << 62  # samples and tokens: far above any run, and an int64 everywhere they go

_MASK64 = (1 << 64) - 1
# Per-pass rotation of the magic-prime order (pass 0 of seed 0 is RWKV-LM's order, unrotated).
_SEED_MULT = 0x9E3779B97F4A7C15
_PASS_MULT = 0xBF58476D1CE4E5B9


def _splitmix64(x: int) -> int:
    """A counter-based hash: random-mode offsets need no generator state to save or restore."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class TokenStream:
    """Several flat token arrays read as one stream (the files' order is the stream's order)."""

    def __init__(self, arrays: list[np.ndarray], names: list[str] | None = None) -> None:
        if not arrays:
            raise DataError("no token data (empty list of files)")
        self.arrays = arrays
        self.names = names or [f"array{i}" for i in range(len(arrays))]
        sizes = [len(a) for a in arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # (n_files + 1,)
        self.num_tokens = int(self.offsets[-1])

    @classmethod
    def from_prefixes(cls, prefixes: list[Path]) -> TokenStream:
        readers = [BinIdxReader(p) for p in prefixes]
        return cls([r.tokens() for r in readers], [str(r.bin_path) for r in readers])

    @classmethod
    def from_path(cls, path: str | Path, split: str = "train") -> TokenStream:
        return cls.from_prefixes(resolve_prefixes(path, split, check_counts=True))

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, stitched across file boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside the {self.num_tokens}-token stream")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            local = pos - int(self.offsets[i])
            take = min(length - filled, len(self.arrays[i]) - local)
            out[filled : filled + take] = self.arrays[i][local : local + take]
            filled += take
            pos += take
            i += 1
        return out

    def file_of(self, position: int) -> str:
        return self.names[int(np.searchsorted(self.offsets, position, side="right")) - 1]


class WindowSampler:
    """Maps a global sample index to the start offset of its window."""

    def __init__(self, num_tokens: int, ctx_len: int, mode: str = "magic_prime", seed: int = 0) -> None:
        if num_tokens < ctx_len + 1:
            raise DataError(
                f"the data has {num_tokens} tokens, fewer than one window of ctx_len+1 = {ctx_len + 1}; "
                "use more data or a smaller ctx_len"
            )
        self.num_tokens, self.ctx_len, self.mode, self.seed = num_tokens, ctx_len, mode, seed
        if mode == "magic_prime":
            self.prime = magic_prime(num_tokens, ctx_len)
            self.factor = int(self.prime * (math.sqrt(5) - 1) / 2)
            self.windows_per_pass = self.prime
        elif mode == "random":
            self.prime = 0
            self.windows_per_pass = num_tokens // ctx_len
        else:
            raise DataError(f"unknown sampling mode {mode!r} (magic_prime or random)")

    def start(self, g: int) -> int:
        if self.mode == "random":
            return _splitmix64((self.seed << 40) ^ g) % (self.num_tokens - self.ctx_len)
        p = self.prime
        epoch, j = divmod(g, p)
        rotation = (self.seed * _SEED_MULT + epoch * _PASS_MULT) % p
        # Cubing is a bijection mod p because p % 3 == 2, so ii -> chunk visits every chunk once per pass.
        ii = (1 + j + rotation) % p
        return ((self.factor * ii**3) % p) * self.ctx_len


@dataclass
class DataPosition:
    """Where a run is in its data, as the trainer state records it (two top-level keys of trainer_state.json, as
    before this type existed): the one definition for the writer (`to_dict`) and the reader (`from_dict`)."""

    samples_seen: int = 0
    """Windows consumed over all ranks: the global index of the next step's first sample."""
    tokens: int = 0
    """Training tokens those windows held (samples_seen * ctx_len)."""

    @classmethod
    def at(cls, samples_seen: int, ctx_len: int) -> DataPosition:
        return cls(samples_seen, samples_seen * ctx_len)

    def to_dict(self) -> dict[str, int]:
        return {"samples_seen": self.samples_seen, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict, source: str, error: type[RwkvctlError], *, where: str = "field") -> DataPosition:
        """Both keys checked (an integer in [0, MAX_SAMPLES]); absent ones are 0, as in the oldest trainer states."""
        return cls(*(field(data, key, int, source, error, minimum=0, maximum=MAX_SAMPLES, default=0, where=where)
                     for key in ("samples_seen", "tokens")))

    def check(self, ctx_len: int, source: str, error: type[RwkvctlError]) -> None:
        """Refuse a position whose two numbers disagree for this ctx_len: one of them was damaged, and resuming
        would read other data than the run did or report other token counts."""
        if self.tokens != self.samples_seen * ctx_len:
            raise error(f"{source}: data position says {self.samples_seen} samples but {self.tokens} tokens, not "
                        f"samples x ctx_len {ctx_len} = {self.samples_seen * ctx_len}; the file is damaged: resume "
                        "from an earlier checkpoint")


@dataclass
class Batch:
    x: Tensor  # (B, T) inputs
    y: Tensor  # (B, T) targets (x shifted by one)


class TrainWindows:
    """Micro-batches for training: deterministic in (seed, samples_seen, accum_idx, rank)."""

    def __init__(
        self,
        stream: TokenStream,
        ctx_len: int,
        *,
        mode: str = "magic_prime",
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        self.stream, self.ctx_len, self.vocab_size = stream, ctx_len, vocab_size
        self.sampler = WindowSampler(len(stream), ctx_len, mode, seed)

    @property
    def windows_per_pass(self) -> int:
        return self.sampler.windows_per_pass

    def sample_indices(self, samples_seen: int, accum_idx: int, micro_bsz: int, rank: int, world: int) -> list[int]:
        return [samples_seen + (accum_idx * micro_bsz + b) * world + rank for b in range(micro_bsz)]

    def micro_batch(self, samples_seen: int, accum_idx: int, micro_bsz: int, rank: int = 0, world: int = 1) -> Batch:
        starts = [self.sampler.start(g) for g in self.sample_indices(samples_seen, accum_idx, micro_bsz, rank, world)]
        return self._gather(starts)

    def _gather(self, starts: list[int]) -> Batch:
        rows = np.stack([self.stream.read(s, self.ctx_len + 1) for s in starts])  # (B, T+1)
        if self.vocab_size is not None:
            top = int(rows.max())
            if top >= self.vocab_size:
                where = self.stream.file_of(starts[int(np.argmax(rows.max(axis=1)))])
                raise DataError(
                    f"{where}: token id {top} >= the model's vocab_size {self.vocab_size}; "
                    "the data was tokenized for a different vocabulary"
                )
        t = torch.from_numpy(rows)
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous())


class ValWindows(TrainWindows):
    """A fixed set of consecutive, non-overlapping windows from the start of the validation stream."""

    def __init__(self, stream: TokenStream, ctx_len: int, *, max_windows: int, vocab_size: int | None = None) -> None:
        if len(stream) < ctx_len + 1:
            raise DataError(f"validation data has {len(stream)} tokens, fewer than ctx_len+1 = {ctx_len + 1}")
        self.stream, self.ctx_len, self.vocab_size = stream, ctx_len, vocab_size
        self.num_windows = min(max_windows, (len(stream) - 1) // ctx_len)

    def batches(self, micro_bsz: int, rank: int = 0, world: int = 1) -> list[Batch]:
        """This rank's share: window w goes to rank w % world. Every rank gets the same number of windows
        (ZeRO-3 forwards are collective), so up to world-1 trailing windows are left out."""
        usable = self.num_windows - self.num_windows % world
        mine = [w * self.ctx_len for w in range(usable) if w % world == rank]
        return [self._gather(mine[i : i + micro_bsz]) for i in range(0, len(mine), micro_bsz)]


def open_train(path: str | Path, ctx_len: int, *, mode: str, seed: int, vocab_size: int | None) -> TrainWindows:
    stream = TokenStream.from_path(path, "train")
    try:
        return TrainWindows(stream, ctx_len, mode=mode, seed=seed, vocab_size=vocab_size)
    except DataError as e:  # too little data for a window: say which data
        raise DataError(f"{path}: {e}") from None


def open_val(
    path: str | Path, val_path: str | Path | None, ctx_len: int, *, max_windows: int, vocab_size: int | None
) -> ValWindows | None:
    """Explicit val data, else the manifest's val split; None when there is none."""
    if val_path:
        stream = TokenStream.from_path(val_path, "val" if find_manifest(val_path) else "train")
    else:
        if find_manifest(path) is None:
            return None
        prefixes = resolve_prefixes(path, "val", check_counts=True)
        if not prefixes:
            return None
        stream = TokenStream.from_prefixes(prefixes)
    try:
        return ValWindows(stream, ctx_len, max_windows=max_windows, vocab_size=vocab_size)
    except DataError as e:
        raise DataError(f"{val_path or path}: {e}") from None


def dataset_tokenizer(path: str | Path) -> str:
    """The tokenizer spec (as `load_tokenizer` takes it) the dataset at `path` was tokenized with.

    From the manifest: `world`, or `spm:NAME.model` for SentencePiece (the manifest records only the model's
    file name). A bare binidx prefix carries no tokenizer; RWKV-LM's data is World-tokenized, so `world`.
    """
    mpath = find_manifest(path)
    if mpath is None:
        return "world"
    tok = Manifest.load(mpath).tokenizer
    name = str(tok.get("name", "world"))
    if name == "sentencepiece" and tok.get("model"):
        return f"spm:{tok['model']}"
    return name
