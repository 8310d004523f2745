"""Learning-rate schedule as a pure function of the global optimizer step.

Because nothing here depends on the current process (no run-local step counter, no callback state), a
resumed run gets exactly the lr it would have had without the interruption: no re-warm-up, unlike
RWKV-LM, whose warm-up factor uses the run-local `global_step` and so restarts on every resume (RWKV-v5/src/trainer.py
`on_train_batch_start`).
"""

from __future__ import annotations

import math

# RWKV-LM (since 97c8aae) warms up from 1% of lr_init.
WARMUP_START = 0.01


def lr_at(step: int, *, lr_init: float, lr_final: float, warmup_steps: int, total_steps: int) -> float:
    """lr for optimizer step `step` (0-based: the first update uses step 0).

    Linear warm-up from 1% to 100% of lr_init over `warmup_steps`, then cosine from lr_init to lr_final
    over the remaining steps of the plan; lr_final after the plan ends.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return lr_init * (WARMUP_START + (1 - WARMUP_START) * step / warmup_steps)
    if lr_final == lr_init:
        return lr_init
    # The last planned step (total_steps - 1) lands exactly on lr_final.
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr_final + (lr_init - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))


def planned_steps(*, max_steps: int, max_tokens: int, tokens_per_step: int, pass_steps: int) -> int:
    """The plan the schedule decays over: explicit steps, else tokens, else one pass over the data."""
    if max_steps > 0:
        return max_steps
    if max_tokens > 0:
        return max(1, math.ceil(max_tokens / tokens_per_step))
    return max(1, pass_steps)
