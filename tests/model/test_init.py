import math

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import ConfigError
from rwkvctl.model.init import init_weights
from rwkvctl.model.rwkv5 import RWKV5

CFG = ModelConfig(n_layer=3, n_embd=128, vocab_size=512)


def singular_values(w):
    return torch.linalg.svdvals(w.float())


@pytest.mark.parametrize("scheme", ["v5.2-2023", "rwkv-lm-2024"])
def test_shared_per_layer_values(scheme):
    m = init_weights(RWKV5(CFG), scheme, seed=0)
    A = CFG.dim_att
    last = m.blocks[2].att  # r01 = 1
    first = m.blocks[0].att  # r01 = 0
    # time_decay: -6 + 5*(n/(A-1))^(0.7+1.3*r01): -6 at channel 0, -1 at the last channel
    assert first.time_decay.flatten()[0].item() == pytest.approx(-6.0)
    assert first.time_decay.flatten()[-1].item() == pytest.approx(-1.0)
    n = 40
    assert last.time_decay.flatten()[n].item() == pytest.approx(-6 + 5 * (n / (A - 1)) ** 2.0, rel=1e-6)
    # time_faaaa zigzag: layer 0 is pure zigzag 0, +0.1, -0.1, ...
    assert first.time_faaaa.flatten()[:3].tolist() == pytest.approx([0.0, 0.1, -0.1], abs=1e-7)
    # ln_x weight ((1+l)/L)^0.7, mixes in [0, 1]
    assert m.blocks[1].att.ln_x.weight[0].item() == pytest.approx((2 / 3) ** 0.7)
    assert m.blocks[1].att.time_mix_k.min() >= 0 and m.blocks[1].att.time_mix_k.max() <= 1
    for b in m.blocks:
        for w in (b.att.output.weight, b.ffn.value.weight, b.ffn.receptance.weight):
            assert torch.count_nonzero(w) == 0


def test_2024_gains():
    m = init_weights(RWKV5(CFG), "rwkv-lm-2024", seed=0)
    assert m.emb.weight.abs().max() <= 1e-4
    sv = singular_values(m.blocks[0].att.key.weight)
    assert torch.allclose(sv, torch.full_like(sv, 0.1), atol=1e-5)
    sv = singular_values(m.blocks[0].att.gate.weight)
    assert torch.allclose(sv, torch.full_like(sv, 0.1), atol=1e-5)
    sv = singular_values(m.head.weight)
    assert torch.allclose(sv, torch.full_like(sv, 0.5 * math.sqrt(512 / 128)), atol=1e-4)


def test_2023_gains():
    m = init_weights(RWKV5(CFG), "v5.2-2023", emb_scale=3e-4, seed=0)
    assert 1e-4 < m.emb.weight.abs().max() <= 3e-4
    sv = singular_values(m.blocks[0].att.gate.weight)  # no special gate init in the v5.2 era
    assert torch.allclose(sv, torch.ones_like(sv), atol=1e-5)
    sv = singular_values(m.blocks[0].ffn.key.weight)  # sqrt(F/C)
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(CFG.dim_ffn / CFG.n_embd)), atol=1e-4)


def test_seeded_init_is_reproducible_and_single_layer_works():
    a = init_weights(RWKV5(CFG), seed=5).state_dict()
    b = init_weights(RWKV5(CFG), seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = init_weights(RWKV5(ModelConfig(n_layer=1, n_embd=64, vocab_size=64)), seed=0)
    assert torch.isfinite(one(torch.tensor([[1, 2]]))[0]).all()


def test_unknown_scheme():
    with pytest.raises(ConfigError):
        init_weights(RWKV5(CFG), "2025")
