"""The prefix-state cache: longest exact prefix, LRU by bytes, spill to disk and back, damaged spill files miss."""

from __future__ import annotations

import torch

from rwkvctl.config import ModelConfig
from rwkvctl.model.state import RecurrentState
from rwkvctl.serve.prefix_cache import PrefixStateCache

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, head_size=16)


def state(value: float) -> tuple[RecurrentState, torch.Tensor]:
    s = RecurrentState.zeros(CFG, 1)
    for t in (s.att_shift, s.ffn_shift, s.wkv):
        t.fill_(value)
    return s, torch.full((CFG.vocab_size,), value)


def entry_bytes() -> int:
    s, logits = state(0)
    return sum(t.numel() * t.element_size() for t in (s.att_shift, s.ffn_shift, s.wkv, logits))


def test_the_longest_exact_prefix_wins_and_copies_are_kept() -> None:
    cache = PrefixStateCache(10 * entry_bytes())
    s1, l1 = state(1.0)
    cache.put([1, 2], s1, l1)
    cache.put([1, 2, 3, 4], *state(2.0))
    s1.wkv.fill_(9)  # the cache holds its own copy
    assert cache.longest_prefix([1, 2, 3, 4, 5]).state.wkv.max() == 2.0
    hit = cache.longest_prefix([1, 2, 3, 9])
    assert hit.length == 2 and hit.state.wkv.max() == 1.0
    assert cache.longest_prefix([2, 1]) is None and cache.longest_prefix([1]) is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.cached_tokens) == (2, 2, 6)


def test_least_recently_used_entries_go_first() -> None:
    cache = PrefixStateCache(2 * entry_bytes())
    cache.put([1], *state(1.0))
    cache.put([2], *state(2.0))
    assert cache.longest_prefix([1]) is not None  # [1] is now the most recently used
    cache.put([3], *state(3.0))
    assert cache.longest_prefix([2]) is None and cache.longest_prefix([1]) is not None
    assert cache.stats.entries == 2 and cache.stats.bytes <= 2 * entry_bytes()


def test_evicted_states_spill_to_disk_and_come_back(tmp_path) -> None:
    cache = PrefixStateCache(entry_bytes(), spill_dir=tmp_path, spill_bytes=10 * entry_bytes())
    cache.put([1, 2], *state(1.0))
    cache.put([3, 4], *state(2.0))  # [1, 2] goes to disk
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and cache.stats.spilled_entries == 1
    hit = cache.longest_prefix([1, 2, 5])
    assert hit is not None and hit.length == 2 and torch.all(hit.state.wkv == 1.0) and torch.all(hit.logits == 1.0)


def test_a_damaged_spill_file_is_a_miss(tmp_path) -> None:
    cache = PrefixStateCache(entry_bytes(), spill_dir=tmp_path, spill_bytes=10 * entry_bytes())
    cache.put([1, 2], *state(1.0))
    cache.put([3, 4], *state(2.0))
    spilled = next(tmp_path.glob("*.safetensors"))
    spilled.write_bytes(b"garbage")
    assert cache.longest_prefix([1, 2]) is None


def test_the_disk_budget_is_kept(tmp_path) -> None:
    cache = PrefixStateCache(entry_bytes(), spill_dir=tmp_path, spill_bytes=2 * entry_bytes())
    for i in range(6):
        cache.put([i], *state(float(i)))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
