"""RWKV-5.2 parameter initialisation (RWKV-LM schemes), kept apart from the module definitions.

Two "official" inits exist and runs are not comparable across them, so the choice is explicit:

- ``v5.2-2023`` — the code of the v5.2 release era (2023-11 .. 2024-04-06), which the 7B
  SlimPajama run used: emb ~ U(-emb_scale, +emb_scale) (RWKV-LM used lr_init here); every Linear
  orthogonal with gain sqrt(out/in) when out > in, else 1 (head additionally x0.5); att.output,
  ffn.value and ffn.receptance zero.
- ``rwkv-lm-2024`` — RWKV-LM since 2024-04-24: emb ~ U(-1e-4, 1e-4); head orthogonal with gain
  0.5*sqrt(V/C) (0.5 if V <= C); att.receptance, att.value, ffn.key gain 1; att.key and att.gate gain
  0.1; att.output, ffn.value, ffn.receptance zero.

The per-layer mixes, decays, bonuses and ln_x weights are the same in both (RWKV-LM RWKV-v5/src/model.py
`RWKV_TimeMix_RWKV5.__init__` and `RWKV_ChannelMix.__init__`, unchanged between the two eras).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rwkvctl.config import INIT_SCHEMES
from rwkvctl.errors import ConfigError
from rwkvctl.model.rwkv5 import RWKV5, Block


def _layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    # RWKV-LM divides by (L-1), which fails for a 1-layer model; a single layer is treated as the first.
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


@torch.no_grad()
def init_block_mixes(block: Block, n_layer: int) -> None:
    """Mixes, decay, bonus and norms of one block: identical in both schemes."""
    cfg = block.att.cfg
    C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
    r01, r1a0 = _layer_ratios(block.layer_id, n_layer)
    ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
    att = block.att
    att.time_mix_k.copy_(ddd**r1a0)
    att.time_mix_v.copy_(ddd**r1a0 + 0.3 * r01)
    att.time_mix_r.copy_(ddd ** (0.5 * r1a0))
    if cfg.gate:
        att.time_mix_g.copy_(ddd ** (0.5 * r1a0))
    n = torch.arange(A, dtype=torch.float64)
    frac = n / max(A - 1, 1)
    att.time_decay.copy_((-6 + 5 * frac ** (0.7 + 1.3 * r01)).view(H, N))
    zigzag = ((n + 1) % 3 - 1) * 0.1
    att.time_faaaa.copy_((r01 * (1 - frac) + zigzag).view(H, N))
    att.ln_x.weight.fill_(((1 + block.layer_id) / n_layer) ** 0.7)
    att.ln_x.bias.zero_()
    block.ffn.time_mix_k.copy_(ddd**r1a0)
    block.ffn.time_mix_r.copy_(ddd**r1a0)
    for ln in (block.ln1, block.ln2, getattr(block, "ln0", None)):
        if ln is not None:
            ln.weight.fill_(1.0)
            ln.bias.zero_()


def _orthogonal(weight: torch.Tensor, gain: float, generator: torch.Generator | None) -> None:
    if gain == 0:
        weight.zero_()
        return
    # orthogonal_ needs fp32/fp64; init in fp32 and cast back so bf16 models get the same values.
    tmp = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.orthogonal_(tmp, gain=gain, generator=generator)
    weight.copy_(tmp)


@torch.no_grad()
def init_weights(model: RWKV5, scheme: str = "v5.2-2023", *, emb_scale: float = 1e-4, seed: int | None = None) -> RWKV5:
    """Initialise every parameter of `model` in place with an RWKV-LM scheme and return it."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cfg = model.cfg
    V, C = cfg.vocab_size, cfg.n_embd
    for block in model.blocks:
        init_block_mixes(block, cfg.n_layer)
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()

    if scheme == "rwkv-lm-2024":
        emb = torch.empty(model.emb.weight.shape).uniform_(-1e-4, 1e-4, generator=gen)
        model.emb.weight.copy_(emb)
        _orthogonal(model.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5, gen)
        gains = {"att.receptance": 1.0, "att.value": 1.0, "ffn.key": 1.0, "att.key": 0.1, "att.gate": 0.1}
        zeros = ("att.output", "ffn.value", "ffn.receptance")
    else:
        emb = torch.empty(model.emb.weight.shape).uniform_(-emb_scale, emb_scale, generator=gen)
        model.emb.weight.copy_(emb)
        _orthogonal(model.head.weight, 0.5 * (math.sqrt(V / C) if V > C else 1.0), gen)
        gains = {}  # shape rule below
        zeros = ("att.output", "ffn.value", "ffn.receptance")

    for block in model.blocks:
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if name in zeros:
                module.weight.zero_()
                continue
            out_f, in_f = module.weight.shape
            gain = gains[name] if scheme == "rwkv-lm-2024" else (math.sqrt(out_f / in_f) if out_f > in_f else 1.0)
            _orthogonal(module.weight, gain, gen)
    return model
