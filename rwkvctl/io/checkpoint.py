"""RWKV-LM compatible checkpoint files: `.pth` (plain state dict) or `.safetensors`, plus a sidecar.

A checkpoint is exactly what RWKV-LM writes — a flat ``{name: tensor}`` dict with x052 names and
shapes — so official tools load ours and we load theirs. What RWKV-LM does not store (config, tokenizer,
step) lives in a small JSON sidecar ``<file>.json`` (and, for safetensors, in the file's own metadata).
A bare official `.pth` without a sidecar still loads: the config is inferred from tensor shapes.
The sidecar's model section records the architecture id (rwkvctl.arch); a file without one is x052, and a
file of an architecture this version does not know is refused.

Loading never runs pickled code: `.pth` goes through ``torch.load(weights_only=True)``. Every problem
becomes a one-line `CheckpointError` naming the file and what is wrong.

This module reads plain checkpoints. Quantized ones (`rwkvctl quantize`) are read by rwkvctl.quant.format, which
sits above io and builds on `read_checkpoint_file` and `checked_state_dict` here.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkvctl.arch import ARCHITECTURES, DEFAULT_ARCH, arch_for_version, arch_of, config_from_dict
from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.fs import atomic_paths
from rwkvctl.io import bounded_json

SUFFIXES = (".pth", ".pt", ".safetensors")
SIDECAR_FORMAT = "rwkvctl-checkpoint"
SIDECAR_VERSION = 1  # "format_version" in the sidecar and the safetensors metadata; absent (never so far): 1
# Prefixes that wrappers add to parameter names: Lightning/DeepSpeed, DDP, torch.compile.
_WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.")


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself beyond its tensors."""

    model: ModelConfig
    tokenizer: str = "world"
    step: int | None = None
    tokens: int | None = None
    init: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "architecture": arch_of(self.model).label,
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer,
            "step": self.step,
            "tokens": self.tokens,
            "init": self.init,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> CheckpointMeta:
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise CheckpointError(f'{source}: not an rwkvctl sidecar (no "format": "{SIDECAR_FORMAT}")')
        bounded_json.format_version(data, "format_version", SIDECAR_VERSION, source, CheckpointError, what="sidecar")
        if "model" not in data:
            raise CheckpointError(f"{source}: sidecar has no 'model' section")
        check_architecture(data["model"], source=source)
        try:
            model = config_from_dict(data["model"], source=source)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        fields = {
            "tokenizer": (data.get("tokenizer", "world"), str, False),
            "step": (data.get("step"), int, True),
            "tokens": (data.get("tokens"), int, True),
            "init": (data.get("init"), str, True),
            "extra": (data.get("extra") or {}, dict, False),
        }
        for name, (value, kind, optional) in fields.items():
            if (value is None and not optional) or (
                value is not None and (not isinstance(value, kind) or isinstance(value, bool))
            ):
                raise CheckpointError(f"{source}: sidecar field {name!r} must be {kind.__name__}, got {value!r}")
            if kind is int and value is not None and value < 0:
                raise CheckpointError(f"{source}: sidecar field {name!r} must be >= 0, got {value!r}")
        return cls(model=model, **{name: value for name, (value, _, _) in fields.items()})


