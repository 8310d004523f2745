"""Training windows: magic-prime order visits every window once per pass, deterministically, and ranks
and accumulation steps partition the same global sample sequence."""

import numpy as np
import pytest

from rwkvctl.data.binidx import BinIdxWriter, magic_prime
from rwkvctl.data.loader import (
    DataPosition,
    TokenStream,
    TrainWindows,
    ValWindows,
    WindowSampler,
    open_train,
    open_val,
)
from rwkvctl.errors import CheckpointError, DataError


def _stream(n=5000, parts=1):
    tokens = np.arange(n, dtype=np.int64) % 65000
    return TokenStream(np.array_split(tokens, parts)), tokens


def test_magic_prime_pass_visits_every_chunk_exactly_once():
    s = WindowSampler(num_tokens=5000, ctx_len=16, mode="magic_prime", seed=0)
    p = magic_prime(5000, 16)
    assert s.windows_per_pass == p
    starts = [s.start(g) for g in range(p)]
    assert sorted(starts) == [c * 16 for c in range(p)]
    # the second pass is again a permutation, in another order
    second = [s.start(g) for g in range(p, 2 * p)]
    assert sorted(second) == sorted(starts) and second != starts


def test_seed0_pass0_is_rwkv_lm_order():
    s = WindowSampler(num_tokens=5000, ctx_len=16, mode="magic_prime", seed=0)
    p = s.prime
    factor = int(p * (5**0.5 - 1) / 2)
    for idx in range(20):  # RWKV-LM dataset.py: ii = 1 + idx (one rank, epoch 0), i = ((factor*ii^3) % p) * ctx_len
        ii = 1 + idx
        assert s.start(idx) == ((factor * ii**3) % p) * 16


def test_order_depends_on_seed_and_is_reproducible():
    a = [WindowSampler(5000, 16, "magic_prime", seed=1).start(g) for g in range(50)]
    b = [WindowSampler(5000, 16, "magic_prime", seed=1).start(g) for g in range(50)]
    c = [WindowSampler(5000, 16, "magic_prime", seed=2).start(g) for g in range(50)]
    assert a == b and a != c


def test_random_mode_in_range_and_deterministic():
    s = WindowSampler(1000, 32, "random", seed=3)
    starts = [s.start(g) for g in range(2000)]
    assert min(starts) >= 0 and max(starts) <= 1000 - 33
    assert starts == [WindowSampler(1000, 32, "random", seed=3).start(g) for g in range(2000)]
    assert len(set(starts)) > 500


def test_windows_are_inputs_and_shifted_targets_across_file_boundaries():
    stream, tokens = _stream(5000, parts=3)
    w = TrainWindows(stream, 16, mode="random", seed=0)
    for g in range(200):
        b = w.micro_batch(g, 0, 1)
        start = w.sampler.start(g)
        assert b.x[0].tolist() == tokens[start : start + 16].tolist()
        assert b.y[0].tolist() == tokens[start + 1 : start + 17].tolist()
    assert stream.read(1660, 10).tolist() == tokens[1660:1670].tolist()  # crosses the first split


def test_ranks_and_accumulation_partition_the_global_sequence():
    stream, _ = _stream()
    w = TrainWindows(stream, 16, seed=0)
    # one process, micro 8: samples 0..7; two ranks x micro 2 x accum 2 cover exactly the same windows
    single = w.micro_batch(0, 0, 8).x
    split = [w.micro_batch(0, a, 2, rank=r, world=2).x for r in range(2) for a in range(2)]
    as_rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert as_rows(single) == as_rows(np.concatenate(split))
    # and continuing from samples_seen=8 gives the next 8 windows
    assert w.micro_batch(8, 0, 8).x.tolist() == [w.micro_batch(8 + i, 0, 1).x[0].tolist() for i in range(8)]


