import pytest
import torch

from rwkvctl.config import ModelConfig, param_shapes
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.model.state import RecurrentState


def run_rnn(model, idx, state=None):
    outs = []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        outs.append(logits)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("gate", [True, False])
def test_sequence_forward_equals_rnn_steps(random_model, gate):
    cfg = ModelConfig(n_layer=2, n_embd=128, vocab_size=256, gate=gate)
    model = random_model(cfg)
    idx = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seq_logits, seq_state = model(idx)
        rnn_logits, rnn_state = run_rnn(model, idx)
    assert (seq_logits - rnn_logits).abs().max() <= 1e-5
    assert torch.allclose(seq_state.wkv, rnn_state.wkv, rtol=1e-5, atol=1e-4)
    assert torch.allclose(seq_state.att_shift, rnn_state.att_shift, atol=1e-5)


def test_sequence_forward_equals_rnn_with_incoming_state(random_model, tiny_config):
    model = random_model(tiny_config)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (3, 17), generator=gen)
    idx = torch.randint(0, 256, (3, 23), generator=gen)
    with torch.no_grad():
        _, state = model(prefix)
        seq_logits, _ = model(idx, state.clone())
        rnn_logits, _ = run_rnn(model, idx, state.clone())
        whole, _ = model(torch.cat([prefix, idx], dim=1))
    assert (seq_logits - rnn_logits).abs().max() <= 1e-5
    # processing in two segments with the carried state == processing the whole sequence at once
    assert (whole[:, 17:] - seq_logits).abs().max() <= 1e-5


def test_state_dict_names_shapes_and_order_are_rwkv_lm(tiny_config):
    sd = RWKV5(tiny_config).state_dict()
    expected = param_shapes(tiny_config)
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_gradient_checkpointing_gives_identical_gradients(random_model, tiny_config):
    idx = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(2))
    grads = []
    for ckpt in (False, True):
        model = random_model(tiny_config).train()
        model.gradient_checkpointing = ckpt
        logits, _ = model(idx)
        logits.float().logsumexp(-1).mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_gradient_flows_into_incoming_state(random_model, tiny_config):
    model = random_model(tiny_config)
    state = RecurrentState.zeros(tiny_config, 1)
    state.wkv.normal_()
    state.wkv.requires_grad_(True)
    logits, _ = model(torch.tensor([[1, 2, 3]]), state)
    logits.sum().backward()
    assert state.wkv.grad is not None and state.wkv.grad.abs().sum() > 0


def test_bad_input_shape_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="idx must be"):
        RWKV5(tiny_config)(torch.zeros(3, dtype=torch.long))


def test_last_only_logits_equal_the_last_position(random_model):
    from rwkvctl.config import ModelConfig

    model = random_model(ModelConfig(n_layer=2, n_embd=64, vocab_size=97, head_size=32))
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full, state_full = model(idx)
        last, state_last = model(idx, last_only=True)
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_last.wkv, state_full.wkv)


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("gate", [False, True])
def test_last_only_skips_work_but_not_state(random_model, T, gate):
    """With last_only the last block runs its output projection, gate and channel mix on the last 2 positions
    only; the logits at the last position and every part of the state are those of the full forward."""
    from rwkvctl.config import ModelConfig

    model = random_model(ModelConfig(n_layer=3, n_embd=64, vocab_size=97, head_size=32, gate=gate))
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    start = model(idx[:, :1])[1]  # a non-zero incoming state
    seen = []
    hook = model.blocks[-1].ffn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        full, state_full = model(idx, start)
        last, state_last = model(idx, start, last_only=True)
    hook.remove()
    assert seen == [T, min(T, 2)]
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    for name in ("att_shift", "ffn_shift", "wkv"):
        torch.testing.assert_close(getattr(state_last, name), getattr(state_full, name), msg=name)
