"""rwkvctl: prepare data for, train, inspect and run RWKV-5.2 models.

Importing the package is cheap: torch-backed names are loaded lazily on first access (PEP 562),
so `rwkvctl --help` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str | tuple[str, str]] = {
    "ModelConfig": "rwkvctl.config",
    "preset": "rwkvctl.config",
    "RWKV5": "rwkvctl.model.rwkv5",
    "RecurrentState": "rwkvctl.model.state",
    # any checkpoint, quantized ones expanded (rwkvctl.io.checkpoint.load_checkpoint reads plain files only)
    "load_checkpoint": ("rwkvctl.quant.format", "load_checkpoint_expanded"),
    "save_checkpoint": "rwkvctl.io.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rwkvctl' has no attribute {name!r}")
