"""The prefix-state cache: RNN states stored under the token prefix that produced them, so a request whose prompt
starts with a cached prefix ingests only the rest.

An RWKV state is the whole past in a fixed size (for a 7B, ~4 MB per layer stack in fp32 whatever the length), so a
conversation's next turn costs only its new tokens once the state at the end of the previous turn is kept. Entries
are bounded by bytes (least recently used go first); with a spill directory an evicted entry is written there as
safetensors (crash-safe, rwkvctl.fs) and read back on a hit, bounded by its own byte budget.

Lookup is by exact token prefixes: a state is reused only for the tokens that produced it, never for text that merely
decodes the same, so a cached answer equals an uncached one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rwkvctl.fs import atomic_path
from rwkvctl.model.state import RecurrentState


@dataclass
class CachedState:
    """A state after `length` tokens and the logits it predicts (batch 1, detached copies)."""

    state: RecurrentState
    logits: Tensor  # (V,)
    length: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*_tensors(self.state), self.logits))


def _tensors(state: RecurrentState) -> tuple[Tensor, Tensor, Tensor]:
    return state.att_shift, state.ffn_shift, state.wkv


def _key(tokens: tuple[int, ...]) -> str:
    """A fixed-size name for a token prefix (also the spilled file's name)."""
    return hashlib.blake2b(repr(tokens).encode(), digest_size=16).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0  # prompt tokens not ingested thanks to hits
    entries: int = 0
    bytes: int = 0
    spilled_entries: int = 0


class PrefixStateCache:
    """Token prefix -> state, bounded by `max_bytes` in memory (+ `spill_bytes` on disk under `spill_dir`)."""

    def __init__(self, max_bytes: int, *, spill_dir: Path | None = None, spill_bytes: int = 0) -> None:
        self.max_bytes, self.spill_dir, self.spill_bytes = max_bytes, spill_dir, spill_bytes
        self._memory: OrderedDict[tuple[int, ...], CachedState] = OrderedDict()  # least recently used first
        self._spilled: OrderedDict[tuple[int, ...], tuple[Path, int]] = OrderedDict()  # prefix -> (file, bytes)
        self._lengths: dict[int, int] = {}  # prefix length -> how many entries (memory or disk) have it
        self._bytes = self._spilled_bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)

    def put(self, tokens: list[int] | tuple[int, ...], state: RecurrentState, logits: Tensor) -> None:
        """Keep copies of `state` and `logits` as the result of `tokens` (a batch-1 state; views are copied)."""
        prefix = tuple(tokens)
        if not prefix or self.max_bytes <= 0:
            return
        entry = CachedState(RecurrentState(*(t.detach().clone() for t in _tensors(state))), logits.detach().clone(),
                            len(prefix))
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            if prefix in self._memory:
                self._memory.move_to_end(prefix)
                return
            self._drop_spilled(prefix)
            self._admit(prefix, entry)

    def _admit(self, prefix: tuple[int, ...], entry: CachedState) -> None:
        """Into memory as the most recently used; the least recently used go to disk (or away) until it fits."""
        self._memory[prefix] = entry
        self._bytes += entry.nbytes
        self._lengths[len(prefix)] = self._lengths.get(len(prefix), 0) + 1
        while self._bytes > self.max_bytes and len(self._memory) > 1:
            old, evicted = self._memory.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._forget_length(len(old))
            self._spill(old, evicted)
        self._update_stats()

    def longest_prefix(self, tokens: list[int]) -> CachedState | None:
        """The cached state of the longest prefix of `tokens` (all of it included), or None; counts a hit or miss."""
        with self._lock:
            for length in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
                prefix = tuple(tokens[:length])
                entry = self._memory.get(prefix)
                if entry is not None:
                    self._memory.move_to_end(prefix)
                elif prefix in self._spilled:
                    entry = self._unspill(prefix)
                if entry is not None:
                    self.stats.hits += 1
                    self._update_stats()
                    self.stats.cached_tokens += length
                    return entry
            self.stats.misses += 1
            return None

    # --- disk ------------------------------------------------------------------------------------------------------

    def _spill(self, prefix: tuple[int, ...], entry: CachedState) -> None:
        if self.spill_dir is None or entry.nbytes > self.spill_bytes:
            return
        path = self.spill_dir / f"{_key(prefix)}.safetensors"
        tensors = dict(zip(("att_shift", "ffn_shift", "wkv"), (t.cpu().contiguous() for t in _tensors(entry.state)),
                           strict=True))
        tensors["logits"] = entry.logits.cpu().contiguous()
        tensors["tokens"] = torch.tensor(prefix, dtype=torch.int64)  # checked on read: names are only hashes
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        self._spilled[prefix] = (path, entry.nbytes)
        self._spilled_bytes += entry.nbytes
        self._lengths[len(prefix)] = self._lengths.get(len(prefix), 0) + 1
        while self._spilled_bytes > self.spill_bytes:
            old = next(iter(self._spilled))
            self._drop_spilled(old)

    def _unspill(self, prefix: tuple[int, ...]) -> CachedState | None:
        path, _ = self._spilled[prefix]
        try:
            t = load_file(str(path))
        except Exception:  # noqa: BLE001  (safetensors raises its own error type)
            t = None  # a damaged or removed spill file is a miss, never an error for the request
        self._drop_spilled(prefix)  # (removes the file)
        if t is None or set(t) != {"att_shift", "ffn_shift", "wkv", "logits", "tokens"}:
            return None
        if tuple(t["tokens"].tolist()) != prefix:
            return None
        entry = CachedState(RecurrentState(t["att_shift"], t["ffn_shift"], t["wkv"]), t["logits"], len(prefix))
        self._admit(prefix, entry)  # back in memory (on the CPU: the user moves it to the model's device)
        return entry

    def _drop_spilled(self, prefix: tuple[int, ...]) -> None:
        found = self._spilled.pop(prefix, None)
        if found is None:
            return
        path, nbytes = found
        self._spilled_bytes -= nbytes
        self._forget_length(len(prefix))
        path.unlink(missing_ok=True)

    def _forget_length(self, length: int) -> None:
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]

    def _update_stats(self) -> None:
        self.stats.entries, self.stats.bytes = len(self._memory), self._bytes
        self.stats.spilled_entries = len(self._spilled)
