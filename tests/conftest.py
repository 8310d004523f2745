"""Shared fixtures: tiny model configs and randomised tiny models (CPU, fp32)."""

from __future__ import annotations

import os

import pytest
import torch

# The official `rwkv` package reads these at import time; keep it on its pure-PyTorch CPU path.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


@pytest.fixture
def tiny_config():
    from rwkvctl.config import ModelConfig

    return ModelConfig(n_layer=2, n_embd=128, vocab_size=256)


def make_random_model(cfg, seed: int = 0):
    """An initialised model with every tensor perturbed, so zero-initialised weights can't hide bugs."""
    from rwkvctl.model.init import init_weights
    from rwkvctl.model.rwkv5 import RWKV5

    model = init_weights(RWKV5(cfg), "rwkv-lm-2024", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture
def random_model():
    return make_random_model


def _rewrite_embedded_model(path, edit) -> None:
    """Apply `edit` to the model section of a safetensors checkpoint's rwkvctl metadata, in place."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    data = json.loads(metadata["rwkvctl"])
    edit(data["model"])
    metadata["rwkvctl"] = json.dumps(data)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def rewrite_embedded_model():
    return _rewrite_embedded_model



def pytest_collection_modifyitems(config, items):
    """Tests that launch DeepSpeed processes are slow too: `-m "not slow"` is the quick run (README)."""
    for item in items:
        if item.get_closest_marker("deepspeed") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
