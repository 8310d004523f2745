"""QuantLinear's run-time paths: the compiled kernel for few rows, the scheme's reference matmul otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import KernelUnavailable
from rwkvctl.kernels import qmm
from rwkvctl.lifecycle.models import create_checkpoint, load_model
from rwkvctl.lifecycle.quantize import quantize_checkpoint
from rwkvctl.quant import groupwise
from rwkvctl.quant.linear import QuantLinear
from rwkvctl.quant.policy import QuantSpec
from rwkvctl.quant.schemes import PackedWeight, get_scheme

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=512, head_size=32)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    try:
        from rwkvctl.kernels.build import load_extension

        load_extension()
    except KernelUnavailable as e:
        pytest.skip(f"extension unavailable: {e}")
    d = tmp_path_factory.mktemp("q")
    create_checkpoint(d / "m.pth", CFG, seed=3)
    return quantize_checkpoint(d / "m.pth", d / "q.safetensors", QuantSpec()).path


def _steps(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, state = model(idx)
        logits, _ = model.step(idx[:, -1], state)
    return logits


def test_fast_path_logits_match_the_reference_path(quantized: Path, monkeypatch) -> None:
    idx = torch.randint(0, CFG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("RWKVCTL_QMM", "reference")
    ref_model, _ = load_model(quantized, keep_quantized=True)
    assert not hasattr(ref_model.head, "qtiles")  # forced reference: nothing repacked
    ref = _steps(ref_model, idx)
    monkeypatch.setenv("RWKVCTL_QMM", "compiled")
    fast_model, _ = load_model(quantized, keep_quantized=True)
    assert fast_model.head.prepare() and hasattr(fast_model.head, "qtiles")
    assert not hasattr(fast_model.head, "qweight")  # the tiles replace the stored form
    fast = _steps(fast_model, idx)
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 1e-4 * scale  # int16 activations: ~2e-5 relative per matmul
    expanded, _ = load_model(quantized)
    assert (_steps(expanded, idx) - ref).abs().max() <= 1e-5 * scale  # the reference: fp32 all the way
    # bf16 model: scales stay fp16 in their tiles, logits in bf16
    half, _ = load_model(quantized, keep_quantized=True, dtype=torch.bfloat16)
    assert half.head.scale_tiles.dtype == torch.int16
    assert torch.allclose(_steps(half, idx).float(), ref, atol=0.05 * float(scale))


def test_tiles_unpack_to_the_stored_form(quantized: Path) -> None:
    packed, _ = load_model(quantized, keep_quantized=True)
    layer = packed.blocks[0].att.key
    if not layer.prepare():
        pytest.skip("the kernel does not run on this machine")
    before = {k: v.clone() for k, v in layer.stored().items()}
    x = torch.randn(40, CFG.n_embd)  # many rows: GroupAffine's matmul on the unpacked tiles
    w = get_scheme(groupwise.NAME).decode(before, layer.params, slice(None))
    torch.testing.assert_close(layer(x), x @ w.T, atol=1e-5, rtol=1e-5)


def _layer(bits: int, group: int, cols: int = 48) -> QuantLinear:
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(0))
    enc = groupwise.quantize_weight(w, bits, group)
    return QuantLinear(PackedWeight(get_scheme(groupwise.NAME), enc.params, enc.stored, (24, cols), w.dtype))


def test_unsupported_weight_falls_back_with_one_notice(caplog, monkeypatch) -> None:
    monkeypatch.setattr(qmm.SWITCH, "warned", set())
    layer = _layer(4, 6)  # groups of 6: not a multiple of 4
    x = torch.randn(2, 48)
    with caplog.at_level(logging.WARNING, logger="rwkvctl.kernels"):
        y1, y2 = layer(x), _layer(4, 6)(x)
    notices = [r for r in caplog.records if "reference matmul" in r.getMessage()]
    assert len(notices) == 1 and "groups of 6" in notices[0].getMessage()
    assert torch.equal(y1, y2) and not hasattr(layer, "qtiles")


def test_a_cpu_without_avx2_takes_the_reference_matmul_with_one_notice(caplog, monkeypatch) -> None:
    """RWKVCTL_CPU_ISA=default stands in for a CPU without AVX2: in auto mode the packed layers keep the scheme's
    own matmul (the portable kernel loop is slower than it) and say so once, whatever the number of layers; the
    outputs are the reference's. RWKVCTL_QMM=compiled still takes the kernel, at its portable level, which gives
    what the native level gives."""
    monkeypatch.setattr(qmm.SWITCH, "warned", set())
    monkeypatch.setenv("RWKVCTL_CPU_ISA", "default")
    monkeypatch.setenv("RWKVCTL_QMM", "auto")
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="rwkvctl.kernels"):
        a, b = _layer(4, 32, 64), _layer(8, 32, 64)
        ya, yb = a(x), b(x)
    notices = [r.getMessage() for r in caplog.records if "reference matmul" in r.getMessage()]
    assert notices == ["packed weights: using the slower reference matmul because this CPU has no AVX2 "
                       "(or RWKVCTL_CPU_ISA=default)"]
    assert not hasattr(a, "qtiles") and not hasattr(b, "qtiles")
    for layer, y in ((a, ya), (b, yb)):
        w = layer.scheme.decode(layer.stored(), layer.params, slice(None))
        torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("RWKVCTL_QMM", "compiled")
    forced = _layer(4, 32, 64)
    y_portable = forced(x)
    assert hasattr(forced, "qtiles") and qmm.level() == "portable"
    monkeypatch.delenv("RWKVCTL_CPU_ISA")
    native = _layer(4, 32, 64)
    # the same integer sums at every level, only the fp32 order of the per-group scaling differs
    torch.testing.assert_close(y_portable, native(x), atol=1e-5, rtol=1e-5)


def test_extension_failure_falls_back_with_one_notice(caplog, monkeypatch) -> None:
    from rwkvctl.kernels import build

    def broken(verbose: bool = False):
        raise KernelUnavailable("no C++ compiler ('c++') on PATH")

    monkeypatch.setattr(qmm.SWITCH, "warned", set())
    monkeypatch.setattr(build, "load_extension", broken)
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="rwkvctl.kernels"):
        a, b = _layer(4, 32, 64), _layer(4, 32, 64)
        ya, yb = a(x), b(x)
    assert [r.getMessage() for r in caplog.records].count(
        "packed weights: using the slower reference matmul because no C++ compiler ('c++') on PATH"
    ) == 1
    w = a.scheme.decode(a.stored(), a.params, slice(None))
    torch.testing.assert_close(ya, x @ w.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(ya, yb)


class Affine4(groupwise.GroupAffine):
    """A scheme with its own name and tensor names that presents itself as group-affine (the affine_view contract)."""

    name = "toy-affine"
    tensor_names = ("codes", "s", "m")

    def encode(self, w, **options):
        enc = super().encode(w, **options)
        st = enc.stored
        return type(enc)({"codes": st["qweight"], "s": st["scale"], "m": st["min"]}, enc.params, enc.rel_error)

    def check(self, stored, params, shape):
        return None

    def decode(self, stored, params, rows):
        return groupwise.dequantize(stored["codes"][rows], stored["s"][rows], stored["m"][rows], params["bits"],
                                    params["group"])

    def affine_view(self, stored, params):
        return stored["codes"], stored["s"], stored["m"], params["bits"], params["group"]


def test_a_scheme_with_an_affine_view_uses_the_kernel(quantized: Path) -> None:
    scheme = Affine4()
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    enc = scheme.encode(w, bits=8, group=32)
    layer = QuantLinear(PackedWeight(scheme, enc.params, enc.stored, (40, 64), w.dtype))
    full = scheme.decode(enc.stored, enc.params, slice(None))
    x = torch.randn(5, 64)
    y = layer(x)
    assert hasattr(layer, "qtiles")  # took the kernel
    assert ((y - x @ full.T).abs() / (x.abs() @ full.abs().T)).max() < 1e-4
    many = torch.randn(30, 64)  # many rows: GroupAffine's reference on the unpacked tiles
    torch.testing.assert_close(layer(many), many @ full.T, atol=1e-5, rtol=1e-5)
