"""`quantize` as a lifecycle stage: streaming from either file kind, calibration, --estimate, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError, DataError
from rwkvctl.io.checkpoint import CheckpointMeta, open_checkpoint_lazy, read_checkpoint_file, save_checkpoint
from rwkvctl.lifecycle.models import load_model
from rwkvctl.lifecycle.quantize import compare_models, quantize_checkpoint, read_text_tokens
from rwkvctl.quant.calibrate import collect_importance
from rwkvctl.quant.policy import QuantSpec

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)


def tensors_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture
def sources(random_model, tmp_path: Path) -> tuple[Path, Path]:
    sd = random_model(CFG).state_dict()
    meta = CheckpointMeta(model=CFG, step=5)
    return save_checkpoint(tmp_path / "m.pth", sd, meta), save_checkpoint(tmp_path / "m.safetensors", sd, meta)


def test_both_file_kinds_stream_to_the_same_tensors(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a = quantize_checkpoint(sources[0], tmp_path / "a.safetensors", QuantSpec()).path
    b = quantize_checkpoint(sources[1], tmp_path / "b.safetensors", QuantSpec()).path
    ta, ma = tensors_of(a)
    tb, mb = tensors_of(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the default settings record exactly the keys rwkvctl has always written: older loaders read these files
    record = json.loads(ma["rwkvctl"])["extra"]["quantization"]
    assert set(record) == {"bits", "group", "embed_bits", "range_search", "source"}
    assert record["source"] == "m.pth"
    assert json.loads(mb["rwkvctl"])["extra"]["quantization"]["source"] == "m.safetensors"


def test_each_tensor_is_read_once_and_lazily(sources: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    reads: list[str] = []
    with open_checkpoint_lazy(sources[1]) as lazy:
        assert all(t.device.type == "meta" for t in lazy.placeholders.values())
        whole = read_checkpoint_file(sources[1]).tensors
        assert all(torch.equal(lazy.read(k), whole[k]) for k in whole)
    import rwkvctl.lifecycle.quantize as lq

    real = lq.open_checkpoint_lazy

    def counting(path):  # noqa: ANN202
        ctx = real(path)
        lazy = ctx.__enter__()
        read = lazy.read
        lazy.read = lambda key: reads.append(key) or read(key)
        return _Entered(ctx, lazy)

    monkeypatch.setattr(lq, "open_checkpoint_lazy", counting)
    quantize_checkpoint(sources[1], tmp_path / "q.safetensors", QuantSpec())
    assert sorted(reads) == sorted(whole) and len(reads) == len(set(reads))


class _Entered:
    def __init__(self, ctx, value) -> None:  # noqa: ANN001
        self.ctx, self.value = ctx, value

    def __enter__(self):  # noqa: ANN204
        return self.value

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        return self.ctx.__exit__(*exc)


def test_non_finite_weights_are_refused_by_name(random_model, tmp_path: Path) -> None:
    model = random_model(CFG)
    sd = model.state_dict()
    sd["blocks.1.ln1.weight"][3] = float("inf")  # a tensor stored as it is
    src = save_checkpoint(tmp_path / "bad.safetensors", sd, CheckpointMeta(model=CFG))
    with pytest.raises(CheckpointError, match="blocks.1.ln1.weight holds 1 NaN/Inf"):
        quantize_checkpoint(src, tmp_path / "q.safetensors", QuantSpec())


def test_quantized_sources_are_refused(sources: tuple[Path, Path], tmp_path: Path) -> None:
    q = quantize_checkpoint(sources[0], tmp_path / "q.safetensors", QuantSpec()).path
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(q, tmp_path / "qq.safetensors", QuantSpec())


def test_importance_windows_equal_one_pass(random_model) -> None:
    model = random_model(CFG)
    tokens = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = collect_importance(model, tokens, window=1000)
    windowed = collect_importance(model, tokens, window=40)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(whole) == linear and "head.weight" in whole
    for name in whole:
        assert whole[name].shape == (model.get_parameter(name).shape[1],)
        assert torch.allclose(whole[name], windowed[name], rtol=1e-4, atol=1e-7)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks are removed


def test_calibrated_quantization_records_it_and_keeps_quality(sources: tuple[Path, Path], tmp_path: Path) -> None:
    tokens = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    res = quantize_checkpoint(sources[0], tmp_path / "c.safetensors", QuantSpec(), calib_tokens=tokens[:200],
                              eval_tokens=tokens[200:])  # fmt: skip
    assert res.quality is not None and res.quality.mean_kl < 0.05
    _, meta = load_model(res.path)
    assert meta.extra["quantization"]["calibrated"] is True
    with pytest.raises(CheckpointError, match="calibration text has token ids up to 600"):
        quantize_checkpoint(sources[0], tmp_path / "d.safetensors", QuantSpec(), calib_tokens=[1, 600])


def test_compact_setting_costs_some_quality(sources: tuple[Path, Path], tmp_path: Path) -> None:
    tokens = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    original, _ = load_model(sources[0])
    default = quantize_checkpoint(sources[0], tmp_path / "a.safetensors", QuantSpec())
    compact = quantize_checkpoint(sources[0], tmp_path / "b.safetensors", QuantSpec(group=128, embed_bits=4))
    assert compact.output_bytes < default.output_bytes
    kl = [compare_models(original, load_model(r.path)[0], tokens).mean_kl for r in (default, compact)]
    assert kl[0] < kl[1] < 0.2


def test_text_files_bad_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the calibration text"):
        read_text_tokens(tmp_path / "none.txt", "world", 100, "calibration")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="too little calibration text"):
        read_text_tokens(empty, "world", 100, "calibration")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text_tokens(latin1, "world", 100, "calibration")
    good = tmp_path / "good.txt"
    good.write_text("one two three four five six seven")
    assert 2 <= len(read_text_tokens(good, "world", 3, "calibration")) <= 3


def test_cli_calib_and_estimate(random_model, tmp_path: Path) -> None:
    cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=65536, head_size=16)  # World vocabulary for --calib
    src = save_checkpoint(tmp_path / "w.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    runner = CliRunner()
    out = tmp_path / "q.safetensors"
    res = runner.invoke(app, ["quantize", "--estimate", str(src), "--calib", str(text)])
    assert res.exit_code == 0, res.output
    estimated = int(res.output.split(" bytes")[0].split()[-1].replace(",", ""))
    res = runner.invoke(app, ["quantize", str(src), str(out), "--calib", str(text), "--calib-tokens", "64"])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size == estimated
    res = runner.invoke(app, ["quantize", "--estimate", "--preset", "7b", "--group", "128", "--embed-bits", "4"])
    assert res.exit_code == 0 and "3,996,846,952 bytes" in res.output
    for argv, message in (
        (["--estimate", "--preset", "9b"], "unknown preset '9b'"),
        (["--estimate", "--preset", "7b", str(src)], "either a checkpoint or a --preset"),
        (["--estimate", str(src), str(out)], "--estimate writes nothing"),
        ([str(src)], "pass a checkpoint and an output"),
        ([str(src), str(tmp_path / "o.safetensors"), "--calib", str(tmp_path / "none.txt")], "calibration text"),
        ([str(src), str(tmp_path / "o.safetensors"), "--group", "7"], "--group must be an even number"),
    ):
        res = runner.invoke(app, ["quantize", *argv])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
