"""WKV5 entry point: the compiled extension where it builds, the pure-PyTorch reference otherwise.

`wkv5(r, k, v, w, u, state)` follows the conventions documented in `rwkvctl.kernels.reference`.
The extension (csrc/) is compiled on first use, never at import. RWKVCTL_WKV selects the backend:
`auto` (default: compiled, else the chunked reference with a one-time warning), `compiled` (fail with
KernelUnavailable instead of falling back) or `reference` (always the chunked PyTorch reference).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from rwkvctl import native_build
from rwkvctl.errors import KernelUnavailable
from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop

__all__ = ["SUPPORTED_HEAD_SIZES", "backend_mode", "uses_compiled", "wkv5", "wkv5_chunked", "wkv5_loop"]

SUPPORTED_HEAD_SIZES = (16, 32, 64, 128)  # the specialisations compiled in csrc/static_switch.h
log = logging.getLogger("rwkvctl.kernels")
SWITCH = native_build.Switch("WKV", ("auto", "compiled", "reference"), KernelUnavailable, log,
                             "WKV5: using the pure-PyTorch reference kernel because %s")  # fmt: skip


def backend_mode() -> str:
    """The RWKVCTL_WKV setting: auto, compiled or reference."""
    return SWITCH.mode()


@torch.compiler.disable
def _load_or_failure():
    from rwkvctl.kernels.build import load_extension

    try:
        return load_extension()
    except KernelUnavailable as e:
        return e


def uses_compiled(r: Tensor) -> bool:
    """Whether `wkv5` runs the compiled op for inputs like `r` (builds/loads the extension on first call)."""
    mode = backend_mode()
    if mode == "reference":
        return False
    if r.shape[-1] not in SUPPORTED_HEAD_SIZES:  # before any build: a minute of compiling would be wasted
        return SWITCH.fallback(f"head size {r.shape[-1]} is not one of {SUPPORTED_HEAD_SIZES}", mode)
    if r.device.type not in ("cpu", "cuda"):
        return SWITCH.fallback(f"there is no WKV5 kernel for device type {r.device.type!r}", mode)
    from rwkvctl.kernels import build

    # Plain reads of module state once loaded, so torch.compile traces straight through this function;
    # the first build/load happens in a function dynamo skips.
    info = build.loaded()
    if info is None:
        failed = build.failure() or _load_or_failure()
        if isinstance(failed, KernelUnavailable):
            return SWITCH.fallback(str(failed), mode)
        info = failed
    if r.device.type == "cuda" and not info.with_cuda:
        why = "the extension was built without CUDA (no CUDA_HOME/nvcc, or RWKVCTL_WKV_SKIP_CUDA)"
        return SWITCH.fallback(why, mode)
    if r.device.type == "cuda" and r.dtype == torch.float64:
        return SWITCH.fallback("the CUDA kernel takes fp32/fp16/bf16 inputs, not float64", mode)
    if r.device.type not in ("cpu", "cuda"):
        return SWITCH.fallback(f"there is no WKV5 kernel for device type {r.device.type!r}", mode)
    return True


def wkv5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """WKV5 over a sequence: r,k,v (B,T,H,N) or (B,T,C=H*N); w,u (H,N); state (B,H,N,N) fp32 or None -> (y, state).

    y has the shape of r.
    """
    if r.dim() == 3:  # (B, T, C) -> (B, T, H, N), heads taken from w
        B, T, _ = r.shape
        H, N = w.shape
        y, state = wkv5(*(x.reshape(B, T, H, N) for x in (r, k, v)), w, u, state)
        return y.reshape(B, T, H * N), state
    if r.shape[0] == 0 or r.shape[2] == 0:  # an empty batch or no heads: nothing for a kernel to do
        return wkv5_chunked(r, k, v, w, u, state)
    if uses_compiled(r):
        from rwkvctl.kernels.ops import wkv5_compiled

        return wkv5_compiled(r, k, v, w, u, state)
    return wkv5_chunked(r, k, v, w, u, state)
