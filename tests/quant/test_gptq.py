"""GPTQ error feedback (rwkvctl.quant.gptq): less output error than plain rounding on the calibration inputs, the
group-affine file format unchanged, per-block Hessians, and `--calib-method` through the lifecycle and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.config import ModelConfig
from rwkvctl.errors import ConfigError
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.lifecycle.models import load_model
from rwkvctl.lifecycle.quantize import quantize_checkpoint
from rwkvctl.quant import calibrate
from rwkvctl.quant.gptq import gptq_codes, inverse_hessian_factor, output_error
from rwkvctl.quant.groupwise import GroupAffine, from_codes, quantize_weight, quantize_weight_gptq
from rwkvctl.quant.policy import QuantSpec

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs (n, cols) with unequal channel energies and correlated channels, as a layer's real inputs are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    return (torch.randn(n, cols, generator=g) * torch.linspace(0.1, 3.0, cols)) @ mix


def decoded(enc, rows: int, cols: int) -> torch.Tensor:  # noqa: ANN001 (an Encoded)
    return GroupAffine().decode(enc.stored, enc.params, slice(None)).view(rows, cols)


@pytest.mark.parametrize(("bits", "group"), [(4, 64), (4, 32), (8, 64), (4, 128)])
def test_gptq_reconstructs_outputs_better_than_plain_rounding(bits: int, group: int) -> None:
    rows, cols = 96, 128
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(1024, cols, seed=4)
    h = x.T @ x / len(x)
    plain = quantize_weight(w, bits, group, search=False)
    searched = quantize_weight(w, bits, group, search=True, importance=h.diagonal())
    gptq = quantize_weight_gptq(w, bits, group, h)
    errors = [output_error(x, w, decoded(e, rows, cols)) for e in (plain, searched, gptq)]
    assert errors[2] < 0.9 * errors[0] and errors[2] < errors[1], errors
    # the same stored form as every group-affine weight: the scheme's own check accepts it
    assert gptq.params == plain.params
    GroupAffine().check(gptq.stored, gptq.params, (rows, cols))
    assert {k: (t.dtype, t.shape) for k, t in gptq.stored.items()} == {
        k: (t.dtype, t.shape) for k, t in plain.stored.items()
    }


def test_gptq_codes_decode_to_what_it_reports() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(256, 64, seed=6)
    codes, scale, minimum = gptq_codes(w, x.T @ x / len(x), 4, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(scale, scale.half().float()) and torch.equal(minimum, minimum.half().float())
    enc = quantize_weight_gptq(w, 4, 32, x.T @ x / len(x))
    expected = from_codes(codes.float().view(8, 2, 32), scale, minimum).view(8, 64)  # (out, groups, group)
    assert torch.equal(decoded(enc, 8, 64), expected)


def test_dead_inputs_and_rank_deficient_hessians() -> None:
    x = correlated_inputs(16, 64, seed=7)  # fewer positions than inputs: X.T X is singular
    x[:, 5] = 0  # an input that never fires
    u = inverse_hessian_factor(x.T @ x / len(x))
    assert torch.isfinite(u).all() and torch.equal(u, u.triu())
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    enc = quantize_weight_gptq(w, 4, 32, x.T @ x / len(x))
    assert torch.isfinite(decoded(enc, 4, 64)).all()
    with pytest.raises(ConfigError, match=r"Hessian is \(8, 8\), not \(64, 64\)"):
        gptq_codes(w, torch.eye(8), 4, 32)


def test_hessians_windows_equal_one_pass_and_match_importance(random_model) -> None:
    model = random_model(CFG)
    tokens = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = {"blocks.1.att.key.weight", "blocks.1.ffn.value.weight", "head.weight"}
    whole = calibrate.collect_hessians(model, tokens, chosen, window=1000)
    windowed = calibrate.collect_hessians(model, tokens, chosen, window=40)
    importance = calibrate.collect_importance(model, tokens)
    assert set(whole) == chosen
    for name in chosen:
        cols = model.get_parameter(name).shape[1]
        assert whole[name].shape == (cols, cols)
        torch.testing.assert_close(whole[name], windowed[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(whole[name].diagonal(), importance[name], rtol=1e-4, atol=1e-7)
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def source(random_model, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "m.pth", random_model(CFG).state_dict(), CheckpointMeta(model=CFG, step=5))


def test_gptq_file_loads_and_keeps_quality(source: Path, tmp_path: Path, monkeypatch) -> None:
    tokens = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    import rwkvctl.lifecycle.quantize as lq

    asked: list[set[str]] = []
    real = lq.collect_hessians
    monkeypatch.setattr(lq, "collect_hessians", lambda m, t, names: asked.append(set(names)) or real(m, t, names))
    res = quantize_checkpoint(source, tmp_path / "g.safetensors", QuantSpec(), calib_tokens=tokens[:200],
                              calib_method="gptq", eval_tokens=tokens[200:])  # fmt: skip
    assert res.quality is not None and res.quality.mean_kl < 0.05  # the calibrated range mode's tolerance
    # a small model: every Linear's matrix in one pass
    assert len(asked) == 1 and {"blocks.0.att.key.weight", "blocks.1.ffn.value.weight", "head.weight"} <= asked[0]
    # under a budget smaller than a block: one pass per block (and one for the head), each only its own matrices
    asked.clear()
    tight = quantize_checkpoint(source, tmp_path / "t.safetensors", QuantSpec(), calib_tokens=tokens[:200],
                                calib_method="gptq", hessian_budget=1)  # fmt: skip
    units = [sorted({".".join(n.split(".")[:2]) for n in s}) for s in asked]
    assert units == [["blocks.0"], ["blocks.1"], ["head.weight"]]
    assert tensors_equal(res.path, tight.path)
    _, meta = load_model(res.path)
    assert meta.extra["quantization"]["calibrated"] is True and meta.extra["quantization"]["calib_method"] == "gptq"
    with safe_open(str(res.path), framework="pt") as f:
        records = json.loads(f.metadata()["rwkvctl-quant"])["tensors"]
    assert {r["scheme"] for r in records.values()} == {"group-affine"}
    # range calibration (the default method) records exactly what it always did
    rng = quantize_checkpoint(source, tmp_path / "r.safetensors", QuantSpec(), calib_tokens=tokens[:200])
    assert "calib_method" not in load_model(rng.path)[1].extra["quantization"]


def tensors_equal(a: Path, b: Path) -> bool:
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        keys = set(fa.keys())  # noqa: SIM118 (safe_open is not a dict)
        return keys == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)


def test_calib_method_needs_calibration_text(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs calibration text"):
        quantize_checkpoint(source, tmp_path / "a.safetensors", QuantSpec(), calib_method="gptq")
    with pytest.raises(ConfigError, match="unknown calibration method 'awq'"):
        quantize_checkpoint(source, tmp_path / "a.safetensors", QuantSpec(), calib_tokens=[1, 2], calib_method="awq")


def test_cli_calib_method(random_model, tmp_path: Path) -> None:
    cfg = ModelConfig(n_layer=1, n_embd=32, vocab_size=65536, head_size=16)  # World vocabulary for --calib
    src = save_checkpoint(tmp_path / "w.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "q.safetensors"
    runner = CliRunner()
    est = runner.invoke(app, ["quantize", "--estimate", str(src), "--calib", str(text), "--calib-method", "gptq"])
    assert est.exit_code == 0, est.output
    res = runner.invoke(app, ["quantize", str(src), str(out), "--calib", str(text), "--calib-method", "gptq",
                              "--calib-tokens", "64"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert out.stat().st_size == int(est.output.split(" bytes")[0].split()[-1].replace(",", ""))
    for argv, message in (
        ([str(src), str(tmp_path / "o.safetensors"), "--calib-method", "gptq"], "needs calibration text"),
        ([str(src), str(tmp_path / "o.safetensors"), "--calib", str(text), "--calib-method", "awq"],
         "--calib-method must be one of range, gptq"),
    ):  # fmt: skip
        res = runner.invoke(app, ["quantize", *argv])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