def test_too_small_data_and_vocab_mismatch_are_clear_errors():
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(10, 16, "magic_prime")
    with pytest.raises(DataError, match="too few for RWKV-LM's magic_prime"):
        WindowSampler(50, 16, "magic_prime")
    stream, _ = _stream()
    with pytest.raises(DataError, match="token id .* >= the model's vocab_size 100"):
        TrainWindows(stream, 16, vocab_size=100).micro_batch(0, 0, 4)


def test_validation_windows_are_fixed_and_split_evenly_over_ranks():
    stream, tokens = _stream(1000)
    v = ValWindows(stream, 32, max_windows=7)
    all_rows = [b.x for b in v.batches(micro_bsz=3)]
    assert sum(len(x) for x in all_rows) == 7
    assert all_rows[0][1].tolist() == tokens[32:64].tolist()
    per_rank = [sum(len(b.x) for b in v.batches(3, rank=r, world=2)) for r in range(2)]
    assert per_rank == [3, 3]


def test_open_from_binidx_prefix_and_manifestless_val(tmp_path):
    with BinIdxWriter(tmp_path / "d") as wr:
        for i in range(50):
            wr.add_document(np.full(40, i + 1, dtype=np.uint16))
    w = open_train(tmp_path / "d", 16, mode="magic_prime", seed=0, vocab_size=65536)
    assert len(w.stream) == 2000 and w.micro_batch(0, 0, 2).x.shape == (2, 16)
    assert open_val(tmp_path / "d", None, 16, max_windows=4, vocab_size=None) is None  # no manifest, no val split
    val = open_val(tmp_path / "d", tmp_path / "d.bin", 16, max_windows=4, vocab_size=None)
    assert val is not None and val.num_windows == 4


def test_dataset_tokenizer_comes_from_the_manifest(tmp_path):
    from rwkvctl.data.loader import dataset_tokenizer
    from rwkvctl.data.manifest import Manifest

    assert dataset_tokenizer(tmp_path / "bare") == "world"  # RWKV-LM binidx data: no manifest
    Manifest(tokenizer={"name": "sentencepiece", "vocab_size": 500, "eod_id": 0, "model": "mine.model"},
             dtype="uint16").save(tmp_path / "spm")
    assert dataset_tokenizer(tmp_path / "spm") == "spm:mine.model"
    Manifest(tokenizer={"name": "world", "vocab_size": 65536, "eod_id": 0}, dtype="uint16").save(tmp_path / "w")
    assert dataset_tokenizer(tmp_path / "w" / "manifest.json") == "world"


def test_data_position_round_trips_and_old_files_without_it_start_at_zero() -> None:
    pos = DataPosition.at(5, 32)
    assert pos == DataPosition(5, 160) and DataPosition.from_dict(pos.to_dict(), "s.json", CheckpointError) == pos
    assert DataPosition.from_dict({"step": 3}, "s.json", CheckpointError) == DataPosition(0, 0)  # missing keys
    pos.check(32, "s.json", CheckpointError)


@pytest.mark.parametrize("doc, message", [
    ({"samples_seen": "5"}, r"'samples_seen' must be integer in \[0, 4611686018427387904\], got '5'"),
    ({"samples_seen": 5.0}, r"'samples_seen' must be integer .*got 5.0"),
    ({"samples_seen": True}, r"'samples_seen' must be integer .*got True"),
    ({"tokens": -1}, r"'tokens' must be integer .*got -1"),
    ({"tokens": 1 << 63}, r"'tokens' must be integer .*got 9223372036854775808"),
    ({"samples_seen": None}, r"'samples_seen' must be integer .*got None"),
])
def test_a_data_position_of_the_wrong_type_or_range_is_refused_by_name(doc: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=f"^s.json: trainer state field {message}$"):
        DataPosition.from_dict(doc, "s.json", CheckpointError, where="trainer state field")


def test_a_data_position_whose_numbers_disagree_is_refused() -> None:
    with pytest.raises(DataError, match=r"^s.json: data position says 5 samples but 150 tokens, not samples x "
                                        r"ctx_len 32 = 160; the file is damaged"):
        DataPosition(5, 150).check(32, "s.json", DataError)