def check_architecture(model: Any, *, source: str) -> None:
    """Refuse a file whose model section names an architecture this version does not know (absent: x052)."""
    arch_id = model.get("architecture", DEFAULT_ARCH) if isinstance(model, dict) else DEFAULT_ARCH
    if not isinstance(arch_id, str) or arch_id not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: written for architecture {arch_id!r}, which this rwkvctl cannot load "
            f"(known: {', '.join(ARCHITECTURES)})"
        )


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def normalize_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (DeepSpeed/Lightning, DDP, torch.compile) so every file uses bare names."""
    out = {}
    for name, tensor in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    stripped = True
        out[name] = tensor
    return out


def detect_version(shapes: dict[str, tuple[int, ...]]) -> str:
    """The RWKV generation of a state dict, by the same key rules as the official runtimes."""
    keys = shapes.keys()
    if "emb.weight" not in keys or not any(k.startswith("blocks.0.") for k in keys):
        return "unknown"
    if any(k.startswith("blocks.0.att.r_k") or ".att.x_r" in k for k in keys):
        return "7"
    if any("time_maa" in k for k in keys):
        return "6"
    if not any(".ln_x." in k for k in keys):
        return "4"
    decay = shapes.get("blocks.0.att.time_decay", ())
    if len(decay) == 2 and decay[1] > 1:
        return "5.2" if "blocks.0.att.gate.weight" in keys else "5.2-nogate"
    return "5.1" if "blocks.0.att.gate.weight" in keys else "5.0"


def validate_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig, *, source: str) -> None:
    """Raise a one-line CheckpointError listing missing/unexpected keys or the first shape mismatches."""
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.")}
    if len(blocks) != cfg.n_layer:  # before listing the config's tensors: a bad n_layer (10^7) must not be expanded
        raise CheckpointError(f"{source}: the config says n_layer={cfg.n_layer} but the file holds {len(blocks)} "
                              "blocks; fix or delete the sidecar (a bare .pth is sized from its tensors)")
    expected = arch_of(cfg).param_shapes(cfg)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise CheckpointError(f"{source}: does not match its model config ({'; '.join(parts)})")
    bad = [
        f"{k} is {tuple(state_dict[k].shape)}, expected {shape}"
        for k, shape in expected.items()
        if tuple(state_dict[k].shape) != shape
    ]
    if bad:
        more = f" (+{len(bad) - 2} more)" if len(bad) > 2 else ""
        raise CheckpointError(f"{source}: shape mismatch: {'; '.join(bad[:2])}{more}")
    non_float = [k for k, t in state_dict.items() if not t.is_floating_point()]
    if non_float:
        raise CheckpointError(f"{source}: tensors must be floating point, {_few(non_float)} are not")


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{f', ... {len(names) - n} more' if len(names) > n else ''}]"


def save_checkpoint(
    path: str | Path, state_dict: dict[str, Tensor], meta: CheckpointMeta, *, dtype: torch.dtype | None = None
) -> Path:
    """Write weights (format by suffix) and the sidecar, each atomically. Returns the weights path."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; use .pth or .safetensors")
    state_dict = normalize_keys(state_dict)
    validate_state_dict(state_dict, meta.model, source=str(path))
    tensors = {k: (t.detach().to("cpu", dtype or t.dtype)).contiguous() for k, t in state_dict.items()}
    # one commit for both (the sidecar last): a kill between the renames leaves the new weights without a sidecar
    # (read by their embedded metadata, or their shapes), never beside the sidecar of the file they replaced
    with atomic_paths(path, sidecar_path(path)) as (tmp, side_tmp):
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"rwkvctl": json.dumps(meta.to_dict())})
        else:
            torch.save(tensors, tmp)
        side_tmp.write_text(json.dumps(meta.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _read_pth(path: Path) -> dict[str, Tensor]:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint (truncated, corrupt, or a legacy/foreign format); re-export it"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled objects other than tensors, which could run code "
            f"({first[:120]}); only plain state dicts are accepted"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: unreadable checkpoint (truncated or corrupt: {str(e).splitlines()[0][:120]})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # Lightning-style wrapper
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} state dict, found {type(obj).__name__}")
    return obj


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt: {str(e)[:120]})") from None


