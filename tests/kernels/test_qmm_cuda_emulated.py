"""The packed-matmul CUDA kernel (csrc/cuda/qmm_kernels.cuh) run on the CPU, one std::thread per CUDA thread,
against the expanded weight: its word layout, group scaling and block reduction, without a GPU."""

from __future__ import annotations

import shutil

import pytest
import torch

from rwkvctl.quant.groupwise import dequantize, quantize_weight

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")]


@pytest.fixture(scope="module")
def ops(build_cuda_emulation):
    build_cuda_emulation("qmm_cuda_emulation", "qmm_cuda_emulation.cpp")
    return torch.ops.rwkvctl_qmm_cuda_emulation


# (out, in, group): several groups per row, one group per row, rows longer than the block's 128 words
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out, cols, group", [(5, 64, 16), (3, 2048, 64), (7, 96, 96), (2, 32, 8)])
def test_emulated_cuda_packed_matmul_against_the_expanded_weight(ops, bits, out, cols, group):
    gen = torch.Generator().manual_seed(out + cols)
    w = torch.randn(out, cols, generator=gen)
    stored = quantize_weight(w, bits, group, search=False).stored
    q, s, m = stored["qweight"], stored["scale"], stored["min"]
    want_w = dequantize(q, s, m, bits, group).double()
    for n in (1, 3, 16):
        x = torch.randn(n, cols, generator=gen)
        y = ops.group_affine_mv(x, q, s, m, bits, group)
        want = x.double() @ want_w.T
        # fp32 sums of code * x per word, then scaled: relative to the size of the summed terms
        scale = x.double().abs() @ (want_w.abs() + dequantize(q, s, torch.zeros_like(m), bits, group).double()).T
        assert y.shape == (n, out)
        assert ((y.double() - want).abs() <= 1e-5 * scale + 1e-6).all(), (n, bits)


def test_emulated_half_conversion_is_exact(ops):
    """The kernel's fp16 decoding (no cuda_fp16.h) against torch's, over every finite, infinite and NaN half."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    want = bits.to(torch.int16).view(torch.float16).float()
    sample = list(range(0, 1 << 16, 97)) + [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x7E00]
    for b in sample:
        got = ops.half_bits_to_float(b)
        expected = want[b].item()
        assert (got != got and expected != expected) or got == expected, hex(b)
