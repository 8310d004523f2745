"""Python half of the `rwkvctl::wkv5_fwd` / `rwkvctl::wkv5_bwd` ops (fake kernels and autograd) and the fake kernel
of `rwkvctl::group_affine_mm` (rwkvctl/kernels/qmm.py).

The schema and the CPU/CUDA kernels are defined in C++ (csrc/wkv5_op.cpp); this module adds the
fake (meta) implementations that torch.compile needs and the autograd formula (the extension-cpp
ops.py pattern). `register_python_parts()` runs once, right after the library is loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

_registered = False


def register_python_parts() -> None:
    """Attach fake implementations and autograd to the loaded C++ ops (idempotent)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("rwkvctl::wkv5_fwd")(_wkv5_fwd_fake)
    torch.library.register_fake("rwkvctl::wkv5_bwd")(_wkv5_bwd_fake)
    torch.library.register_fake("rwkvctl::group_affine_mm")(_group_affine_mm_fake)
    torch.library.register_autograd("rwkvctl::wkv5_fwd", _wkv5_backward, setup_context=_wkv5_setup_context)
    torch.library.register_autograd("rwkvctl::wkv5_bwd", _no_double_backward, setup_context=_no_context)
    _registered = True


def _wkv5_fwd_fake(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s_in: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    return r.new_empty(B, T, H, N), s_in.new_empty(B, H, N, N, dtype=torch.float32)


def _wkv5_bwd_fake(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s_in: Tensor, gy: Tensor, g_s_out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, H, N = r.shape
    return (
        r.new_empty(B, T, H, N),
        k.new_empty(B, T, H, N),
        v.new_empty(B, T, H, N),
        w.new_empty(H, N),
        u.new_empty(H, N),
        s_in.new_empty(B, H, N, N, dtype=torch.float32),
    )


def _group_affine_mm_fake(
    x: Tensor, qtiles: Tensor, scale: Tensor, minimum: Tensor, out: int, bits: int, group: int
) -> Tensor:
    return x.new_empty(x.shape[0], out, dtype=torch.float32)


def _wkv5_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # r, k, v, w, u, s_in: the backward recomputes the states from s_in


def _wkv5_backward(ctx, gy: Tensor | None, g_s_out: Tensor | None):
    r, k, v, w, u, s_in = ctx.saved_tensors
    if gy is None:  # only the final state was used
        gy = torch.zeros_like(r)
    return torch.ops.rwkvctl.wkv5_bwd(r, k, v, w, u, s_in, gy, g_s_out)


def _no_context(ctx, inputs, output) -> None:
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "the compiled WKV5 op has no double backward (create_graph=True); use RWKVCTL_WKV=reference for "
        "higher-order gradients"
    )


def wkv5_compiled(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None):
    """The compiled op with the reference's signature; `state=None` means a zero initial state."""
    if state is None:
        B, _, H, N = r.shape
        state = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    elif state.dtype != torch.float32:
        state = state.float()
    return torch.ops.rwkvctl.wkv5_fwd(r, k, v, w, u, state)
