"""The packed-weight matmul `rwkvctl::group_affine_mm` (csrc/qmm_cpu.cpp): x @ W.T for a group-affine weight
(W[o, k] = code * scale + min per group of `group` inputs, 4- or 8-bit codes) without expanding W; on CUDA
`rwkvctl::group_affine_mv` (csrc/cuda/qmm_cuda.cu, `matmul_gpu`) reads the stored form for up to 16 rows.

The kernel reads its own tiled copy of the codes, made once by `pack` (16 output rows side by side, so one widened
vector of codes meets a broadcast pair of activations); see the layout in csrc/qmm_cpu.cpp. Activations are rounded
per group to int16 inside the kernel (relative error < 2^-16 of the group's largest value) so the products are exact
integer sums: AVX-512 VNNI / AVX-512BW / AVX2 picked at run time, a portable loop otherwise. `unpack` inverts
`pack`, so a module that keeps only the tiles can still hand out the stored form.

RWKVCTL_QMM=auto|compiled|reference picks the backend (`usable`). Where the op exists: the rwkvctl extension
(rwkvctl/kernels/build.py) built and loaded, CPU tensors, bits 4 or 8, `group` a multiple of 8 (of 2 at 8 bits)
dividing the row and at most MAX_GROUP_4BIT / MAX_GROUP_8BIT inputs (int32 sums).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkvctl import native_build
from rwkvctl.errors import KernelUnavailable

TILE = 16  # output rows per tile (csrc/qmm_cpu.cpp kTile)
MAX_GROUP_8BIT = 256  # 256 * 255 * 32767 still fits an int32 lane (512 inputs could overflow)
MAX_GROUP_4BIT = 4096  # the 4-bit kernel's sums over activation high bytes, 15 * 128 * 256 per input, fit one too
LEVELS = ("portable", "avx2", "avx512bw", "avx512vnni")  # rwkvctl::group_affine_level()
log = logging.getLogger("rwkvctl.kernels")


@dataclass(frozen=True)
class Tiles:
    """A weight in the kernel's layout: codes (tiles, 16 * in * bits / 8) uint8, scale and min (tiles, groups, 16)
    as int16 holding fp16 bits."""

    codes: Tensor
    scale: Tensor
    minimum: Tensor
    out: int
    bits: int
    group: int


def supports(bits: int, group: int, in_features: int) -> str | None:
    """None if the kernel takes a weight of this form, else why not (a short phrase)."""
    if bits not in (4, 8):
        return f"{bits}-bit codes"
    step = 8 if bits == 4 else 2
    if group % step or in_features % group:
        return f"groups of {group} (the kernel needs a multiple of {step} dividing the row)"
    limit = MAX_GROUP_4BIT if bits == 4 else MAX_GROUP_8BIT
    if group > limit:
        return f"{bits}-bit groups over {limit}"
    return None


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0])) if rows > t.shape[0] else t


def pack(qweight: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tiles:
    """The stored group-affine tensors (qweight (out, in * bits / 8) uint8, two 4-bit codes per byte with the low
    nibble first; scale, min (out, in / group) fp16) -> the kernel's tiles."""
    out = qweight.shape[0]
    tiles = -(-out // TILE)
    rows = tiles * TILE
    if bits == 8:
        cols = qweight.shape[1]
        codes = _pad_rows(qweight, rows).view(tiles, TILE, cols // 2, 2)  # (out, in) -> (tiles, 16, pairs, 2)
        packed = codes.permute(0, 2, 1, 3)  # -> (tiles, pairs, 16, 2)
    else:
        cols = qweight.shape[1] * 2
        low, high = qweight & 0x0F, qweight >> 4
        codes = torch.stack((low, high), -1).view(out, cols)  # (out, in/2) -> (out, in/2, 2) -> (out, in)
        octets = _pad_rows(codes, rows).view(tiles, TILE, cols // 8, 2, 4)  # input 8o + 4h + t -> [.., o, h, t]
        packed = (octets[..., 0, :] | (octets[..., 1, :] << 4)).permute(0, 2, 1, 3)  # (tiles, octets, 16, 4)
    packed = packed.contiguous().view(tiles, -1)

    def per_tile(t: Tensor) -> Tensor:  # (out, groups) fp16 -> (tiles, groups, 16) int16 bits
        padded = _pad_rows(t.to(torch.float16), rows).view(tiles, TILE, -1)
        return padded.transpose(1, 2).contiguous().view(torch.int16)

    return Tiles(packed, per_tile(scale), per_tile(minimum), out, bits, group)


def unpack(tiles: Tiles) -> tuple[Tensor, Tensor, Tensor]:
    """`pack` inverted: (qweight, scale, min) in the stored form."""
    n_tiles, rows = tiles.codes.shape[0], tiles.codes.shape[0] * TILE
    if tiles.bits == 8:
        packed = tiles.codes.view(n_tiles, -1, TILE, 2).permute(0, 2, 1, 3)  # (tiles, pairs, 16, 2) -> rows first
        qweight = packed.reshape(rows, -1)[: tiles.out]
    else:
        packed = tiles.codes.view(n_tiles, -1, TILE, 4).permute(0, 2, 1, 3)  # (tiles, 16, octets, 4)
        octets = torch.stack((packed & 0x0F, packed >> 4), -2)  # (tiles, 16, octets, h, t): input 8o + 4h + t
        codes = octets.reshape(rows, -1)[: tiles.out]
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()

    def per_row(t: Tensor) -> Tensor:  # (tiles, groups, 16) int16 bits -> (out, groups) fp16
        return t.view(torch.float16).transpose(1, 2).reshape(rows, -1)[: tiles.out].contiguous()

    return qweight.contiguous(), per_row(tiles.scale), per_row(tiles.minimum)


def supports_gpu(bits: int, group: int, in_features: int) -> str | None:
    """None if the CUDA kernel (csrc/cuda/qmm_kernels.cuh) takes a weight of this form, else why not."""
    if bits not in (4, 8):
        return f"{bits}-bit codes"
    step = 32 // bits  # inputs per 32-bit word of codes, which must not straddle groups
    if group % step or in_features % group:
        return f"groups of {group} (the CUDA kernel needs a multiple of {step} dividing the row)"
    return None


def usable_on_gpu(bits: int, group: int, in_features: int, device: torch.device) -> bool:
    """Whether `matmul_gpu` should run for such a weight on `device` (False off CUDA); one notice per reason if not."""
    mode = backend_mode()
    if mode == "reference" or device.type != "cuda":
        return False
    if (why := supports_gpu(bits, group, in_features)) is not None:
        return SWITCH.fallback(f"the CUDA kernel does not take {why}", mode)
    from rwkvctl.kernels.build import load_extension

    try:
        info = load_extension()
    except KernelUnavailable as e:
        return SWITCH.fallback(str(e), mode)
    if not info.with_cuda:
        return SWITCH.fallback("the extension was built without CUDA (RWKVCTL_WKV_SKIP_CUDA=1, or no CUDA toolkit)",
                               mode)  # fmt: skip
    return True


def matmul_gpu(x: Tensor, qweight: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """x (n <= 16, in) on a CUDA device @ W.T -> (n, out) fp32, W in the stored group-affine form (qweight uint8,
    scale and min fp16) read by csrc/cuda/qmm_cuda.cu without expanding it."""
    return torch.ops.rwkvctl.group_affine_mv(x, qweight, scale, minimum, bits, group)


def matmul(x: Tensor, tiles: Tiles) -> Tensor:
    """x (n, in) of any float dtype and strides @ W.T -> (n, out) fp32. Needs the extension loaded."""
    return torch.ops.rwkvctl.group_affine_mm(
        x, tiles.codes, tiles.scale, tiles.minimum, tiles.out, tiles.bits, tiles.group
    )


def level() -> str:
    """The instruction set the kernel runs with on this CPU (after RWKVCTL_CPU_ISA)."""
    return LEVELS[torch.ops.rwkvctl.group_affine_level()]


SWITCH = native_build.Switch("QMM", ("auto", "compiled", "reference"), KernelUnavailable, log,
                             "packed weights: using the slower reference matmul because %s")  # fmt: skip


def backend_mode() -> str:
    """The RWKVCTL_QMM setting: auto (the kernel where it runs, else the reference with one notice), compiled (fail
    instead of falling back) or reference (always the scheme's own matmul)."""
    return SWITCH.mode()


def usable(bits: int, group: int, in_features: int, device: torch.device) -> bool:
    """Whether `matmul` should run for such a weight here; builds/loads the extension on first call. Says once per
    reason (a logging warning on rwkvctl.kernels) why not, unless RWKVCTL_QMM=reference asked for that."""
    mode = backend_mode()
    if mode == "reference":
        return False
    if device.type != "cpu":
        return SWITCH.fallback(f"there is no packed-weight kernel for device type {device.type!r}", mode)
    if (why := supports(bits, group, in_features)) is not None:
        return SWITCH.fallback(f"the kernel does not take {why}", mode)
    from rwkvctl.kernels.build import load_extension

    try:
        load_extension()
    except KernelUnavailable as e:
        return SWITCH.fallback(str(e), mode)
    if level() == "portable" and mode == "auto":
        return SWITCH.fallback("this CPU has no AVX2 (or RWKVCTL_CPU_ISA=default)", mode)
    return True
