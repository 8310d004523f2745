"""Segmented long-window training: gradients equal backpropagation through the whole window (full BPTT), the
loss equals the whole-window loss, and a run with train.segment_len trains and resumes."""

from __future__ import annotations

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import ConfigError
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.segmented import segmented_backward, segmented_loss

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=64, head_size=32)


@pytest.mark.parametrize("segment_len", [16, 20, 47])
def test_segmented_gradients_equal_full_bptt(random_model, segment_len: int) -> None:
    model = random_model(CFG).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (2, 48), generator=g)
    y = torch.randint(0, 64, (2, 48), generator=g)
    full = lm_loss(model(x)[0], y, use_l2wrap=True)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    value = segmented_backward(model, x, y, segment_len, l2wrap=True)
    assert value == pytest.approx(float(full.detach()), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=2e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        whole = float(lm_loss(model(x)[0], y, use_l2wrap=False))
        assert segmented_loss(model, x, y, segment_len) == pytest.approx(whole, rel=1e-5)


def test_scale_applies_to_every_segment(random_model) -> None:
    model = random_model(CFG).train()
    x = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    segmented_backward(model, x, x, 16)
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    segmented_backward(model, x, x, 16, scale=0.25)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, once[name] * 0.25, msg=name)


def test_a_segmented_run_trains_and_resumes_exactly(tmp_path, pattern_data, make_config) -> None:
    from rwkvctl.lifecycle.train import train
    from rwkvctl.train.metrics import read_metrics

    def cfg(run, **train_overrides):
        return make_config(tmp_path / run, pattern_data, data={"ctx_len": 64},
                           train={"segment_len": 16, "max_steps": 8, "save_every": 4, **train_overrides})  # fmt: skip

    straight = train(cfg("straight"))
    assert straight.step == 8 and straight.final_loss == straight.final_loss
    train(cfg("stopped", stop_after_steps=4))
    resumed = train(cfg("stopped"), resume="latest")
    assert resumed.resumed_from == 4
    losses = lambda run: [r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r]  # noqa: E731
    assert losses("stopped") == losses("straight")


def test_segment_len_needs_the_single_strategy(tmp_path, pattern_data, make_config) -> None:
    with pytest.raises(ConfigError, match="single strategy"):
        make_config(tmp_path / "r", pattern_data, train={"segment_len": 16, "strategy": "deepspeed"}).validate()
    with pytest.raises(ConfigError, match="segment_len must be >= 0"):
        make_config(tmp_path / "r", pattern_data, train={"segment_len": -1}).validate()
