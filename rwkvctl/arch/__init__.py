"""The architecture registry: architecture id -> `ArchSpec` (torch-free; model builders: rwkvctl.model.registry).

Only RWKV-5.2 ("x052") exists. Files written before architectures were recorded carry no id and are x052.
"""

from __future__ import annotations

from typing import Any

from rwkvctl.arch import x052
from rwkvctl.arch.spec import ArchSpec, OptimRules, QuantPatterns
from rwkvctl.errors import ConfigError

__all__ = ["ARCHITECTURES", "DEFAULT_ARCH", "ArchSpec", "OptimRules", "QuantPatterns", "arch_for_version",
           "arch_of", "config_from_dict", "get_arch"]

ARCHITECTURES: dict[str, ArchSpec] = {spec.id: spec for spec in (x052.SPEC,)}
DEFAULT_ARCH = x052.SPEC.id
"""The architecture of a file that does not record one."""


def get_arch(arch_id: Any) -> ArchSpec:
    """The spec of `arch_id`; a one-line ConfigError listing the known ids otherwise."""
    if not isinstance(arch_id, str) or arch_id not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch_id!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch_id]


def arch_of(cfg: Any) -> ArchSpec:
    """The spec of a model config (every registered config class has an `architecture` field)."""
    return get_arch(cfg.architecture)


def arch_for_version(version: str) -> ArchSpec | None:
    """The architecture that reads bare state dicts of this RWKV generation (rwkvctl.io.checkpoint.detect_version)."""
    return next((spec for spec in ARCHITECTURES.values() if version in spec.versions), None)


def config_from_dict(data: Any, *, source: str = "config") -> Any:
    """A model config from its serialized mapping, by the mapping's `architecture` (absent: the default, x052)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: model config must be a mapping, got {type(data).__name__}")
    try:
        spec = get_arch(data.get("architecture", DEFAULT_ARCH))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return spec.config_class.from_dict(data, source=source)
