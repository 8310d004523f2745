"""Packed weights at run time: QuantLinear, a Linear layer that keeps its weight in a scheme's stored form.

A weight whose scheme offers `affine_view(stored, params) -> (qweight, scale, min, bits, group)` (group-affine
codes: GroupAffine, and any scheme that can present itself so) is multiplied by the compiled kernel
(rwkvctl/kernels/qmm.py) for inputs of up to FAST_ROWS_MAX rows on the CPU: `prepare()` repacks it once into the
kernel's tiles, which then replace the stored tensors; from then on the layer is group-affine (`stored()` unpacks
the tiles on demand, many-row inputs use GroupAffine's matmul). On a CUDA device the same inputs take the CUDA
kernel, which reads the stored form itself (fp16 scale and min). Everything else, and
every weight when the kernel cannot run here (RWKVCTL_QMM, one notice), uses the scheme's own `matmul`, the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rwkvctl.kernels import qmm
from rwkvctl.model.step_args import plans_changed
from rwkvctl.quant import groupwise
from rwkvctl.quant.schemes import PackedWeight, Scheme, get_scheme

# same-width integer dtypes that floating stored tensors are kept as (see QuantLinear.__init__)
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# inputs of at most this many rows (RNN steps, small batches) take the kernel; prompts expand a block and GEMM
FAST_ROWS_MAX = 16
AffineView = tuple[Tensor, Tensor, Tensor, int, int]  # qweight, scale, min, bits, group


def affine_view(scheme: Scheme, stored: dict[str, Tensor], params: dict) -> AffineView | None:
    """The weight as group-affine tensors if its scheme can present it so (the contract the kernel consumes)."""
    view = getattr(scheme, "affine_view", None)
    return None if view is None else view(stored, params)


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
        self._tiles_form: tuple[int, int] | None = None  # (bits, group) once prepare() repacked the weight
        self._fast: bool | None = None  # decided by the first prepare()
        self._gpu: bool | None = None  # whether the CUDA kernel reads this layer, decided by the first GPU call
        self._gpu_unpacked: tuple[tuple, AffineView] | None = None  # the stored form unpacked from the tiles

    def prepare(self) -> bool:
        """Repack the weight for the compiled kernel if it can run here (once; on the CPU). True if it will be used."""
        if self._fast is not None:
            return self._fast
        view = affine_view(self.scheme, self.stored(), self.params)
        device = next(self.buffers()).device
        self._fast = view is not None and qmm.usable(view[3], view[4], self.in_features, device)
        if self._fast and view is not None:
            tiles = qmm.pack(*view)
            for name in self.scheme.tensor_names:  # the tiles replace the stored form: memory of one copy
                delattr(self, name if name not in self._float_dtypes else f"{name}_bits")
            self.register_buffer("qtiles", tiles.codes)
            self.register_buffer("scale_tiles", tiles.scale)  # int16 bits: model.to(dtype) leaves them alone
            self.register_buffer("min_tiles", tiles.minimum)
            self._tiles_form = (tiles.bits, tiles.group)
            # from now on the weight is group-affine whatever scheme stored it: many-row inputs use that reference
            self.scheme, self.params = get_scheme(groupwise.NAME), {"bits": tiles.bits, "group": tiles.group}
        return self._fast

    def _gpu_view(self) -> AffineView | None:
        """(qweight, scale, min, bits, group) as the CUDA kernel reads them (views of the stored buffers), or None
        where it cannot run: decided once per layer, on its first call on a GPU."""
        if self._gpu is None:
            view = affine_view(self.scheme, self.stored(), self.params)
            self._gpu = (
                view is not None
                and view[0].dtype == torch.uint8
                and view[1].dtype == view[2].dtype == torch.float16
                and all(t.is_contiguous() for t in view[:3])
                and qmm.usable_on_gpu(view[3], view[4], self.in_features, view[0].device)
            )
        if not self._gpu:
            return None
        if self._tiles_form is None:
            return affine_view(self.scheme, self.stored(), self.params)  # views of the buffers
        # run on the CPU first (prepare() made the CPU kernel's tiles), then moved: unpacked once and kept, so the
        # layer then holds both forms
        # in-place updates (load_state_dict) bump a tensor's version; a move or replacement changes its storage
        key = tuple((t.device, t.data_ptr(), t._version) for t in (self.qtiles, self.scale_tiles, self.min_tiles))
        if self._gpu_unpacked is None or self._gpu_unpacked[0] != key:
            self._gpu_unpacked = (key, affine_view(self.scheme, self.stored(), self.params))
        return self._gpu_unpacked[1]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        out = super()._apply(fn, recurse)
        plans_changed()  # new buffer tensors (the packed tiles) without a registration hook: cached plans rebuild
        return out

    def _tiles(self) -> qmm.Tiles:
        assert self._tiles_form is not None
        bits, group = self._tiles_form
        return qmm.Tiles(self.qtiles, self.scale_tiles, self.min_tiles, self.out_features, bits, group)

    def stored(self) -> dict[str, Tensor]:
        """The scheme's stored tensors, in their own dtypes (views of the buffers, or unpacked from the tiles)."""
        if self._tiles_form is not None:
            qweight, scale, minimum = qmm.unpack(self._tiles())  # prepare() made the scheme group-affine
            return {"qweight": qweight, "scale": scale, "min": minimum}
        out = {}
        for name in self.scheme.tensor_names:
            dtype = self._float_dtypes.get(name)
            out[name] = getattr(self, name) if dtype is None else getattr(self, f"{name}_bits").view(dtype)
        return out

    def decode_tiles(self, rows: int) -> tuple[Tensor, Tensor, Tensor, int, int] | None:
        """(codes, scale, min, bits, group) in the compiled kernel's tiles when it runs this layer for `rows` input
        rows on the CPU, else None: what the whole-layer decode op reads (rwkvctl/model/cpu_fast.py), which calls
        the same kernel from C++ instead of this module."""
        if rows > FAST_ROWS_MAX or not self.prepare():
            return None
        t = self._tiles()
        return t.codes, t.scale, t.minimum, t.bits, t.group

    def forward(self, x: Tensor) -> Tensor:
        if self._fast and x.dim() == 2 and x.shape[0] <= FAST_ROWS_MAX and x.device.type == "cpu":
            # the RNN step's case (rows of a decode batch), called ~100 times a token: no reshapes
            y = qmm.matmul(x, self._tiles())
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        rows = x.reshape(-1, self.in_features)  # (..., in) -> (n, in)
        if rows.shape[0] <= FAST_ROWS_MAX and rows.device.type == "cpu" and self.prepare():
            return qmm.matmul(rows, self._tiles()).to(x.dtype).view(*x.shape[:-1], self.out_features)
        if rows.shape[0] <= FAST_ROWS_MAX and rows.device.type == "cuda" and (view := self._gpu_view()) is not None:
            return qmm.matmul_gpu(rows, *view).to(x.dtype).view(*x.shape[:-1], self.out_features)
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


def prepare_packed(model: nn.Module) -> int:
    """Repack every QuantLinear of `model` for the compiled kernel where it runs (call after moving the model to its
    device; otherwise each layer does it at its first small-batch call). Returns how many will use the kernel."""
    return sum(m.prepare() for m in model.modules() if isinstance(m, QuantLinear))
