"""What the fused decode ops of rwkvctl/model/cpu_fast.py take, gathered once and kept between tokens.

- `layer_params(block, dtype, rows)`: one block's arguments of `rnn_step_layer` (csrc/rnn_step_cpu.cpp);
- `model_plan(model, dtype, rows)`: every block's, ln_out and the head in one `StepPlan` for `rnn_step_model`
  (csrc/rnn_step_model_cpu.cpp), the whole decode step in one call.

Both are kept on their module while they are still what a fresh gather would give: every submodule and tensor still
registered where it was found (per block: `Registrations`, checked one by one; for the whole model: no registration
anywhere since, `_registered`), each tensor in its dtype and contiguous. In-place updates (load_state_dict,
training steps, `.data` swaps) are seen through the same tensor objects; replacing a module or a tensor, or
model.to(dtype), rebuilds.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def plain(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A bias-free nn.Linear whose contiguous weight is in `dtype`: what the ops read directly."""
    w = getattr(linear, "weight", None)
    return type(linear) is nn.Linear and linear.bias is None and w.dtype == dtype and w.is_contiguous()


@dataclass(frozen=True)
class LayerArgs:
    """The arguments `rnn_step_layer` takes besides the state (csrc/rnn_step_cpu.cpp): the parameters in its order,
    and per projection (r, k, v, output, ffn key, ffn receptance, ffn value, gate) 0 bits for a plain weight or
    the bits and group of a packed one, whose scale and min tiles go in q_aux."""

    params: list[Tensor]
    q_bits: list[int]
    q_group: list[int]
    q_aux: list[Tensor]


def _weight_arg(linear: nn.Module, dtype: torch.dtype, rows: int) -> tuple[Tensor, int, int, list[Tensor]] | None:
    """(weight or codes, bits, group, [scale, min]) for one projection, or None if the op cannot read it. A module
    offering `decode_tiles(rows)` (QuantLinear, whose compiled packed matmul the op calls from C++) is packed."""
    if plain(linear, dtype):
        return linear.weight, 0, 0, []
    tiles = getattr(linear, "decode_tiles", None)
    found = tiles(rows) if tiles is not None else None
    if found is None:
        return None
    codes, scale, minimum, bits, group = found
    return codes, bits, group, [scale, minimum]


def layer_params(block: nn.Module, dtype: torch.dtype, rows: int = 1) -> LayerArgs | None:
    """What `rnn_step_layer` takes for this block and `rows` decode rows, or None when a projection is neither a
    plain bias-free Linear in the model dtype nor a packed layer the compiled matmul runs here. Kept on the block
    between tokens (gathering it cost ~0.8 ms a token on the 0.1b preset) while it is still what a fresh gather would
    give: the same dtype and number of rows (packed layers take the kernel up to a limit), every submodule and tensor
    still registered where it was found, and each tensor in its dtype and contiguous. In-place updates
    (load_state_dict, training steps) are seen through the same tensor objects; replacing any of them, or
    model.to(dtype), rebuilds. The whole-model plan (`model_plan`) checks all layers at once instead."""
    cached = block.__dict__.get("_step_args")
    if cached is not None and cached[0] == (dtype, rows) and _still_valid(cached[2]):
        return cached[1]
    att, ffn = block.att, block.ffn
    linears = [att.receptance, att.key, att.value, att.output, ffn.key, ffn.receptance, ffn.value]
    if att.cfg.gate:
        linears.append(att.gate)
    found = _gather_layer_params(block, linears, dtype, rows)
    block.__dict__["_step_args"] = ((dtype, rows), found, _registrations(block, found))
    return found


@dataclass(frozen=True)
class Registrations:
    """Where a cached LayerArgs came from, as parallel tuples for map(): each object (submodule or tensor) with the
    registry dict and name it was found under, and each tensor with its dtype then (model.to(dtype) keeps the
    tensor objects and swaps their data)."""

    registries: tuple[dict, ...]
    names: tuple[str, ...]
    objects: tuple[object, ...]
    tensors: tuple[Tensor, ...]
    dtypes: tuple[torch.dtype, ...]


def _registrations(block: nn.Module, found: LayerArgs | None) -> Registrations | None:
    """The registrations `found` depends on: the block's submodules the op reads (block -> att/ffn/norms -> the
    projections) and every tensor it passes; None (never reused) if a tensor is not registered on one of those
    modules, or if the block takes the split step."""
    if found is None:
        return None
    parents = [block, block.att, block.ffn]
    entries: list[tuple[dict, str, object]] = [
        (parent._modules, name, child)
        for parent in parents
        for name, child in parent._modules.items()
        if child is not None
    ]
    owners = [*parents, *(child for _, _, child in entries)]
    # a Linear is read as bias-free: a bias registered later must rebuild
    entries += [(m._parameters, "bias", m._parameters.get("bias")) for m in owners if type(m) is nn.Linear]
    where = {}
    for m in owners:
        for registry in (m._parameters, m._buffers):
            for name, t in registry.items():
                if t is not None:
                    where[id(t)] = (registry, name)
    tensors = [*found.params, *found.q_aux]
    if any(id(t) not in where for t in tensors):
        return None
    entries += [(*where[id(t)], t) for t in tensors]
    registries, names, objects = zip(*entries, strict=True)
    return Registrations(registries, names, objects, tuple(tensors), tuple(t.dtype for t in tensors))


def _still_valid(reg: Registrations | None) -> bool:
    return (
        reg is not None
        and all(map(operator.is_, map(dict.get, reg.registries, reg.names), reg.objects))
        and all(map(operator.is_, map(_DTYPE, reg.tensors), reg.dtypes))
        and all(map(Tensor.is_contiguous, reg.tensors))
    )


_DTYPE = operator.attrgetter("dtype")


