"""The ZeRO mapping of a ZeRO-1/2 checkpoint: which part of which rank's flat optimizer tensors holds which parameter.

DeepSpeed writes it (we never do, and add nothing to its files): `mp_rank_00_model_states.pt` holds `param_shapes`,
one {name: shape} per parameter group; each rank's `*zero_pp_rank_R_mp_rank_00_optim_states.pt` holds, under
`optimizer_state_dict`, `single_partition_of_fp32_groups` (one flat fp32 tensor per group: that rank's contiguous
slice of the group), the AdamW moments of those flat tensors (`base_optimizer_state`), `partition_count` and
`param_slice_mappings` (per group, {name: (start, numel)} within the rank's flat tensor). A parameter's full tensor
is its pieces in rank order.

These are the typed definitions of that mapping, the only reader of it (read_zero_checkpoint in deepspeed_engine
loads the files and hands the records here). Everything is checked by type and bounds before a tensor is sliced: a
slice past the end of its flat tensor, overlapping slices, a mapping naming a parameter the shapes lack, shapes that
disagree with the model config. Each problem is one CheckpointError naming the file and the key. No deepspeed import:
DeepSpeed's `fragment_address` is read by its two attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkvctl.errors import CheckpointError

MAX_NUMEL = 1 << 40  # elements of one parameter or flat group: far above any model, far below an int64
MAX_DIMS = 8
MOMENTS = ("exp_avg", "exp_avg_sq")


def _fail(path: Path, key: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: ZeRO mapping {key}: {what}; resume from an earlier checkpoint")


def _count(value: Any, path: Path, key: str, *, minimum: int = 0, maximum: int = MAX_NUMEL) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise _fail(path, key, f"must be an integer in [{minimum}, {maximum}], got {str(value)[:40]!r}")
    return value


@dataclass(frozen=True)
class ZeroShapes:
    """`param_shapes` of the model states file: per parameter group, {parameter name: shape}."""

    groups: list[dict[str, tuple[int, ...]]]

    @classmethod
    def from_dict(cls, data: Any, path: Path, expected: dict[str, tuple[int, ...]] | None = None) -> ZeroShapes:
        """The model states file's record, checked; `expected` (the model config's {name: shape}) must then match
        it name for name."""
        return cls.from_value(data.get("param_shapes") if isinstance(data, dict) else None, path, expected)

    @classmethod
    def from_value(cls, value: Any, path: Path, expected: dict[str, tuple[int, ...]] | None = None) -> ZeroShapes:
        if not isinstance(value, list | tuple):
            raise _fail(path, "'param_shapes'", f"must be a list of groups, got {type(value).__name__}")
        groups: list[dict[str, tuple[int, ...]]] = []
        seen: set[str] = set()
        for g, group in enumerate(value):
            key = f"'param_shapes'[{g}]"
            if not isinstance(group, dict):
                raise _fail(path, key, f"must map parameter names to shapes, got {type(group).__name__}")
            out: dict[str, tuple[int, ...]] = {}
            for name, shape in group.items():
                where = f"{key}[{str(name)[:80]!r}]"
                if not isinstance(name, str) or name in seen:
                    raise _fail(path, where, "must be a parameter name, once over all groups")
                if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS:
                    raise _fail(path, where, f"must be a shape of at most {MAX_DIMS} sizes, got {str(shape)[:40]}")
                dims = tuple(_count(n, path, where) for n in shape)
                _count(math.prod(dims), path, f"{where} (elements)")
                seen.add(name)
                out[name] = dims
            groups.append(out)
        shapes = cls(groups)
        if expected is not None:
            shapes.check_against(expected, path)
        return shapes

    def all(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for group in self.groups for name, shape in group.items()}

    def check_against(self, expected: dict[str, tuple[int, ...]], path: Path) -> None:
        """The shapes must be the model config's: no parameter the model lacks, none missing, the same shapes."""
        found = self.all()
        for name, shape in found.items():
            if name not in expected:
                raise _fail(path, f"'param_shapes' {name[:80]!r}", "names a parameter the model config lacks")
            if tuple(expected[name]) != shape:
                raise _fail(path, f"'param_shapes' {name[:80]!r}",
                            f"shape {list(shape)} disagrees with the model config's {list(expected[name])}")
        missing = [name for name in expected if name not in found]
        if missing:
            raise _fail(path, "'param_shapes'", f"lacks {len(missing)} parameter(s) of the model, e.g. {missing[0]!r}")


@dataclass(frozen=True)
class ZeroSlice:
    """Where one parameter's piece sits in a rank's flat group tensor (DeepSpeed's fragment_address)."""

    start: int
    numel: int


