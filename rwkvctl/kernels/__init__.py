"""WKV5 entry point: the compiled extension where it builds, the pure-PyTorch reference otherwise.

`wkv5(r, k, v, w, u, state)` follows the conventions documented in `rwkvctl.kernels.reference`.
"""

from __future__ import annotations

from torch import Tensor

from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop

__all__ = ["wkv5", "wkv5_chunked", "wkv5_loop"]


def wkv5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """WKV5 over a sequence: r,k,v (B,T,H,N); w,u (H,N); state (B,H,N,N) fp32 or None -> (y, state)."""
    return wkv5_chunked(r, k, v, w, u, state)
