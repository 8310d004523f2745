"""Calibration for activation-aware quantization: how much each input channel of each Linear layer matters.

A weight column j of a Linear layer y = x @ W.T contributes W[:, j] * x_j to the output, so an error e_j in that
column costs e_j^2 * E[x_j^2] of output error. Running the model over calibration text in the sequence form with a
hook on every Linear input, the mean of x_j^2 over all positions is that weight per input channel (`importance`);
the range search then minimises the output error instead of the weight error (rwkvctl.quant.search).

For GPTQ error feedback (rwkvctl.quant.gptq) a layer needs the whole second-moment matrix H = X.T X / n (in, in),
not just its diagonal: `collect_hessians` gathers it for a chosen set of layers, so a caller can hold one block's
matrices at a time (for a 7B, all of them together would be ~30 GB).

Memory is bounded: the text goes through the model in windows of `window` tokens, the recurrent state carried from
one to the next (the same result as one long sequence), and each hook only adds into a (in,) running sum (or an
(in, in) one for `collect_hessians`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

WINDOW = 256  # tokens per forward pass: activations of one window are alive at a time


@torch.no_grad()
def collect_importance(model: nn.Module, tokens: list[int], window: int = WINDOW) -> dict[str, Tensor]:
    """Mean squared input activation per input channel of every bias-free Linear layer of `model` (the head
    included), by state-dict weight name (`blocks.0.att.key.weight` -> (in,) fp32), over `tokens`."""
    return _input_statistics(model, tokens, window, None, lambda x: x.square().sum(0))


@torch.no_grad()
def collect_hessians(
    model: nn.Module, tokens: list[int], names: Collection[str] | None = None, window: int = WINDOW
) -> dict[str, Tensor]:
    """H = X.T X / n (in, in) fp32 of the inputs X of each bias-free Linear layer whose weight name is in `names`
    (all of them if None), over `tokens`."""
    return _input_statistics(model, tokens, window, names, lambda x: x.T @ x)


def _input_statistics(
    model: nn.Module, tokens: list[int], window: int, names: Collection[str] | None,
    statistic: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """The mean over all positions of `statistic(x)` (a sum over the rows of x (positions, in)) of the inputs of
    the chosen Linear layers, by weight name."""
    if len(tokens) < 1:
        raise ValueError("calibration needs at least one token")
    sums: dict[str, Tensor] = {}
    count = 0
    hooks = []

    def hook_for(name: str):  # noqa: ANN202 (a forward pre-hook)
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (..., in) -> (positions, in)
            total = statistic(x)
            sums[name] = total if name not in sums else sums[name] + total

        return hook

    for name, module in model.named_modules():
        weight = f"{name}.weight"
        if isinstance(module, nn.Linear) and module.bias is None and (names is None or weight in names):
            hooks.append(module.register_forward_pre_hook(hook_for(weight)))
    try:
        state = None
        for a in range(0, len(tokens), window):
            idx = torch.tensor([tokens[a : a + window]])  # (1, T)
            _, state = model(idx, state)
            count += idx.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return {name: total / count for name, total in sums.items()}
