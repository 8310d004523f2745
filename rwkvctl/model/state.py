"""The recurrent state an RWKV-5 model carries from one token (or segment) to the next."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rwkvctl.arch import arch_of
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
        """Every tensor of the architecture's state layout (rwkvctl.arch), (L, ...) -> (L, batch, ...), zeroed."""
        spec = arch_of(cfg)
        return cls(**{
            name: torch.zeros(L, batch, *rest, device=device, dtype=torch.float32 if name in spec.state_fp32 else dtype)
            for name, (L, *rest) in spec.state_shapes(cfg).items()
        })

    def clone(self) -> RecurrentState:
        """An independent copy, e.g. to branch a conversation."""
        return RecurrentState(self.att_shift.clone(), self.ffn_shift.clone(), self.wkv.clone())

    def rows(self, index: slice | int) -> RecurrentState:
        """Batch rows `index` of every tensor, as views (L, B, ...) -> (L, b, ...); an int keeps a batch of 1."""
        pick = slice(index, index + 1) if isinstance(index, int) else index
        return RecurrentState(self.att_shift[:, pick], self.ffn_shift[:, pick], self.wkv[:, pick])

    @staticmethod
    def cat(states: list[RecurrentState]) -> RecurrentState:
        """One batched state from several, along the batch dimension: [(L, b_i, ...)] -> (L, sum b_i, ...)."""
        if len(states) == 1:
            return states[0]
        return RecurrentState(
            torch.cat([s.att_shift for s in states], dim=1),
            torch.cat([s.ffn_shift for s in states], dim=1),
            torch.cat([s.wkv for s in states], dim=1),
        )

    @staticmethod
    def from_layers(att: list[Tensor], ffn: list[Tensor], wkv: list[Tensor], like: RecurrentState) -> RecurrentState:
        """Per-layer results stacked into one state, (B, ...) x L -> (L, B, ...), the shifts in `like`'s dtype."""
        return RecurrentState(torch.stack(att).to(like.att_shift.dtype), torch.stack(ffn).to(like.ffn_shift.dtype),
                              torch.stack(wkv))

    @property
    def batch(self) -> int:
        return int(self.wkv.shape[1])
