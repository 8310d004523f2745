"""The packed-weight matmul kernel (rwkvctl/kernels/qmm.py, csrc/qmm_cpu.cpp) against the expanded weight."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkvctl.errors import KernelUnavailable
from rwkvctl.kernels import qmm
from rwkvctl.quant.groupwise import dequantize, quantize_weight

# (out, in, group): odd out sizes (a padded last tile), several groups, one group per row
SHAPES = [(37, 128, 32), (65, 192, 64), (33, 256, 128), (20, 96, 12), (17, 48, 16), (3, 8, 4), (40, 64, 64)]


@pytest.fixture(scope="module")
def extension():
    try:
        from rwkvctl.kernels.build import load_extension

        load_extension()
    except KernelUnavailable as e:
        pytest.skip(f"extension unavailable: {e}")


def _weight(out: int, cols: int, group: int, bits: int, seed: int = 0):
    w = torch.randn(out, cols, generator=torch.Generator().manual_seed(seed))
    enc = quantize_weight(w, bits, group, search=False)
    q, s, m = enc.stored["qweight"], enc.stored["scale"], enc.stored["min"]
    return q, s, m, dequantize(q, s, m, bits, group).double()


def _kernel_group(bits: int, group: int) -> int:
    """The SHAPES group as the kernel takes it: whole octets of inputs at 4 bits, pairs at 8 (12 -> 24, 4 -> 8)."""
    step = 8 if bits == 4 else 2
    return group if group % step == 0 else group * step // 4


def _rel_err(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Error relative to the size of the summed terms (|x| @ |W|.T), so cancellation does not hide it."""
    return ((y.double() - x.double() @ w.T).abs() / (x.double().abs() @ w.abs().T).clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out,cols,group", SHAPES)
def test_pack_and_unpack_are_inverse(bits: int, out: int, cols: int, group: int) -> None:
    group = _kernel_group(bits, group)
    q, s, m, _ = _weight(out, cols, group, bits)
    tiles = qmm.pack(q, s, m, bits, group)
    assert tiles.codes.shape == (-(-out // qmm.TILE), qmm.TILE * cols * bits // 8)
    back = qmm.unpack(tiles)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, s, m), strict=True))


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512bw", "avx512"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out,cols,group", SHAPES)
def test_kernel_matches_the_expanded_weight(extension, monkeypatch, isa, bits, out, cols, group) -> None:
    monkeypatch.setenv("RWKVCTL_CPU_ISA", isa)  # caps the level: every variant runs on this CPU's capabilities
    if isa == "avx512bw":
        assert qmm.level() != "avx512vnni"  # the plain AVX-512BW variant runs even where VNNI exists
    group = _kernel_group(bits, group)
    q, s, m, w = _weight(out, cols, group, bits)
    tiles = qmm.pack(q, s, m, bits, group)
    # the rounded activations meet code * scale, which can exceed |W| where the group's min cancels it
    coded = dequantize(q, s, torch.zeros_like(m), bits, group).double().abs()
    gen = torch.Generator().manual_seed(1)
    for n in range(1, 18):
        x = torch.randn(n, cols, generator=gen)
        y = qmm.matmul(x, tiles)
        assert y.shape == (n, out) and y.dtype == torch.float32
        # int16 activations: each within 2^-16 of its group's largest input
        err = (y.double() - x.double() @ w.T).abs() / (x.double().abs() @ (w.abs() + coded).T).clamp_min(1e-30)
        assert err.max().item() < 1e-4, (n, isa)


def test_kernel_takes_any_strides_and_float_dtypes(extension) -> None:
    q, s, m, w = _weight(29, 128, 32, 4)
    tiles = qmm.pack(q, s, m, 4, 32)
    x = torch.randn(128, 6).t()  # (6, 128), not contiguous
    assert not x.is_contiguous()
    assert _rel_err(qmm.matmul(x, tiles), x, w) < 1e-4
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dtype)
        assert _rel_err(qmm.matmul(xd, tiles), xd.float(), w) < 1e-4


def test_kernel_edge_inputs(extension) -> None:
    q, s, m, w = _weight(16, 64, 32, 8)
    tiles = qmm.pack(q, s, m, 8, 32)
    zeros = torch.zeros(2, 64)
    assert torch.equal(qmm.matmul(zeros, tiles), torch.zeros(2, 16))  # all-zero groups: scale 1, codes 0
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    y = qmm.matmul(x, tiles)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()  # NaN reaches the output, never silently dropped
    assert qmm.matmul(torch.empty(0, 64), tiles).shape == (0, 16)


def test_supports_names_what_the_kernel_cannot_take() -> None:
    assert qmm.supports(4, 64, 768) is None and qmm.supports(8, 2, 768) is None
    assert "groups of 6" in qmm.supports(4, 6, 48)
    assert "multiple of 8" in qmm.supports(4, 12, 48)  # 4 bits: whole octets of inputs per group
    assert "8-bit groups over 256" in qmm.supports(8, 512, 2048)
    assert "4-bit groups over 4096" in qmm.supports(4, 8192, 8192)