def _read_meta(path: Path, embedded: str | None, shapes: dict[str, tuple[int, ...]]) -> CheckpointMeta:
    side = sidecar_path(path)
    if side.exists():
        try:
            data = bounded_json.read(side, CheckpointError, what="sidecar", expect=object)
        except OSError as e:
            raise CheckpointError(f"{side}: cannot read the sidecar ({e.strerror or e})") from None
        return CheckpointMeta.from_dict(data, source=str(side))
    if embedded:
        data = bounded_json.loads(embedded, f"{path}", CheckpointError, what="rwkvctl metadata", expect=object)
        return CheckpointMeta.from_dict(data, source=f"{path} (metadata)")
    version = detect_version(shapes)
    if version == "unknown":
        raise CheckpointError(f"{path}: not an RWKV checkpoint (no emb.weight / blocks.0.* tensors)")
    spec = arch_for_version(version)
    if spec is None:
        raise CheckpointError(
            f"{path}: this looks like an RWKV-{version} checkpoint; rwkvctl handles "
            f"{', '.join(f'{s.title} ({s.id})' for s in ARCHITECTURES.values())} models only"
        )
    try:
        return CheckpointMeta(model=spec.infer_config(shapes, source=str(path)), tokenizer="world")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _describes_other_model(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> bool:
    spec = arch_of(cfg)
    try:
        inferred = spec.infer_config(shapes)
    except ConfigError:
        return False
    return spec.param_shapes(inferred) == shapes and inferred != cfg


@dataclass
class StoredCheckpoint:
    """A checkpoint file as read, before its tensors are checked against a model config."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str]  # the safetensors header's metadata ({} for .pth)


def read_checkpoint_file(path: str | Path) -> StoredCheckpoint:
    """The tensors and header metadata of a `.pth` or `.safetensors` file, unchecked (see `checked_state_dict`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the .pth or .safetensors file inside it")
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        return StoredCheckpoint(path, tensors, metadata)
    return StoredCheckpoint(path, _read_pth(path), {})


# safetensors dtype names -> torch (what a lazily opened file's stand-ins are made of)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass
class LazyCheckpoint:
    """A checkpoint file opened without reading its tensors: the header now (file keys, shapes, dtypes as
    placeholders on the meta device), each tensor when asked for (`tensor`), so a pass over the weights holds about
    one tensor at a time."""

    path: Path
    placeholders: dict[str, Tensor]  # by the file's own keys
    metadata: dict[str, str]
    read: Callable[[str], Tensor]

    def stored(self) -> StoredCheckpoint:
        """The file as `checked_state_dict` takes it (no tensors; check with `placeholders` as stand-ins)."""
        return StoredCheckpoint(self.path, {}, self.metadata)


@contextmanager
def open_checkpoint_lazy(path: str | Path) -> Iterator[LazyCheckpoint]:
    """Open a `.pth` (memory-mapped, `torch.load(mmap=True)`) or `.safetensors` (`safe_open`) checkpoint lazily;
    the file stays open inside the `with`. Read errors are one-line `CheckpointError`s as in `read_checkpoint_file`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the .pth or .safetensors file inside it")
    if path.suffix != ".safetensors":
        tensors = _read_pth(path)  # mmap: a tensor's pages are read when it is used
        placeholders = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
        yield LazyCheckpoint(path, placeholders, {}, tensors.__getitem__)
        return
    from safetensors import SafetensorError, safe_open

    def fail(e: Exception) -> CheckpointError:
        return CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt: {str(e)[:120]})")

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise fail(e) from None
    with handle as f:

        def read(key: str) -> Tensor:
            try:
                return f.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as e:
                raise fail(e) from None

        placeholders = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            part = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8)  # an exotic dtype is refused as non-float
            placeholders[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
        yield LazyCheckpoint(path, placeholders, f.metadata() or {}, read)


def checked_state_dict(
    stored: StoredCheckpoint, tensors: dict[str, Tensor], stand_ins: dict[str, Tensor] | None = None, *,
    verify_values: bool = True,
) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """`tensors` (the file's state-dict entries) with bare names, and the checkpoint's meta, validated against its
    model config. `stand_ins`: placeholders (shape and dtype, e.g. on the meta device) for weights the file stores
    in another form (rwkvctl.quant.format reads quantized ones), checked in their place. `verify_values=False` skips
    the finiteness scan, which reads every weight (for `inspect`, which shows a file without using its values)."""
    state_dict = normalize_keys(tensors)
    stand_ins = normalize_keys(stand_ins or {})
    shapes = {k: tuple(t.shape) for k, t in {**state_dict, **stand_ins}.items()}
    meta = _read_meta(stored.path, stored.metadata.get("rwkvctl"), shapes)
    try:
        validate_state_dict({**state_dict, **stand_ins}, meta.model, source=str(stored.path))
    except CheckpointError as e:
        side = sidecar_path(stored.path)
        if side.exists() and _describes_other_model(shapes, meta.model):
            # weights and sidecar are renamed one after the other: a crash in between leaves a stale sidecar
            raise CheckpointError(
                f"{side}: describes a different model than {stored.path.name} (stale sidecar from an interrupted "
                "save?); delete the sidecar to infer the config from the tensors"
            ) from None
        if not stand_ins and "quantization" in meta.extra:
            raise CheckpointError(
                f"{stored.path}: is a quantized checkpoint; read it with rwkvctl.load_checkpoint "
                "(rwkvctl.quant.format), which expands it"
            ) from None
        raise e from None
    if verify_values:
        check_finite(state_dict, stored.path)
    return state_dict, meta


def _all_finite(t: Tensor) -> bool:
    """One reduction pass and no tensor-sized temporary (isfinite(t).all() builds a bool copy: ~9x slower, a
    quarter of `quantize`'s time): the min and max are NaN if any value is, and +-Inf if one is."""
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_finite(state_dict: dict[str, Tensor], path: Path) -> None:
    """The one place non-finite weights are refused on load (every command loads through here): a NaN or Inf weight
    would only surface later as NaN logits or a NaN loss, far from its cause."""
    for name, t in state_dict.items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN/Inf value(s) of {t.numel()}; the file is "
                                  "damaged or was saved from a diverged run: use an earlier checkpoint")


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """Read and validate a plain (unquantized) checkpoint. Returns (state dict with bare RWKV-LM names, meta).
    Quantized files are read by rwkvctl.quant.format (the public `rwkvctl.load_checkpoint` reads both)."""
    stored = read_checkpoint_file(path)
    state_dict, meta = checked_state_dict(stored, stored.tensors)
    return {k: state_dict[k] for k in arch_of(meta.model).param_shapes(meta.model)}, meta