@dataclass
class ZeroPartition:
    """One rank's optimizer shard: per group, its flat tensors ("fp32" master weights and the AdamW moments) and
    the slices of them that hold each parameter's piece; `step` is the optimizer step count it records."""

    groups: list[dict[str, ZeroSlice]]
    flats: list[dict[str, Tensor]]
    step: float

    @classmethod
    def from_dict(cls, data: Any, path: Path, ranks: int, shapes: ZeroShapes) -> ZeroPartition:
        """The `optimizer_state_dict` of a rank's file, checked against `ranks` (how many shard files there are)
        and the names in `shapes`."""
        opt = data.get("optimizer_state_dict") if isinstance(data, dict) else None
        if not isinstance(opt, dict):
            raise _fail(path, "'optimizer_state_dict'", "is missing or not a dictionary")
        count = opt.get("partition_count", [ranks])
        if not isinstance(count, list | tuple) or not count or count[0] != ranks:
            raise _fail(path, "'partition_count'", f"says {str(count)[:40]} ranks; this checkpoint has {ranks} shard "
                        "files (copy every node's shards into the directory)")
        fp32, mappings = opt.get("single_partition_of_fp32_groups"), opt.get("param_slice_mappings")
        for key, value in (("single_partition_of_fp32_groups", fp32), ("param_slice_mappings", mappings)):
            if not isinstance(value, list | tuple):
                raise _fail(path, repr(key), f"must be a list with one entry per group, got {type(value).__name__}")
        assert isinstance(fp32, list | tuple) and isinstance(mappings, list | tuple)
        if len(mappings) != len(fp32) or len(mappings) != len(shapes.groups):
            raise _fail(path, "'param_slice_mappings'", f"has {len(mappings)} groups, the flat fp32 tensors "
                        f"{len(fp32)} and param_shapes {len(shapes.groups)}")
        states = _group_states(opt.get("base_optimizer_state"), len(fp32), path)
        groups, flats, step = [], [], 0.0
        for g, (flat_fp32, mapping, state) in enumerate(zip(fp32, mappings, states, strict=True)):
            flat = {"fp32": flat_fp32, **{m: state.get(m) for m in MOMENTS}}
            for key, t in flat.items():
                if not (isinstance(t, Tensor) and t.dim() == 1 and t.is_floating_point()):
                    raise _fail(path, f"group {g} {key!r}", "must be a flat (1-D) floating-point tensor")
                if t.numel() != flat_fp32.numel():
                    raise _fail(path, f"group {g} {key!r}", f"has {t.numel()} elements, the fp32 group "
                                f"{flat_fp32.numel()}")
            step = max(step, _step(state.get("step", 0), path, g))
            # a group's slices may name only that group's parameters (param_shapes names each in one group), so
            # no parameter can draw pieces from two groups of a rank
            groups.append(_slices(mapping, path, g, flat_fp32.numel(), shapes.groups[g]))
            flats.append(flat)
        return cls(groups, flats, step)


def _group_states(base: Any, n_groups: int, path: Path) -> list[dict[str, Any]]:
    """AdamW's per-group state of the flat tensors: a torch state dict {"state": {g: ...}} or a list."""
    states = base.get("state") if isinstance(base, dict) else base
    if isinstance(states, list | tuple):
        states = dict(enumerate(states))
    if not isinstance(states, dict) or any(not isinstance(states.get(g), dict) for g in range(n_groups)):
        raise _fail(path, "'base_optimizer_state'", f"must hold the AdamW state of each of the {n_groups} groups")
    return [states[g] for g in range(n_groups)]


def _step(value: Any, path: Path, g: int) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, int | float) or isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise _fail(path, f"group {g} 'step'", f"must be a finite count >= 0, got {str(value)[:40]}")
    return float(value)


def _slices(mapping: Any, path: Path, g: int, size: int, known: dict[str, tuple[int, ...]]) -> dict[str, ZeroSlice]:
    """One group's {name: slice}, each inside the flat tensor of `size` elements, none overlapping another."""
    if not isinstance(mapping, dict):
        raise _fail(path, f"'param_slice_mappings'[{g}]", f"must map names to slices, got {type(mapping).__name__}")
    out: dict[str, ZeroSlice] = {}
    for name, where in mapping.items():
        key = f"'param_slice_mappings'[{g}][{str(name)[:80]!r}]"
        if not isinstance(name, str) or name not in known:
            raise _fail(path, key, f"names a parameter that group {g} of param_shapes lacks")
        start = _count(getattr(where, "start", None), path, f"{key}.start")
        numel = _count(getattr(where, "numel", None), path, f"{key}.numel", minimum=1)
        if start + numel > size:
            raise _fail(path, key, f"slice [{start}, {start + numel}) reaches past the end of its flat group of "
                        f"{size} elements")
        if numel > math.prod(known[name]):
            raise _fail(path, key, f"slice of {numel} elements is larger than the parameter ({list(known[name])})")
        out[name] = ZeroSlice(start, numel)
    end = 0
    for name, s in sorted(out.items(), key=lambda item: item[1].start):
        if s.start < end:
            raise _fail(path, f"'param_slice_mappings'[{g}][{name[:80]!r}]", "overlaps the slice before it")
        end = s.start + s.numel
    return out


def gather(shapes: ZeroShapes, partitions: list[ZeroPartition], state_dir: Path,
           ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], float]:
    """Each parameter's full fp32 weight and moments from its pieces in rank order.
    -> (weights, {name: {"exp_avg", "exp_avg_sq"}}, step)."""
    pieces: dict[str, dict[str, list[Tensor]]] = {}
    for part in partitions:
        for mapping, flat in zip(part.groups, part.flats, strict=True):
            for name, s in mapping.items():
                parts = pieces.setdefault(name, {key: [] for key in flat})
                for key, bucket in parts.items():
                    bucket.append(flat[key].detach().narrow(0, s.start, s.numel))
    weights, moments = {}, {}
    for name, shape in shapes.all().items():
        if name not in pieces:
            raise _fail(state_dir, f"parameter {name!r}", "is in no rank's optimizer shard")
        held = sum(t.numel() for t in pieces[name]["fp32"])
        if held != math.prod(shape):
            raise _fail(state_dir, f"parameter {name!r}", f"the shards hold {held} of its {math.prod(shape)} elements")
        full = {key: torch.cat(b).view(shape) for key, b in pieces.pop(name).items()}  # pieces -> (shape)
        weights[name] = full.pop("fp32")
        moments[name] = full
    return weights, moments, max((p.step for p in partitions), default=0.0)
