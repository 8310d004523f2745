"""AdamW with the architecture's parameter groups (x052: RWKV-LM's, in RWKV-LM RWKV-v5/src/model.py
`configure_optimizers`) and the L2Wrap logit penalty (`class L2Wrap` there)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rwkvctl.arch import arch_of
from rwkvctl.train.config import OptimConfig

# RWKV-LM multiplies the schedule's lr per group; `lr_scale` is read by the loop every step.
LR_SCALE_KEY = "lr_scale"


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split parameters by the model's architecture rules (`OptimRules` in rwkvctl.arch; `model.cfg` names the
    architecture), first matching rule wins. For x052, RWKV-LM's: time_mix -> 1x; time_faaaa -> 1x; time_decay ->
    2x; 2-D `.weight` with weight_decay > 0 -> decay group; everything else -> 1x without decay.
    Without layerwise_lr every non-decay group is 1x. Groups are ordered by lr scale, the decay group last ("1x",
    "2x", "decay": saved optimizer states address parameters by this order). Empty groups are dropped (DeepSpeed
    rejects them).
    """
    rules = arch_of(model.cfg).optim
    scales = {f"{s:g}x": s for s in sorted({1.0, *(s for _, s in rules.lr_scale)})} | {"decay": 1.0}
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {key: [] for key in scales}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for pattern, s in rules.lr_scale if pattern in name), None)
        if scale is not None:
            key = f"{scale if cfg.layerwise_lr else 1.0:g}x"
        elif cfg.weight_decay > 0 and p.squeeze().dim() >= rules.decay_min_dims and rules.decay_marker in name:
            key = "decay"
        else:
            key = "1x"
        buckets[key].append((name, p))
    groups = []
    for key, items in buckets.items():
        if not items:
            continue
        groups.append({
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "weight_decay": cfg.weight_decay if key == "decay" else 0.0,
            LR_SCALE_KEY: scales[key],
            "group": key,
        })
    return groups


def optimizer_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups without our bookkeeping names list (torch keeps unknown keys, DeepSpeed may not)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def remap_adamw_state(
    saved: dict[str, Any], old_groups: list[dict[str, Any]], new_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """An AdamW state dict saved for one set of parameter groups, re-addressed to another by parameter name.

    torch numbers parameters by position, group after group, so adding parameters (surgery) shifts every index
    after them. Moments and step counts follow their parameter's name; parameters new in `new_groups` get no
    state (AdamW starts them fresh, with their own bias correction). Group settings come from the saved group of
    the same kind, else from the first saved group with the new group's weight decay and lr scale.
    `old_groups`/`new_groups`: `param_groups()` of the model before and after.
    """
    saved_groups = saved.get("param_groups", [])
    if len(saved_groups) != len(old_groups) or any(
        len(s["params"]) != len(g["names"]) for s, g in zip(saved_groups, old_groups, strict=True)
    ):
        raise ValueError("the saved optimizer state does not match the model's parameter groups")
    index = {}
    for saved_group, group in zip(saved_groups, old_groups, strict=True):
        for pid, name in zip(saved_group["params"], group["names"], strict=True):
            index[name] = pid
    by_kind = {g.get("group"): g for g in saved_groups}
    state: dict[int, Any] = {}
    groups, position = [], 0
    for group in new_groups:
        template = by_kind.get(group["group"])
        if template is None:
            template = {**saved_groups[0], "weight_decay": group["weight_decay"], LR_SCALE_KEY: group[LR_SCALE_KEY],
                        "group": group["group"]}  # fmt: skip
        settings = {k: v for k, v in template.items() if k != "params"}
        ids = list(range(position, position + len(group["names"])))
        for pid, name in zip(ids, group["names"], strict=True):
            old = index.get(name)
            if old is not None and old in saved["state"]:
                state[pid] = saved["state"][old]
        groups.append({**settings, "params": ids})
        position += len(ids)
    return {"state": state, "param_groups": groups}


def build_adamw(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """torch AdamW over the RWKV-LM groups. `fused` (CPU and CUDA): one kernel over all parameters, deterministic,
    and on CPU ~7x faster than the foreach form (which took ~18% of a small World-vocab model's step)."""
    return torch.optim.AdamW(
        optimizer_groups(param_groups(model, cfg)),
        lr=cfg.lr_init,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        weight_decay=0.0,
        fused=fused or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_SCALE_KEY, 1.0)


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward it also pushes the largest logit of each position towards 0.

    Equivalent to adding 1e-4 * mean_{b,t}(max_v logit^2) / 2. Unlike RWKV-LM (whose backward ignores
    grad_output and scales by 1/(B*T) alone), the extra gradient is multiplied by grad_output, so it is scaled exactly
    like the loss itself under gradient accumulation (loss/accum) and data-parallel averaging.
    """

    FACTOR = 1e-4

    @staticmethod
    def forward(ctx: Any, loss: Tensor, logits: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        positions = logits.numel() // logits.shape[-1]  # B*T
        factor = L2Wrap.FACTOR / positions
        max_vals, max_ids = logits.max(dim=-1, keepdim=True)
        glogits = torch.zeros_like(logits)
        glogits.scatter_(-1, max_ids, (max_vals * factor * grad_output).to(logits.dtype))
        return grad_output, glogits
