"""The recurrent state an RWKV-5 model carries from one token (or segment) to the next."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rwkvctl.config import ModelConfig


@dataclass
class RecurrentState:
    """Per-layer token-shift vectors and WKV matrices.

    att_shift, ffn_shift: (L, B, C) the last ln1/ln2 output of the previous token (time-mix / channel-mix).
    wkv: (L, B, H, N, N) fp32, indexed [key j, value i]. Its size does not depend on context length.
    """

    att_shift: Tensor
    ffn_shift: Tensor
    wkv: Tensor

    @classmethod
    def zeros(
        cls, cfg: ModelConfig, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> RecurrentState:
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return cls(
            att_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
            ffn_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch, H, N, N, device=device, dtype=torch.float32),
        )

    def clone(self) -> RecurrentState:
        """An independent copy, e.g. to branch a conversation."""
        return RecurrentState(self.att_shift.clone(), self.ffn_shift.clone(), self.wkv.clone())
