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


@pytest.fixture(scope="session")  # a pure function: module-scoped fixtures may build their models with it too
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


# A process of its own that holds a writer lock (rwkvctl.dir_lock) until killed: directory argv[1], part argv[2]
# unless empty, shared if argv[3] == "shared", stamped with the command argv[4]. Imports no torch: starts fast.
_LOCK_HOLDER = """
import sys, time
from rwkvctl.dir_lock import writer_lock
with writer_lock(sys.argv[1], sys.argv[4], part=sys.argv[2] or None, shared=sys.argv[3] == "shared"):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def lock_holder():
    """(directory, part="", shared=False, command="rwkvctl train") -> a live subprocess holding that lock (killed
    at the end of the test)."""
    import subprocess
    import sys

    procs: list[subprocess.Popen] = []

    def hold(directory, part: str = "", shared: bool = False, command: str = "rwkvctl train") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(directory), part,
                                 "shared" if shared else "", command],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == "held", f"the lock holder did not start: {line!r} {proc.stderr.read()}"
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()



def pytest_collection_modifyitems(config, items):
    """Tests that launch DeepSpeed processes are slow too: `-m "not slow"` is the quick run (README)."""
    for item in items:
        if item.get_closest_marker("deepspeed") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
