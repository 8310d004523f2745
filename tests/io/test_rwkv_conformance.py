"""Conformance oracle: the official `rwkv` pip package loads our checkpoints with the same logits."""

import pytest
import rwkv.model as rwkv_model  # a pinned dev dependency: a broken install must fail, not skip
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.lifecycle.models import load_model


@pytest.mark.parametrize("n_layer, n_embd", [(2, 128), (3, 256)])
def test_official_runtime_matches_our_logits(tmp_path, random_model, n_layer, n_embd):
    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=300)
    path = save_checkpoint(tmp_path / "m.pth", random_model(cfg).state_dict(), CheckpointMeta(cfg))
    official = rwkv_model.RWKV(model=str(path.with_suffix("")), strategy="cpu fp32")
    assert official.version == 5.2
    tokens = [0, 5, 299, 17, 17, 42, 1, 250, 3]
    theirs, their_state = official.forward(tokens, None, full_output=True)
    ours_model, _ = load_model(path)
    with torch.no_grad():
        ours, our_state = ours_model(torch.tensor([tokens]))
    assert (theirs - ours[0]).abs().max() <= 1e-3
    # their state list is [att_shift, wkv (H,N,N), ffn_shift] per layer; continue one token in both
    nxt_theirs, _ = official.forward([7], their_state)
    with torch.no_grad():
        nxt_ours, _ = ours_model.step(torch.tensor([7]), our_state)
    assert (nxt_theirs - nxt_ours[0]).abs().max() <= 1e-3
