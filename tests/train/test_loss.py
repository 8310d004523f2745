"""The fused chunked cross entropy (+ L2Wrap) equals the stock F.cross_entropy + L2Wrap: loss and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkvctl.train import loss as loss_mod
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.optim import L2Wrap


def reference(logits: torch.Tensor, y: torch.Tensor, use_l2wrap: bool) -> torch.Tensor:
    compute = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.to(compute).reshape(-1, logits.shape[-1]), y.reshape(-1))
    return L2Wrap.apply(ce, logits) if use_l2wrap else ce


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_l2wrap", [False, True])
def test_matches_stock_loss_and_gradient(monkeypatch, dtype: torch.dtype, use_l2wrap: bool) -> None:
    monkeypatch.setattr(loss_mod, "CE_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk: uneven chunks
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(3, 11, 50, generator=gen, dtype=torch.float64) * 4).to(dtype)
    y = torch.randint(0, 50, (3, 11), generator=gen)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    got, want = lm_loss(a, y, use_l2wrap=use_l2wrap), reference(b, y, use_l2wrap)
    (got * 0.25).backward()  # 0.25 = 1/accum: the gradient must scale with grad_output
    (want * 0.25).backward()
    assert got.dtype == torch.float32 or dtype == torch.float64
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    assert torch.allclose(got.double(), want.double(), rtol=tol, atol=0)
    gtol = {torch.float64: 1e-15, torch.float32: 1e-8, torch.bfloat16: 1e-4}[dtype]
    assert a.grad.dtype == dtype and a.grad.shape == base.shape
    assert torch.allclose(a.grad.double(), b.grad.double(), atol=gtol, rtol=0)


def test_l2wrap_gradient_is_present() -> None:
    """Not a no-op: with L2Wrap the largest logit of each row gets the extra 1e-4 * max / rows."""
    logits = torch.tensor([[[0.0, 5.0, 1.0]]], requires_grad=True)
    y = torch.tensor([[0]])
    lm_loss(logits, y, use_l2wrap=True).backward()
    with_wrap = logits.grad.clone()
    logits.grad = None
    lm_loss(logits, y, use_l2wrap=False).backward()
    assert torch.allclose(with_wrap - logits.grad, torch.tensor([[[0.0, 5e-4, 0.0]]]), atol=1e-6, rtol=0)


def test_no_grad_path_gives_the_same_loss() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 30, generator=gen).bfloat16()
    y = torch.randint(0, 30, (2, 5), generator=gen)
    with torch.no_grad():
        evaluated = lm_loss(logits, y, use_l2wrap=False)
    trained = lm_loss(logits.clone().requires_grad_(), y, use_l2wrap=True)
    assert torch.allclose(evaluated, trained, rtol=1e-6)
    assert torch.allclose(evaluated, F.cross_entropy(logits.float().view(-1, 30), y.view(-1)), rtol=1e-6)


def test_out_of_range_target_raises() -> None:
    logits = torch.randn(1, 2, 4, requires_grad=True)
    with pytest.raises((IndexError, RuntimeError)):
        lm_loss(logits, torch.tensor([[1, 4]]), use_l2wrap=False)


def test_a_second_backward_through_the_same_graph_is_refused() -> None:
    """backward scales the stored gradient in place (memory); retain_graph would silently double-scale it."""
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.tensor([[0, 1, 2]]), use_l2wrap=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_empty_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no positions"):
        lm_loss(torch.zeros(1, 0, 5, requires_grad=True), torch.zeros(1, 0, dtype=torch.long), use_l2wrap=True)