def _gather_layer_params(block: nn.Module, linears: list[nn.Module], dtype: torch.dtype, rows: int) -> LayerArgs | None:
    att, ffn = block.att, block.ffn
    args = [_weight_arg(m, dtype, rows) for m in linears]
    if any(a is None for a in args):
        return None
    w = [a[0] for a in args]
    p = [block.ln1.weight, block.ln1.bias, block.ln2.weight, block.ln2.bias]
    p += [att.time_mix_k, att.time_mix_v, att.time_mix_r, att.time_decay, att.time_faaaa]
    p += [w[0], w[1], w[2], w[3], att.ln_x.weight, att.ln_x.bias]
    p += [ffn.time_mix_k, ffn.time_mix_r, w[4], w[5], w[6]]
    if att.cfg.gate:
        p += [att.time_mix_g, w[7]]
    if block.layer_id == 0:
        p += [block.ln0.weight, block.ln0.bias]
    return LayerArgs(p, [a[1] for a in args], [a[2] for a in args], [t for a in args for t in a[3]])


@dataclass(frozen=True)
class ModelPlan:
    """A `torch.classes.rwkvctl.StepPlan` and what it covers: with `has_head` the op returns logits, else the
    residual stream after the last block (the caller runs ln_out and the head)."""

    plan: object
    has_head: bool


def model_plan(model: nn.Module, dtype: torch.dtype, rows: int) -> ModelPlan | None:
    """The whole decode step's arguments for `rows` rows, or None when a block takes the split step. Kept on the
    model between tokens while no module, parameter or buffer was registered anywhere since (`_registered`, a
    counter of torch's global registration hooks, also bumped by `plans_changed`: checking the ~540 registrations
    of the 0.1b preset one by one cost ~0.2 ms a token with the weights streaming through the caches) and every
    tensor keeps its dtype and contiguity (checked in C++). Tensors updated in place or through `.data` (which is how
    model.to() converts parameters) are read as they are now; with torch.__future__'s
    set_overwrite_module_params_on_conversion(True) a conversion replaces parameters unseen, so call
    `plans_changed()` after it. A model that takes the split step is gathered again each token, as its blocks are."""
    key = (dtype, rows, getattr(model.ln_out, "eps", None))  # the op's ln_out uses eps 1e-5 (_head_args)
    cached = _plans.get(model)
    if cached is not None and cached[0] == key and cached[1] == _registered.count and cached[2].plan.unchanged():
        return cached[2]
    from rwkvctl.kernels.build import load_extension

    load_extension()  # StepPlan is a class of the extension (built on first use)
    count = _registered.count
    layers = [layer_params(block, dtype, rows) for block in model.blocks]
    if any(found is None for found in layers):
        _plans.pop(model, None)
        return None
    head = _head_args(model, dtype, rows)
    params = [t for found in layers for t in found.params]
    q_aux = [t for found in layers for t in found.q_aux]
    sizes = [n for found, block in zip(layers, model.blocks, strict=True)
             for n in (len(found.params), len(found.q_aux), (block.layer_id == 0) | (2 * bool(block.att.cfg.gate)))]
    head_tensors, head_rows, head_bits, head_group = head if head is not None else ([], 0, 0, 0)
    plan = torch.classes.rwkvctl.StepPlan(
        params, q_aux, sizes, [b for found in layers for b in found.q_bits],
        [g for found in layers for g in found.q_group], head_tensors, head_rows, head_bits, head_group,
        float(model.cfg.head_size_divisor),
    )
    found = ModelPlan(plan, head is not None)
    _plans[model] = (key, count, found)
    return found


# model -> (key, registration count, ModelPlan), outside the model's __dict__: a StepPlan (a torch custom class)
# cannot be copied or pickled, and copy.deepcopy(model) / torch.save(model) must keep working after a decode step
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plans_changed() -> None:
    """Tell cached plans that tensors they hold may have been replaced without a registration: Module._apply
    (model.to(device), .cuda(), .cpu()) puts new buffers straight into `_buffers`, and QuantLinear's packed tiles
    are buffers (rwkvctl/quant/linear.py calls this after its _apply)."""
    _registered.count += 1


class _RegistrationCount:
    """How many modules, parameters and buffers were registered (assigned) on any module since import, through
    torch's global registration hooks; a changed count tells a cached plan a projection, norm or weight may have
    been replaced. Deleting an attribute or writing a module's registry dicts directly goes unseen."""

    def __init__(self) -> None:
        self.count = 0
        for register in (
            nn.modules.module.register_module_module_registration_hook,
            nn.modules.module.register_module_parameter_registration_hook,
            nn.modules.module.register_module_buffer_registration_hook,
        ):
            register(self._seen)

    def _seen(self, module: nn.Module, name: str, value: object) -> None:
        self.count += 1  # returns None: the registered object is left as it is


_registered = _RegistrationCount()


def _head_args(model: nn.Module, dtype: torch.dtype, rows: int) -> tuple[list[Tensor], int, int, int] | None:
    """(tensors, rows, bits, group) of ln_out and the head as StepPlan takes them, or None to leave them to the
    caller: a head that is neither plain nor packed in whole tiles, or a final norm other than LayerNorm(eps 1e-5)."""
    ln = model.ln_out
    if type(ln) is not nn.LayerNorm or ln.eps != 1e-5 or ln.weight is None or ln.bias is None:
        return None
    found = _weight_arg(model.head, dtype, rows)
    if found is None:
        return None
    weight, bits, group, aux = found
    out = model.head.weight.shape[0] if bits == 0 else model.head.out_features
    if bits != 0 and out % 16 != 0:
        return None  # the packed kernel writes whole tiles of 16 rows
    return [ln.weight, ln.bias, weight, *aux], out, bits, group
