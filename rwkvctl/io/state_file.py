"""Recurrent-state files: a conversation's RNN state (and the logits it predicts next) saved to disk.

Format: safetensors (no pickle), the architecture's state tensors (rwkvctl.arch `state_shapes`; for x052 `att_shift`
(L,C), `ffn_shift` (L,C), `wkv` (L,H,N,N)) in fp32 and `logits` (V,) fp32, plus JSON metadata under the key
"rwkvctl-state": the model's architecture id and shape, the tokenizer, and whatever the caller records (e.g. the
transcript). A file without an architecture id is x052; one of an architecture this version does not know is
refused. One sequence (batch 1) per file. Written atomically, so an interrupted save never damages the previous file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkvctl.arch import ARCHITECTURES, DEFAULT_ARCH, arch_of
from rwkvctl.config import MAX_DIM, ModelConfig
from rwkvctl.errors import CheckpointError
from rwkvctl.fs import atomic_path
from rwkvctl.io import bounded_json
from rwkvctl.io.bounded_json import field as checked_field

META_KEY = "rwkvctl-state"
FORMAT_VERSION = 1


@dataclass
class SavedState:
    att_shift: Tensor  # (L, C)
    ffn_shift: Tensor  # (L, C)
    wkv: Tensor  # (L, H, N, N) fp32
    logits: Tensor  # (V,) fp32: what the model predicts after the saved text
    info: dict[str, Any] = field(default_factory=dict)  # tokenizer, transcript, ...


_SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "head_size", "vocab_size")
_INFO_KINDS: dict[str, type] = {"tokenizer": str, "user": str, "bot": str, "tokens_seen": int, "transcript": list}


@dataclass
class StateMeta:
    """The JSON under META_KEY: one definition for the writer and the reader. `model`: the architecture id and
    the shape the state belongs to; `info`: what the caller records (chat: tokenizer, role names, tokens seen,
    transcript as [role, text] pairs; other keys are kept as they are)."""

    model: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "model": self.model, "info": self.info})

    @classmethod
    def from_json(cls, raw: str | None, path: Path) -> StateMeta:
        """Checked field by field: one CheckpointError naming the file, the field and what was expected."""
        if raw is None:
            raise CheckpointError(f"{path}: not an rwkvctl state file (no {META_KEY!r} metadata)")
        data = bounded_json.loads(raw, str(path), CheckpointError, what="state metadata")

        def get(d: dict[str, Any], key: str, kind: type, where: str, **kw: Any) -> Any:
            return checked_field(d, key, kind, str(path), CheckpointError, where=where, **kw)

        version = bounded_json.format_version(data, "format", FORMAT_VERSION, str(path), CheckpointError,
                                              what="state metadata")
        model = get(data, "model", dict, "state metadata field")
        get(model, "architecture", str, "state metadata field model.", default=DEFAULT_ARCH)
        for key in _SHAPE_KEYS:
            get(model, key, int, "state metadata field model.", minimum=1, maximum=MAX_DIM, default=None)
        info = get(data, "info", dict, "state metadata field", default={})
        for key, kind in _INFO_KINDS.items():
            get(info, key, kind, "state metadata field info.", default=None, **({"minimum": 0} if kind is int else {}))
        for entry in info.get("transcript", []):
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
                raise CheckpointError(f"{path}: state metadata field info.transcript must hold [role, text] pairs of "
                                      f"strings, found {str(entry)[:40]!r}")
        return cls(model=model, info=info, format=version)


def _model_shape(cfg: ModelConfig) -> dict[str, int | str]:
    return {
        "architecture": cfg.architecture,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "head_size": cfg.head_size,
        "vocab_size": cfg.vocab_size,
    }


def save_state(path: str | Path, saved: SavedState, cfg: ModelConfig) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: getattr(saved, k).detach().float().cpu().contiguous() for k in _expected_shapes(cfg)}
    _check_shapes(path, tensors, cfg)
    meta = StateMeta(model=_model_shape(cfg), info=saved.info).to_json()
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a file name such as {path / 'chat.safetensors'}")
    try:
        with atomic_path(path, private=True) as tmp:  # a conversation: readable by its owner only
            save_file(tensors, str(tmp), metadata={META_KEY: meta})
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the state file ({e.strerror or e})") from None
    except Exception as e:  # safetensors reports I/O failures as its own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"{path}: cannot write the state file ({str(e)[:120]})") from None
    return path


def load_state(path: str | Path, cfg: ModelConfig) -> SavedState:
    """Read a state file and check it belongs to a model of this shape; one-line errors otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such state file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable state file (truncated or corrupt: {str(e)[:120]})") from None
    meta = StateMeta.from_json(raw_meta, path)
    saved_shape = meta.model
    _check_architecture(path, saved_shape, cfg)
    want = _model_shape(cfg)
    del want["architecture"]  # checked above, where an old file's missing id means x052
    for key, value in want.items():
        if saved_shape.get(key) != value:
            raise CheckpointError(
                f"{path}: saved for a model with {key}={saved_shape.get(key)}, this model has {key}={value}; "
                "use the model the state was saved with"
            )
    _check_shapes(path, tensors, cfg)
    return SavedState(*(tensors[k].float() for k in _expected_shapes(cfg)), info=meta.info)


def _check_architecture(path: Path, saved_shape: Any, cfg: ModelConfig) -> None:
    arch_id = saved_shape.get("architecture", DEFAULT_ARCH) if isinstance(saved_shape, dict) else DEFAULT_ARCH
    if not isinstance(arch_id, str) or arch_id not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: saved for architecture {arch_id!r}, which this rwkvctl cannot load "
            f"(known: {', '.join(ARCHITECTURES)})"
        )
    if arch_id != cfg.architecture:
        raise CheckpointError(
            f"{path}: saved for a {arch_id} model, this model is {cfg.architecture}; use the model the state was "
            "saved with"
        )


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {**arch_of(cfg).state_shapes(cfg), "logits": (cfg.vocab_size,)}


def _check_shapes(path: Path, tensors: dict[str, Tensor], cfg: ModelConfig) -> None:
    for key, shape in _expected_shapes(cfg).items():
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        if not torch.isfinite(tensors[key]).all():
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")


def is_state_file(path: str | Path) -> bool:
    """A safetensors file carrying our state metadata (cheap: reads the header only)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def describe_state_file(path: str | Path) -> dict[str, Any]:
    """What `rwkvctl inspect` shows about a state file: the model shape it belongs to and the recorded info."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable state file ({str(e)[:120]})") from None
    meta = StateMeta.from_json(raw, path)
    model = {"architecture": DEFAULT_ARCH, **meta.model}  # files saved before architectures were recorded are x052
    return {"model": model, "info": meta.info, "shapes": shapes, "bytes": path.stat().st_size}
