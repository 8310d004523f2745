"""The ZeRO mapping of a ZeRO-1/2 checkpoint (DeepSpeed's param_shapes and param_slice_mappings) is checked by type
and bounds before any tensor is sliced: every damage is one CheckpointError naming the file and the key. Built here
from plain records shaped like DeepSpeed's (no DeepSpeed needed); tests/train/test_deepspeed_branch.py reads real
ones."""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from rwkvctl.errors import CheckpointError
from rwkvctl.train.zero_layout import ZeroPartition, ZeroShapes, gather

SHAPES = [{"a": torch.Size([2, 3]), "b": torch.Size([4])}]  # one group of 10 elements, 5 per rank
EXPECTED = {"a": (2, 3), "b": (4,)}
MODEL, RANK0, RANK1 = Path("mp_rank_00_model_states.pt"), Path("zero_pp_rank_0.pt"), Path("zero_pp_rank_1.pt")


@dataclass
class Address:  # DeepSpeed's fragment_address: read by its attributes
    numel: Any
    start: Any


FULL = torch.arange(10, dtype=torch.float32)  # a then b, flattened


def _rank(lo: int, mapping: dict[str, Address]) -> dict[str, Any]:
    flat = FULL[lo : lo + 5].clone()
    return {"optimizer_state_dict": {
        "partition_count": [2],
        "single_partition_of_fp32_groups": [flat],
        "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": flat * 10,
                                               "exp_avg_sq": flat * 100}}},
        "param_slice_mappings": [mapping],
    }}


def _files() -> tuple[dict, dict]:
    return (_rank(0, {"a": Address(5, 0)}), _rank(5, {"a": Address(1, 0), "b": Address(4, 1)}))


def _read(shapes: Any = SHAPES, r0: Any = None, r1: Any = None, expected: Any = EXPECTED):
    f0, f1 = _files()
    parsed = ZeroShapes.from_dict({"param_shapes": shapes}, MODEL, expected)
    parts = [ZeroPartition.from_dict(f0 if r0 is None else r0, RANK0, 2, parsed),
             ZeroPartition.from_dict(f1 if r1 is None else r1, RANK1, 2, parsed)]
    return gather(parsed, parts, Path("state"))


def test_a_sound_mapping_gathers_each_parameter_from_its_pieces_in_rank_order() -> None:
    weights, moments, step = _read()
    assert torch.equal(weights["a"], FULL[:6].view(2, 3)) and torch.equal(weights["b"], FULL[6:])
    assert torch.equal(moments["b"]["exp_avg"], FULL[6:] * 10) and torch.equal(moments["a"]["exp_avg_sq"],
                                                                               FULL[:6].view(2, 3) * 100)
    assert step == 3.0
    ZeroPartition.from_dict(_files()[0], RANK0, 2, ZeroShapes.from_value(SHAPES, MODEL))  # no config to match: fine


def _rank1(edit) -> dict:
    f1 = copy.deepcopy(_files()[1])
    edit(f1["optimizer_state_dict"])
    return f1


def _set_b(address: Any):
    return lambda opt: opt["param_slice_mappings"][0].__setitem__("b", address)


