"""rwkvctl: prepare data for, train, inspect and run RWKV-5.2 models.

Importing the package is cheap: torch-backed names are loaded lazily on first access (PEP 562),
so `rwkvctl --help` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "rwkvctl.config",
    "preset": "rwkvctl.config",
    "RWKV5": "rwkvctl.model.rwkv5",
    "RecurrentState": "rwkvctl.model.state",
    "load_checkpoint": "rwkvctl.io.checkpoint",
    "save_checkpoint": "rwkvctl.io.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkvctl' has no attribute {name!r}")
