"""The quantized checkpoint file: the one owner of its layout, for writing and for reading.

A quantized checkpoint is a `.safetensors` file with the usual JSON sidecar. A weight `W` quantized with scheme `S`
(rwkvctl.quant.schemes) is stored as the tensors `W.<t>` for each `t` in `S.tensor_names`; every other tensor is
stored as is. The safetensors metadata key "rwkvctl-quant" records each quantized weight:

    {"format": 2, "tensors": {"W": {"scheme": "group-affine", "params": {"bits": 4, "group": 64},
                                    "shape": [out, in], "dtype": "torch.float32"}}}

Format 1 files (written before per-tensor scheme records) hold {"bits", "group", "shape", "dtype"} per weight and are
read as the group-affine scheme with those parameters. Plain checkpoints read here too, so `load_checkpoint_packed`
and `load_checkpoint_expanded` take any checkpoint; checking tensors against the model config is rwkvctl.io's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkvctl.arch import arch_of
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.fs import atomic_paths
from rwkvctl.io import bounded_json
from rwkvctl.io.checkpoint import (
    CheckpointMeta,
    StoredCheckpoint,
    checked_state_dict,
    normalize_keys,
    read_checkpoint_file,
    sidecar_path,
)
from rwkvctl.quant import groupwise
from rwkvctl.quant.schemes import PackedWeight, Params, Scheme, get_scheme, scheme_names

META_KEY = "rwkvctl-quant"
FORMAT_VERSION = 2
LEGACY_FORMAT = 1  # per-tensor {"bits", "group", "shape", "dtype"}: the group-affine scheme
LEGACY_SCHEME = groupwise.NAME
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


def write_quantized(
    path: str | Path, plain: dict[str, Tensor], packed: dict[str, PackedWeight], meta: CheckpointMeta
) -> Path:
    """Write a quantized checkpoint (and its sidecar), each atomically: `plain` tensors as they are, `packed`
    weights as their schemes' stored tensors with one record each."""
    path = Path(path)
    tensors = {name: t.contiguous() for name, t in plain.items()}
    records: dict[str, dict[str, Any]] = {}
    for name, w in packed.items():
        for t in w.scheme.tensor_names:
            tensors[f"{name}.{t}"] = w.stored[t].contiguous()
        records[name] = _record(w.scheme, w.params, w.shape, w.dtype)
    from safetensors.torch import save_file

    # one commit, the sidecar last: `quantize --force` killed between the renames leaves the new file without a
    # sidecar (it carries its own metadata), never beside the sidecar of the output it replaced
    with atomic_paths(path, sidecar_path(path)) as (tmp, side_tmp):
        save_file(tensors, str(tmp), metadata=_file_metadata(records, meta))
        side_tmp.write_text(json.dumps(meta.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _record(scheme: Scheme, params: Params, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, Any]:
    return {"scheme": scheme.name, "params": params, "shape": list(shape), "dtype": str(dtype)}


def _file_metadata(records: dict[str, dict[str, Any]], meta: CheckpointMeta) -> dict[str, str]:
    quant_json = json.dumps({"format": FORMAT_VERSION, "tensors": records})
    return {"rwkvctl": json.dumps(meta.to_dict()), META_KEY: quant_json}


def quantized_file_size(
    tensors: dict[str, Tensor], bits_for: Callable[[str], int | None], options_for: Callable[[str, int], Params],
    scheme: Scheme, meta: CheckpointMeta,
) -> int:
    """The exact size in bytes of the `.safetensors` that `write_quantized` writes, from the source's tensors'
    shapes and dtypes alone (`tensors` may be placeholders on the meta device), in the order quantization visits
    them: `bits_for(name)` None keeps a tensor as it is, else `options_for(name, bits)` are the scheme's options."""
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    records: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        bits = bits_for(name)
        if bits is None or t.dim() != 2:
            layout[name] = (t.dtype, tuple(t.shape))
            continue
        shape = (t.shape[0], t.shape[1])
        try:
            params, stored = scheme.stored_layout(shape, **options_for(name, bits))
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        layout.update({f"{name}.{k}": v for k, v in stored.items()})
        records[name] = _record(scheme, params, shape, t.dtype)
    return safetensors_size(layout, _file_metadata(records, meta))


# safetensors writes tensors sorted by dtype (this order, descending), then by name (safetensors 0.4-0.8)
_DTYPE_ORDER = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
                torch.float32, torch.float64, torch.int64)  # fmt: skip
_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64"}  # fmt: skip


def safetensors_size(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> int:
    """Bytes of the safetensors file of tensors with these dtypes and shapes and this metadata: 8 (header length)
    + the JSON header as the library writes it (compact, padded with spaces to a multiple of 8) + the data."""
    order = sorted(layout, key=lambda k: (-_DTYPE_ORDER.index(layout[k][0]), k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = layout[name]
        end = offset + math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + -(-len(text) // 8) * 8 + offset


def is_quantized(stored: StoredCheckpoint) -> bool:
    return META_KEY in stored.metadata


def read_packed_weights(stored: StoredCheckpoint) -> tuple[dict[str, Tensor], dict[str, PackedWeight]]:
    """A quantized file's tensors -> (the tensors stored as they are, the quantized weights by stored name).
    Damaged records, unknown schemes and inconsistent tensors are one-line `CheckpointError`s naming the file and
    the tensor."""
    source = str(stored.path)
    meta = bounded_json.loads(stored.metadata[META_KEY], source, CheckpointError, what=f"quantization metadata "
                              f"({META_KEY!r})")
    version = bounded_json.format_version(meta, "format", FORMAT_VERSION, source, CheckpointError,
                                          what="quantization metadata", oldest=LEGACY_FORMAT)
    entries = bounded_json.field(meta, "tensors", dict, source, CheckpointError, where="quantization metadata field")
    packed: dict[str, PackedWeight] = {}
    consumed: set[str] = set()
    for name, record in entries.items():
        where = f"{source}: quantized tensor {name!r}"
        scheme_name, params, shape, dtype = _parse_record(record, version, where)
        try:
            scheme = get_scheme(scheme_name)
        except KeyError:
            raise CheckpointError(
                f"{where} uses the unknown quantization scheme {scheme_name!r} (known: {', '.join(scheme_names())})"
            ) from None
        packed[name] = _packed_weight(stored.tensors, name, scheme, params, shape, dtype, where)
        consumed.update(f"{name}.{t}" for t in scheme.tensor_names)
    plain = {k: v for k, v in stored.tensors.items() if k not in consumed}
    return plain, packed


def _parse_record(record: Any, version: int, where: str) -> tuple[str, Params, tuple[int, int], torch.dtype]:
    """(scheme name, params, shape, dtype) of one record; a malformed one is a one-line error."""
    try:
        if version == LEGACY_FORMAT:
            scheme_name, params = LEGACY_SCHEME, {"bits": int(record["bits"]), "group": int(record["group"])}
        else:
            scheme_name, params = record["scheme"], record["params"]
            if not isinstance(scheme_name, str) or not isinstance(params, dict):
                raise TypeError("'scheme' must be a name and 'params' an object")
        shape, dtype = record["shape"], DTYPES[record["dtype"]]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"shape {shape!r} is not two positive integers")
    except KeyError as e:
        raise CheckpointError(f"{where} has a malformed quantization record (no valid {e})") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has a malformed quantization record ({e})") from None
    return scheme_name, params, (shape[0], shape[1]), dtype


def _packed_weight(
    tensors: dict[str, Tensor],
    name: str,
    scheme: Scheme,
    params: Params,
    shape: tuple[int, int],
    dtype: torch.dtype,
    where: str,
) -> PackedWeight:
    missing = [t for t in scheme.tensor_names if f"{name}.{t}" not in tensors]
    if missing:
        raise CheckpointError(f"{where} is incomplete (no {', '.join(f'{name}.{t}' for t in missing)})")
    stored = {t: tensors[f"{name}.{t}"] for t in scheme.tensor_names}
    try:
        scheme.check(stored, params, shape)
    except ValueError as e:
        raise CheckpointError(f"{where} has inconsistent shapes or settings ({e})") from None
    return PackedWeight(scheme, params, stored, shape, dtype)


def load_checkpoint_packed(
    path: str | Path, *, verify_values: bool = True
) -> tuple[dict[str, Tensor], dict[str, PackedWeight], CheckpointMeta]:
    """Any checkpoint, checked against its config, with a quantized file's weights left packed: (the other tensors,
    the packed weights by bare name, meta). For a plain checkpoint the packed dict is empty."""
    stored = read_checkpoint_file(path)
    tensors, packed = read_packed_weights(stored) if is_quantized(stored) else (stored.tensors, {})
    packed = normalize_keys(packed)
    # shapes (and placeholders) of the packed weights stand in for them in the config checks
    stand_ins = {k: torch.empty(w.shape, dtype=w.dtype, device="meta") for k, w in packed.items()}
    state_dict, meta = checked_state_dict(stored, tensors, stand_ins, verify_values=verify_values)
    if packed:
        meta.extra["quantization"] = {**meta.extra.get("quantization", {}), **quant_summary(packed)}
    return state_dict, packed, meta


def load_checkpoint_expanded(
    path: str | Path, *, verify_values: bool = True
) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """Any checkpoint as a state dict with bare RWKV-LM names, quantized weights expanded to their original dtype
    (the public `rwkvctl.load_checkpoint`). `verify_values`: refuse NaN/Inf weights (a scan of every weight)."""
    state_dict, packed, meta = load_checkpoint_packed(path, verify_values=verify_values)
    for name, weight in packed.items():
        state_dict[name] = weight.expand().to(weight.dtype)
    return {k: state_dict[k] for k in arch_of(meta.model).param_shapes(meta.model)}, meta


def quant_summary(packed: dict[str, PackedWeight]) -> dict[str, Any]:
    by_bits: dict[int, int] = {}
    for w in packed.values():
        bits = w.params.get("bits", 0)
        by_bits[bits] = by_bits.get(bits, 0) + w.shape[0] * w.shape[1]
    return {"quantized_tensors": len(packed), "params_by_bits": {str(b): n for b, n in sorted(by_bits.items())}}
