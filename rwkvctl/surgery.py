"""Model surgery: pure state-dict transforms between RWKV-5 layouts.

`add_gate` turns a gate-less model (v5 layout) into the v5.2 layout with an output gate, the change the RWKV-5 7B
run made mid-way: per layer `att.gate.weight` [A, C] and `att.time_mix_g` [1, 1, C] are added and everything else is
kept bit for bit, including the FFN width (3.5x for models made by rwkvctl; an older 4x gate-less file stays 4x).

The gate multiplies the attention output by silu(gate(x)); without a bias no initialisation makes that the identity,
so a gated model cannot reproduce the gate-less one exactly and the loss moves when training resumes. The inits
offered are RWKV-LM's: orthogonal with gain 0.1 (RWKV-LM since 2024-04: a quiet gate that training opens) or gain 1.0
(the v5.2 code of 2023). `time_mix_g` starts as the layer's trained `time_mix_r`: RWKV-LM initialises both alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from rwkvctl.arch import arch_of
from rwkvctl.config import ModelConfig
from rwkvctl.errors import ConfigError
from rwkvctl.names import canonical

# init scheme -> orthogonal gain of att.gate.weight
GATE_INITS = {"rwkv-lm-2024": 0.1, "v5.2-2023": 1.0}


def added_gate_names(cfg: ModelConfig) -> list[str]:
    return [f"blocks.{i}.att.{name}" for i in range(cfg.n_layer) for name in ("gate.weight", "time_mix_g")]


def add_gate(
    state_dict: dict[str, Tensor], cfg: ModelConfig, *, init: str = "rwkv-lm-2024", seed: int = 0
) -> tuple[dict[str, Tensor], ModelConfig]:
    """-> (state dict of the gated model in RWKV-LM order, its config). The input is not modified."""
    if cfg.gate:
        raise ConfigError("the model already has the output gate")
    init = canonical("init", init).name  # the old spelling rwkv-lm too, for one release
    if init not in GATE_INITS:
        raise ConfigError(f"unknown gate init {init!r}; choose one of {', '.join(GATE_INITS)}")
    new_cfg = replace(cfg, gate=True, dim_ffn=cfg.dim_ffn)  # keep the FFN width the weights have
    gen = torch.Generator().manual_seed(seed)
    added: dict[str, Tensor] = {}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}.att."
        like = state_dict[p + "receptance.weight"]  # (A, C): dtype and device of the new matrix
        w = torch.empty(cfg.dim_att, cfg.n_embd, dtype=torch.float32)
        torch.nn.init.orthogonal_(w, gain=GATE_INITS[init], generator=gen)
        added[p + "gate.weight"] = w.to(like.dtype).to(like.device)
        added[p + "time_mix_g"] = state_dict[p + "time_mix_r"].clone()
    merged = {**state_dict, **added}
    return {k: merged[k] for k in arch_of(new_cfg).param_shapes(new_cfg)}, new_cfg