@pytest.mark.parametrize("edit, message", [
    (_set_b(Address(4, 2)), r"\['b'\]: slice \[2, 6\) reaches past the end of its flat group of 5 elements"),
    (_set_b(Address(4, -1)), r"\['b'\]\.start: must be an integer in \[0, \d+\], got '-1'"),
    (_set_b(Address(2**70, 1)), r"\['b'\]\.numel: must be an integer in \[1, \d+\], got '1180591620717411303424'"),
    (_set_b(Address(4, "1")), r"\['b'\]\.start: must be an integer"),
    (_set_b(Address(True, 1)), r"\['b'\]\.numel: must be an integer"),
    (_set_b("0:4"), r"\['b'\]\.start: must be an integer .*got 'None'"),
    (_set_b(Address(0, 1)), r"\['b'\]\.numel: must be an integer in \[1,"),
    (_set_b(Address(2, 0)), r"\['b'\]: overlaps the slice before it"),
    (lambda opt: opt["param_slice_mappings"][0].__setitem__("c", Address(1, 0)),
     r"\['c'\]: names a parameter that group 0 of param_shapes lacks"),
    (lambda opt: opt.__setitem__("param_slice_mappings", {"b": Address(4, 1)}),
     r"'param_slice_mappings': must be a list with one entry per group, got dict"),
    (lambda opt: opt.__setitem__("param_slice_mappings", [{}, {}]), r"'param_slice_mappings': has 2 groups"),
    (lambda opt: opt["param_slice_mappings"].__setitem__(0, [("b", 1, 4)]), r"\[0\]: must map names to slices"),
    (lambda opt: opt.__setitem__("partition_count", [4]), r"'partition_count': says \[4\] ranks; .* 2 shard files"),
    (lambda opt: opt.__setitem__("partition_count", "2"), r"'partition_count': says 2 ranks"),
    (lambda opt: opt.__setitem__("single_partition_of_fp32_groups", [torch.zeros(5, 1)]),
     r"group 0 'fp32': must be a flat \(1-D\) floating-point tensor"),
    (lambda opt: opt.__setitem__("single_partition_of_fp32_groups", [[0.0] * 5]), r"group 0 'fp32': must be a flat"),
    (lambda opt: opt["base_optimizer_state"]["state"][0].__setitem__("exp_avg", torch.zeros(4)),
     r"group 0 'exp_avg': has 4 elements, the fp32 group 5"),
    (lambda opt: opt["base_optimizer_state"]["state"][0].pop("exp_avg_sq"), r"group 0 'exp_avg_sq': must be a flat"),
    (lambda opt: opt["base_optimizer_state"].__setitem__("state", {}), r"'base_optimizer_state': must hold the AdamW"),
    (lambda opt: opt["base_optimizer_state"]["state"][0].__setitem__("step", torch.tensor(float("nan"))),
     r"group 0 'step': must be a finite count >= 0, got nan"),
    (lambda opt: opt["base_optimizer_state"]["state"][0].__setitem__("step", -1), r"group 0 'step': .* got -1"),
])
def test_a_damaged_slice_mapping_is_one_line_naming_the_file_and_the_key(edit, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as err:
        _read(r1=_rank1(edit))
    text = str(err.value)
    assert text.startswith(f"{RANK1}: ZeRO mapping ") and "\n" not in text and len(text) < 400


def test_a_rank_file_without_optimizer_state_is_refused_by_name() -> None:
    for bad in ({}, [], {"optimizer_state_dict": 7}):
        with pytest.raises(CheckpointError, match=r"^zero_pp_rank_1.pt: ZeRO mapping 'optimizer_state_dict': is miss"):
            _read(r1=bad)


@pytest.mark.parametrize("shapes, expected, message", [
    ({"a": (2, 3)}, EXPECTED, r"'param_shapes': must be a list of groups, got dict"),
    ([[("a", (2, 3))]], EXPECTED, r"'param_shapes'\[0\]: must map parameter names to shapes, got list"),
    ([{"a": (2, -3), "b": (4,)}], EXPECTED, r"'param_shapes'\[0\]\['a'\]: must be an integer in \[0, \d+\], got '-3'"),
    ([{"a": (2, 3.0), "b": (4,)}], EXPECTED, r"\['a'\]: must be an integer .*got '3.0'"),
    ([{"a": "2x3", "b": (4,)}], EXPECTED, r"\['a'\]: must be a shape of at most 8 sizes, got 2x3"),
    ([{"a": (1 << 30, 1 << 30), "b": (4,)}], EXPECTED, r"\['a'\] \(elements\): must be an integer in \[0, \d+\]"),
    ([{"a": (2, 3)}, {"a": (2, 3)}], EXPECTED, r"'param_shapes'\[1\]\['a'\]: must be a parameter name, once"),
    ([{"a": (3, 2), "b": (4,)}], EXPECTED, r"'param_shapes' 'a': shape \[3, 2\] disagrees with the model config's "
                                           r"\[2, 3\]"),
    ([{"a": (2, 3), "b": (4,), "z": (1,)}], EXPECTED, r"'param_shapes' 'z': names a parameter the model config lacks"),
    (SHAPES, {**EXPECTED, "c": (2,)}, r"'param_shapes': lacks 1 parameter\(s\) of the model, e.g. 'c'"),
])
def test_shapes_are_checked_and_must_match_the_model_config(shapes, expected, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as err:
        _read(shapes=shapes, expected=expected)
    assert str(err.value).startswith(f"{MODEL}: ZeRO mapping ") and "\n" not in str(err.value)


def test_a_parameter_held_only_in_part_or_not_at_all_is_refused() -> None:
    f0, f1 = _files()
    del f1["optimizer_state_dict"]["param_slice_mappings"][0]["b"]
    with pytest.raises(CheckpointError, match=r"^state: ZeRO mapping parameter 'b': is in no rank's optimizer shard"):
        _read(r1=f1)
    f0, f1 = _files()
    f1["optimizer_state_dict"]["param_slice_mappings"][0]["b"] = Address(3, 1)
    with pytest.raises(CheckpointError, match=r"parameter 'b': the shards hold 3 of its 4 elements"):
        _read(r1=f1)
