"""What rwkvctl needs to know about one model architecture, as plain data and torch-free functions of its config.

An `ArchSpec` is the registry entry (`rwkvctl.arch.ARCHITECTURES`) that every layer reads instead of hard-coding one
architecture's rules: io checks and infers configs with `param_shapes`/`infer_config`, train groups parameters by
`optim` and counts FLOPs with `flops_per_token`, quant picks tensors by `quant`, and the state file stores what
`state_shapes` lists. The modules themselves (build, init, state class) are registered one layer up, in
`rwkvctl.model.registry`, because this package must stay importable without torch (`rwkvctl --help`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from rwkvctl.errors import ConfigError


@dataclass(frozen=True)
class OptimRules:
    """AdamW parameter grouping as data; `rwkvctl.train.optim.param_groups` applies it (first match wins).

    A parameter whose name contains a pattern of `lr_scale` gets that lr multiplier (with layerwise lr; 1x
    without) and never weight decay. Any other parameter decays when weight decay is on, its name contains
    `decay_marker` and it has at least `decay_min_dims` dimensions of size > 1; the rest is 1x without decay.
    """

    lr_scale: tuple[tuple[str, float], ...]
    decay_marker: str = ".weight"
    decay_min_dims: int = 2


@dataclass(frozen=True)
class QuantPatterns:
    """Which tensors `rwkvctl quantize` may pack: `linear` at --bits, `embeddings` at --embed-bits."""

    linear: re.Pattern[str]
    embeddings: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture. `config_class` must be a dataclass with an `architecture` field equal to `id`."""

    id: str
    """Short id recorded in files ("x052", RWKV-LM's name for RWKV-5.2)."""
    title: str
    """Its name in messages ("RWKV-5.2")."""
    label: str
    """Long name written at the top of checkpoint sidecars."""
    config_class: type
    """The model config dataclass; `from_dict(data, source=...)` builds it from a file's mapping."""
    presets: Mapping[str, Mapping[str, Any]]
    """Named sizes: config fields for `config_class`."""
    init_schemes: tuple[str, ...]
    """Names accepted by this architecture's weight init (rwkvctl.model.registry.initialize)."""
    param_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    """config -> every tensor of the state dict, name -> shape, in the order files store them."""
    infer_config: Callable[..., Any]
    """(shapes, *, source) -> config of a bare state dict (a file without a sidecar)."""
    versions: tuple[str, ...]
    """`rwkvctl.io.checkpoint.detect_version` results whose bare state dicts this architecture reads."""
    state_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    """config -> recurrent state of one sequence, name -> shape (layer first); the batch goes after the layer."""
    state_fp32: tuple[str, ...]
    """State tensors kept in fp32 whatever the model dtype."""
    optim: OptimRules
    quant: QuantPatterns
    flops_per_token: Callable[[Any], float]
    """config -> training FLOPs per token (forward + backward), for MFU."""

    def preset(self, name: str, **overrides: Any) -> Any:
        """The config of a named preset, with field overrides."""
        if name not in self.presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(self.presets)}")
        return self.config_class(**{**self.presets[name], **overrides})

    def param_count(self, cfg: Any) -> int:
        """Exact parameter count, without allocating anything and in time independent of n_layer (every block has
        the same tensors), so a config from an untrusted file or flag is sized before anything is built."""

        def count(c: Any) -> int:
            return sum(math.prod(shape) for shape in self.param_shapes(c).values())

        if cfg.n_layer <= 2:
            return count(cfg)
        one, two = count(replace(cfg, n_layer=1)), count(replace(cfg, n_layer=2))
        return one + (cfg.n_layer - 1) * (two - one)
