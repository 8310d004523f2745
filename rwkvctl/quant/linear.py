"""Packed weights at run time: QuantLinear, a Linear layer that keeps its weight in a scheme's stored form."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rwkvctl.quant.schemes import PackedWeight

# same-width integer dtypes that floating stored tensors are kept as (see QuantLinear.__init__)
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class QuantLinear(nn.Module):
    """A bias-free Linear layer whose weight stays packed in memory (for the default scheme 4 or 8 bits plus two
    fp16 numbers per group) and is multiplied by its scheme's `matmul`, a block of rows at a time: memory of the
    packed form, and at most one block's expansion alive at any moment."""

    ROWS_PER_BLOCK_BYTES = 64 << 20  # fp32 bytes of expanded weight alive at once

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scheme, self.params = weight.scheme, weight.params
        self._float_dtypes: dict[str, torch.dtype] = {}
        for name, t in weight.stored.items():
            if t.is_floating_point():
                # stored as integer bits: `model.to(dtype)` casts floating buffers and must leave these alone
                self._float_dtypes[name] = t.dtype
                self.register_buffer(f"{name}_bits", t.view(_INT_OF[t.element_size()]))
            else:
                self.register_buffer(name, t)
        self.rows_per_block = max(1, self.ROWS_PER_BLOCK_BYTES // (4 * self.in_features))

    def stored(self) -> dict[str, Tensor]:
        """The scheme's stored tensors, in their own dtypes (views of the buffers)."""
        out = {}
        for name in self.scheme.tensor_names:
            dtype = self._float_dtypes.get(name)
            out[name] = getattr(self, name) if dtype is None else getattr(self, f"{name}_bits").view(dtype)
        return out

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (..., in) -> (n, in)
        stored = self.stored()
        parts = [
            self.scheme.matmul(rows, stored, self.params, slice(a, a + self.rows_per_block))
            for a in range(0, self.out_features, self.rows_per_block)
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme.describe(self.params)}"
        )


def use_packed_weights(model: nn.Module, packed: dict[str, PackedWeight]) -> list[str]:
    """Swap the Linear layers whose weights are in `packed` (by state-dict name, `x.y.weight`) for QuantLinear
    layers (on the packed tensors' device; move the model afterwards). Returns the names swapped; other packed
    weights (the embedding) are left to the caller."""
    swapped = []
    modules = dict(model.named_modules())
    for name, weight in packed.items():
        owner = name.removesuffix(".weight")
        module = modules.get(owner)
        if not isinstance(module, nn.Linear) or module.bias is not None:
            continue
        parent_name, _, child = owner.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, QuantLinear(weight))
        swapped.append(name)
    return swapped