@pytest.mark.parametrize("bits, group", [(8, 256), (4, 4096)])
def test_the_largest_groups_sum_without_overflow(extension, bits, group) -> None:
    """Every code at its top value against activations at the int16 maximum: the int32 sums of the largest
    group the kernel takes stay exact (at 8 bits, 512 inputs overflowed)."""
    top = (1 << bits) - 1
    q = torch.full((16, group * bits // 8), 255, dtype=torch.uint8)  # every code top (two 4-bit codes per byte)
    s = torch.ones(16, 1, dtype=torch.float16)
    m = torch.zeros(16, 1, dtype=torch.float16)
    tiles = qmm.pack(q, s, m, bits, group)
    for x in (torch.ones(1, group), -torch.ones(1, group)):
        want = float(x.sum()) * top
        assert torch.equal(qmm.matmul(x, tiles), torch.full((1, 16), want))


@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_and_plain_avx512_give_the_same_bits(extension, monkeypatch, bits) -> None:
    """The integer sums are exact whatever instructions form them (4 bits: high and low activation bytes multiplied
    apart and combined), and both AVX-512 variants scale them in the same order: bitwise equal results, including
    activations at the int16 extremes (+-32767 after rounding) and negative values with every low byte."""
    monkeypatch.delenv("RWKVCTL_CPU_ISA", raising=False)
    if qmm.level() != "avx512vnni":
        pytest.skip("needs a CPU with AVX-512 VNNI")
    q, s, m, _ = _weight(48, 256, 64, bits)
    tiles = qmm.pack(q, s, m, bits, 64)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    x[0, :64] = -1.0  # a whole group at the negative extreme
    x[1, 64:128] = torch.linspace(-1, 1, 64)
    x[2, 128:192] = -torch.arange(64) / 63.0  # low bytes 0..255 over negative values
    vnni = qmm.matmul(x, tiles)
    monkeypatch.setenv("RWKVCTL_CPU_ISA", "avx512bw")
    assert qmm.level() == "avx512bw"
    assert torch.equal(qmm.matmul(x, tiles), vnni)


def test_backend_setting(monkeypatch) -> None:
    monkeypatch.setenv("RWKVCTL_QMM", "reference")
    assert not qmm.usable(4, 64, 768, torch.device("cpu"))
    monkeypatch.setenv("RWKVCTL_QMM", "compiled")
    with pytest.raises(KernelUnavailable, match="RWKVCTL_QMM=compiled but .*groups of 6"):
        qmm.usable(4, 6, 48, torch.device("cpu"))
    monkeypatch.setenv("RWKVCTL_QMM", "fast")
    with pytest.raises(KernelUnavailable, match="RWKVCTL_QMM must be one of auto, compiled, reference"):
        qmm.backend_mode()


def test_gpu_kernel_support_and_its_fallback(extension, monkeypatch, caplog) -> None:
    """Which weights the CUDA kernel takes (whole 32-bit words of codes per group), and that without a CUDA build
    the GPU path says once why it is not used instead of failing."""
    assert qmm.supports_gpu(4, 64, 768) is None and qmm.supports_gpu(8, 4, 8) is None
    assert "multiple of 8" in qmm.supports_gpu(4, 4, 64)
    assert "multiple of 4" in qmm.supports_gpu(8, 2, 64)
    assert "3-bit" in qmm.supports_gpu(3, 64, 768)
    from rwkvctl.kernels.build import load_extension

    if load_extension().with_cuda:
        pytest.skip("the extension has its CUDA part here")
    monkeypatch.setenv("RWKVCTL_QMM", "compiled")
    with pytest.raises(KernelUnavailable, match="built without CUDA"):
        qmm.usable_on_gpu(4, 64, 768, torch.device("cuda"))
    assert not qmm.usable_on_gpu(4, 64, 768, torch.device("cpu"))  # off CUDA: no notice, no error
    monkeypatch.setenv("RWKVCTL_QMM", "reference")
    assert not qmm.usable_on_gpu(4, 64, 768, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_on_cuda_uses_the_gpu_kernel(extension, bits) -> None:
    """A packed layer on a GPU: decode rows through group_affine_mv, against the same layer on the CPU."""
    from rwkvctl.quant.linear import QuantLinear
    from rwkvctl.quant.schemes import encode_with

    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(bits))
    packed = encode_with("group-affine", w, bits=bits, group=64)[0]
    on_cpu, on_gpu = QuantLinear(packed), QuantLinear(packed).cuda()
    for n in (1, 5, 16):
        x = torch.randn(n, 256, generator=torch.Generator().manual_seed(n))
        y = on_gpu(x.cuda())
        assert on_gpu._gpu and y.shape == (n, 300) and y.is_cuda
        torch.testing.assert_close(y.cpu(), on_cpu(x), rtol=1e-4, atol=1e-4)
    moved = copy.deepcopy(on_cpu).cuda()  # ran on the CPU first: holds the CPU kernel's tiles
    x = torch.randn(3, 256)
    torch.testing.assert_close(moved(x.cuda()).cpu(), on_cpu(x), rtol=1e-4, atol=1e-4)
    assert moved._gpu_unpacked is not None
