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


def test_segment_len_works_with_every_strategy_and_is_not_negative(tmp_path, pattern_data, make_config) -> None:
    make_config(tmp_path / "r", pattern_data, train={"segment_len": 16, "strategy": "deepspeed"}).validate()
    with pytest.raises(ConfigError, match="segment_len must be >= 0"):
        make_config(tmp_path / "r", pattern_data, train={"segment_len": -1}).validate()


@pytest.mark.parametrize(("segment_len", "message"), [
    (24, r"segment_len=24 does not divide data.ctx_len=64; use a divisor such as 16"),
    (128, r"segment_len=128 is larger than data.ctx_len=64"),
])  # fmt: skip
def test_segment_len_must_divide_ctx_len(tmp_path, pattern_data, make_config, segment_len, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path / "r", pattern_data, data={"ctx_len": 64}, train={"segment_len": segment_len})
    make_config(tmp_path / "r", pattern_data, data={"ctx_len": 64}, train={"segment_len": 64})  # one segment: fine


def test_segment_len_errors_are_one_line_on_the_command_line(tmp_path, pattern_data, train_cli, run_cli) -> None:
    res = run_cli(train_cli(tmp_path / "r", pattern_data, "--segment-len", "12", "--max-steps", "1"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "segment_len=12 does not divide data.ctx_len=32" in lines[0], res.stderr


def test_the_window_can_stay_in_host_memory_and_states_are_released(random_model, monkeypatch) -> None:
    """Tokens are moved to the device one segment at a time (here: a window handed over as a non-contiguous view
    that only a per-segment copy reads), boundary states are dropped as soon as their segment has run, and the
    gradients stay those of the whole window."""
    import rwkvctl.train.segmented as seg

    model = random_model(CFG).train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 64, (2, 64), generator=g), torch.randint(0, 64, (2, 64), generator=g)
    lm_loss(model(x)[0], y, use_l2wrap=True).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    moved, trims = [], []
    real = seg._segment
    monkeypatch.setattr(seg, "_segment", lambda t, a, b, d: moved.append(b - a) or real(t, a, b, d))
    monkeypatch.setattr(seg, "release_free_host_memory", lambda: trims.append(1))
    wide_x = torch.stack([x, x], dim=2).reshape(2, 128)[:, ::2]  # (2, 64) view of a (2, 128) buffer
    segmented_backward(model, wide_x, y, 16, device="cpu")
    assert moved and max(moved) == 16  # never the whole window
    assert len(trims) == 1 + 4  # after the state pass and after every segment's backward
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=2e-6, rtol=1e-4, msg=name)


def test_release_free_host_memory_is_safe_to_call() -> None:
    from rwkvctl.train.host_memory import release_free_host_memory

    release_free_host_memory()
    release_free_host_memory()
