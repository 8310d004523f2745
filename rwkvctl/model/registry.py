"""The model half of the architecture registry: architecture id -> how to build, initialise and carry state.

`rwkvctl.arch` holds the torch-free facts about each architecture (shapes, presets, rules the other layers read);
this module adds the torch callables. Code outside `rwkvctl/model/` builds models only through `build_model`, so
a second architecture needs no change there (tests/test_layering.py keeps direct `RWKV5(...)` calls in here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from rwkvctl.arch import ARCHITECTURES, ArchSpec, get_arch
from rwkvctl.config import X052
from rwkvctl.model.init import init_weights
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.model.state import RecurrentState


@dataclass(frozen=True)
class ModelSpec:
    arch: ArchSpec
    """The torch-free part (rwkvctl.arch), for the plain data."""
    module: Callable[[Any], nn.Module]
    """config -> model with uninitialised parameters; the model keeps the config as `.cfg`."""
    init_weights: Callable[..., nn.Module]
    """(model, scheme, *, seed) -> the same model, initialised in place with one of `arch.init_schemes`."""
    state: type
    """The recurrent state class its forward/step take and return."""


MODELS: dict[str, ModelSpec] = {X052: ModelSpec(ARCHITECTURES[X052], RWKV5, init_weights, RecurrentState)}


def model_spec(arch_id: str) -> ModelSpec:
    """The registered model of `arch_id`; a one-line ConfigError listing the known ids otherwise."""
    get_arch(arch_id)
    return MODELS[arch_id]


def build_model(cfg: Any) -> nn.Module:
    """The model `cfg` describes, parameters uninitialised (build under `torch.device("meta")` to allocate nothing):
    initialise with `initialize` or load a state dict."""
    return model_spec(cfg.architecture).module(cfg)


def initialize(model: nn.Module, scheme: str, *, seed: int | None = None) -> nn.Module:
    """Initialise a model made by `build_model` in place with its architecture's scheme; returns it."""
    return model_spec(model.cfg.architecture).init_weights(model, scheme, seed=seed)
