"""`evaluate_models` (rwkvctl eval): loss by position, perplexity and bits per byte equal a direct whole-sequence
computation; several models side by side; bad input is a one-line error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.data.manifest import Manifest, Shard
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import CheckpointError, ConfigError, DataError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint, sidecar_path
from rwkvctl.lifecycle.evaluate import evaluate_models, log2_buckets, plot_result, tokenizer_family

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)
TEXT = ("It was the best of times, it was the worst of times; naïve café 中文 🎉\n" * 40)


@pytest.fixture
def model_file(random_model, tmp_path: Path):
    def make(name: str = "m.pth", seed: int = 0, cfg: ModelConfig = CFG) -> tuple[Path, torch.nn.Module]:
        model = random_model(cfg, seed=seed)
        return save_checkpoint(tmp_path / name, model.state_dict(), CheckpointMeta(model=cfg)), model

    return make


def _binidx(prefix: Path, tokens: np.ndarray) -> Path:
    with BinIdxWriter(prefix) as w:
        w.add_document(tokens.astype(np.uint16))
    return prefix


def _prepared(root: Path, val_tokens: int, tokenizer: dict | None = None) -> Path:
    """A prepared-dataset layout: a train and a val shard and their manifest."""
    rng = np.random.default_rng(0)
    _binidx(root / "train_0", rng.integers(1, 65536, 512))
    _binidx(root / "val_0", rng.integers(1, 65536, val_tokens))
    Manifest(tokenizer=tokenizer or {"name": "world", "vocab_size": 65536, "eod_id": 0}, dtype="uint16",
             shards=[Shard("train_0", "train", "a", 1, 512), Shard("val_0", "val", "b", 1, val_tokens)]).save(root)
    return root


def _direct(model: torch.nn.Module, ids: np.ndarray, window: int, windows: int) -> np.ndarray:
    """(windows, window) nats: every window run whole, log_softmax over the full logits."""
    rows = []
    with torch.no_grad():
        for w in range(windows):
            chunk = torch.from_numpy(ids[w * window : w * window + window + 1].astype(np.int64))[None]
            logp = torch.log_softmax(model(chunk[:, :-1])[0].double(), -1)[0]  # (window, V)
            rows.append(-logp.gather(1, chunk[0, 1:, None])[:, 0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("segment", [16, 20, 64])
def test_by_position_loss_equals_a_whole_sequence_computation(model_file, tmp_path, segment) -> None:
    path, model = model_file()
    ids = np.random.default_rng(1).integers(0, 65536, 64 * 3 + 7)
    data = _binidx(tmp_path / "d", ids)
    result = evaluate_models([path], [data], window=64, segment=segment, max_windows=3)
    direct = _direct(model, ids, 64, 3)
    score = result.models[0]
    assert (result.kind, result.windows, result.tokens, result.segment) == ("binidx", 3, 192, segment)
    assert [(b.first, b.last) for b in score.by_position] == log2_buckets(64)
    per_position = direct.mean(axis=0)
    for b in score.by_position:
        assert b.loss == pytest.approx(per_position[b.first - 1 : b.last].mean(), rel=1e-5), (b.first, b.last)
    assert score.loss == pytest.approx(direct.mean(), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(direct.mean()), rel=1e-5)
    tok = load_tokenizer("world")
    scored = np.concatenate([ids[w * 64 + 1 : w * 64 + 65] for w in range(3)])
    nbytes = len(tok.decode_bytes(scored))
    assert result.bytes == nbytes
    assert score.bits_per_byte == pytest.approx(direct.sum() / math.log(2) / nbytes, rel=1e-5)


def test_text_files_perplexity_and_bits_per_byte(model_file, tmp_path) -> None:
    path, model = model_file()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT, encoding="utf-8")
    b.write_text(TEXT[::-1], encoding="utf-8")
    tok = load_tokenizer("world")
    ids = np.array(tok.encode(TEXT) + [0] + tok.encode(TEXT[::-1]) + [0])
    windows = (len(ids) - 1) // 128
    result = evaluate_models([path], [a, b], window=128, segment=32, max_windows=0)  # 0: every window
    direct = _direct(model, ids, 128, windows)
    assert result.kind == "text" and result.windows == windows
    nbytes = sum(len(tok.decode_bytes(ids[w * 128 + 1 : w * 128 + 129])) for w in range(windows))
    assert result.bytes == nbytes
    assert result.models[0].perplexity == pytest.approx(math.exp(direct.mean()), rel=1e-5)
    assert result.models[0].bits_per_byte == pytest.approx(direct.sum() / math.log(2) / nbytes, rel=1e-5)


def test_models_side_by_side_with_labels_json_and_plot(model_file, tmp_path) -> None:
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    path, _ = model_file()
    quantized = quantize_checkpoint(path, tmp_path / "q.safetensors", QuantSpec()).path
    data = _prepared(tmp_path / "ds", 300)
    seen = []
    result = evaluate_models([path, quantized], [data], window=128, segment=64, max_windows=2,
                             labels=["original", "int4"], on_progress=seen.append)  # fmt: skip
    assert result.kind == "val split" and [m.label for m in result.models] == ["original", "int4"]
    original, int4 = result.models
    assert original.loss != int4.loss and abs(original.loss - int4.loss) < 0.5
    assert [(p.index, p.tokens_done) for p in seen] == [(0, 64), (0, 128), (0, 192), (0, 256),
                                                        (1, 64), (1, 128), (1, 192), (1, 256)]  # fmt: skip
    d = json.loads(result.to_json())
    assert set(d) >= {"data", "kind", "tokenizer", "window", "segment", "windows", "tokens", "bytes", "models"}
    assert set(d["models"][0]) == {"label", "path", "loss", "perplexity", "bits_per_byte", "by_position", "seconds",
                                   "tokens_per_s"}  # fmt: skip
    assert d["models"][1]["by_position"][-1] == {"first": 65, "last": 128, "loss": int4.by_position[-1].loss}
    png = plot_result(result, tmp_path / "pos.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_buckets_and_tokenizer_names() -> None:
    assert log2_buckets(1) == [(1, 1)]
    assert log2_buckets(8) == [(1, 1), (2, 2), (3, 4), (5, 8)]
    assert log2_buckets(10) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 10)]
    assert log2_buckets(131072)[-1] == (65537, 131072) and len(log2_buckets(131072)) == 18
    assert tokenizer_family("world-native") == tokenizer_family("world") == "world"
    assert tokenizer_family("spm:/a/b/x.model") == tokenizer_family("spm:x.model") == "spm:x.model"


def test_bad_input_is_one_line(model_file, tmp_path, random_model) -> None:
    path, _ = model_file()
    data = _prepared(tmp_path / "ds", 100)
    cases = [
        (lambda: evaluate_models([path], [data], window=128), DataError,
         r"val split has 100 tokens, fewer than --window \+ 1 = 129"),
        (lambda: evaluate_models([path], [tmp_path / "nothing.txt"], window=8), DataError,
         "nothing.txt: no such file or dataset"),
        (lambda: evaluate_models([tmp_path / "none.pth"], [data], window=8), CheckpointError, "none.pth: no such"),
        (lambda: evaluate_models([path], [data], window=0), ConfigError, "--window >= 1"),
    ]
    no_val = tmp_path / "noval"
    _prepared(no_val, 100)
    m = Manifest.load(no_val)
    m.shards = m.shards_for("train")
    m.save(no_val)
    cases.append((lambda: evaluate_models([path], [no_val], window=8), DataError, "no val split"))
    spm = _prepared(tmp_path / "spm", 100, {"name": "sentencepiece", "vocab_size": 65536, "model": "x.model"})
    cases.append((lambda: evaluate_models([path], [spm], window=8), DataError,
                  "tokenized with 'spm:x.model', but .*m.pth uses 'world'"))
    small = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, head_size=16)
    other, _ = model_file("small.pth", cfg=small)
    cases.append((lambda: evaluate_models([path, other], [data], window=8), ConfigError,
                  "small.pth: vocab_size 64, but .*m.pth has 65536"))
    spm_model, _ = model_file("spm.pth", seed=1)
    side = json.loads(sidecar_path(spm_model).read_text())
    sidecar_path(spm_model).write_text(json.dumps({**side, "tokenizer": "spm:x.model"}))
    cases.append((lambda: evaluate_models([path, spm_model], [data], window=8), ConfigError,
                  "spm.pth: trained with the 'spm:x.model' tokenizer, but .*m.pth with 'world'"))
    for run, error, message in cases:
        with pytest.raises(error, match=message) as info:
            run()
        assert "\n" not in str(info.value)


def test_a_bare_file_without_sidecar_is_checked_when_it_loads(model_file, tmp_path) -> None:
    """A model without a sidecar (an RWKV-LM .pth) is compared with the others once loaded."""
    path, _ = model_file()
    small = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, head_size=16)
    other, _ = model_file("small.pth", cfg=small)
    sidecar_path(other).unlink()
    data = _binidx(tmp_path / "d", np.random.default_rng(2).integers(1, 64, 40))
    with pytest.raises(ConfigError, match="small.pth: vocab_size 64"):
        evaluate_models([path, other], [data], window=16, segment=8)
