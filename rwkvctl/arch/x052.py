"""The RWKV-5.2 ("x052") registry entry.

Its config class, presets and parameter table live in `rwkvctl.config` (the public home of `ModelConfig`); this
module adds the rules that used to be spread over the layers: the recurrent state layout, RWKV-LM's optimizer
groups, the FLOP count and which tensors quantize.
"""

from __future__ import annotations

import re

from rwkvctl.arch.spec import ArchSpec, OptimRules, QuantPatterns
from rwkvctl.config import INIT_SCHEMES, PRESETS, X052, ModelConfig, infer_config, param_count, param_shapes


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per sequence: the last ln1/ln2 output of the previous token (time-mix / channel-mix) and the WKV matrices,
    indexed [key j, value i]; the size does not depend on context length."""
    L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
    return {"att_shift": (L, C), "ffn_shift": (L, C), "wkv": (L, H, N, N)}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters (the embedding is a lookup, not a matmul) plus the
    WKV recurrence (~4 H*N*N multiply-adds per token and layer forward, x3 for backward)."""
    matmul_params = param_count(cfg) - cfg.vocab_size * cfg.n_embd
    wkv = 12 * cfg.n_layer * cfg.dim_att * cfg.head_size
    return 6.0 * matmul_params + wkv


SPEC = ArchSpec(
    id=X052,
    title="RWKV-5.2",
    label="rwkv5.2-x052",
    config_class=ModelConfig,
    presets=PRESETS,
    init_schemes=INIT_SCHEMES,
    param_shapes=param_shapes,
    infer_config=infer_config,
    versions=("5.2", "5.2-nogate"),
    state_shapes=state_shapes,
    state_fp32=("wkv",),
    # RWKV-LM (rwkv5-spec §4.2): mixes and bonus 1x, decay 2x with layerwise lr; 2-D weights decay
    optim=OptimRules(lr_scale=(("time_mix", 1.0), ("time_faaaa", 1.0), ("time_decay", 2.0))),
    # the Linear weights inside the blocks; emb/head are large for a 65536 vocabulary and the most sensitive
    quant=QuantPatterns(
        linear=re.compile(r"blocks\.\d+\.(att|ffn)\.(receptance|key|value|gate|output)\.weight$"),
        embeddings=("emb.weight", "head.weight"),
    ),
    flops_per_token=flops_per_token,
)
