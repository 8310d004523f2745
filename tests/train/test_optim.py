"""RWKV-LM parameter groups and the L2Wrap gradient."""

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.train.config import OptimConfig
from rwkvctl.train.optim import L2Wrap, build_adamw, param_groups, set_lr


@pytest.fixture
def model():
    return RWKV5(ModelConfig(n_layer=2, n_embd=64, vocab_size=50, head_size=32))


def _by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_groups_layerwise_lr_and_decay_only_on_matrices(model):
    groups = _by_name(param_groups(model, OptimConfig(weight_decay=0.1)))
    assert groups["blocks.0.att.time_decay"]["lr_scale"] == 2.0
    assert groups["blocks.1.att.time_faaaa"]["lr_scale"] == 1.0
    assert groups["blocks.0.att.time_mix_k"]["weight_decay"] == 0.0
    for name in ("emb.weight", "head.weight", "blocks.0.att.key.weight", "blocks.1.ffn.value.weight"):
        assert groups[name]["weight_decay"] == 0.1 and groups[name]["lr_scale"] == 1.0
    for name in ("blocks.0.ln1.weight", "blocks.0.ln0.bias", "blocks.0.att.ln_x.weight", "ln_out.weight"):
        assert groups[name]["weight_decay"] == 0.0
    assert len(groups) == len(list(model.parameters()))  # every parameter exactly once


def test_no_decay_group_without_weight_decay_and_no_layerwise(model):
    groups = param_groups(model, OptimConfig(weight_decay=0.0, layerwise_lr=False))
    assert [g["group"] for g in groups] == ["1x"]


def test_set_lr_applies_scales(model):
    opt = build_adamw(model, OptimConfig())
    set_lr(opt, 1e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3, 2e-3]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_l2wrap_gradient_matches_penalty_and_scales_with_grad_output():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 7, (6,), generator=gen)

    logits = base.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 7), target)
    wrapped = L2Wrap.apply(loss, logits)
    assert wrapped.item() == loss.item()  # forward is the identity on the loss
    (wrapped * 0.25).backward()  # 0.25 = 1/accum: the penalty must be scaled like the loss

    ref_logits = base.clone().requires_grad_()
    penalty = 1e-4 * (ref_logits.max(-1).values ** 2).mean() / 2  # the loss L2Wrap's backward differentiates
    ((torch.nn.functional.cross_entropy(ref_logits.view(-1, 7), target) + penalty) * 0.25).backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-15, rtol=0)
