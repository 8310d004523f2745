"""Chat state files record the architecture: old files without it are x052, foreign ones are refused."""

import json

import pytest
import torch

from rwkvctl.errors import CheckpointError
from rwkvctl.io.state_file import META_KEY, SavedState, describe_state_file, load_state, save_state


def _saved(cfg) -> SavedState:
    gen = torch.Generator().manual_seed(0)
    L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
    return SavedState(torch.randn(L, C, generator=gen), torch.randn(L, C, generator=gen),
                      torch.randn(L, H, N, N, generator=gen), torch.randn(cfg.vocab_size, generator=gen), {"k": 1})


def _rewrite_model(path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    edit(meta["model"])
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})


def test_state_file_roundtrip_records_the_architecture(tmp_path, tiny_config):
    saved = _saved(tiny_config)
    path = save_state(tmp_path / "s.safetensors", saved, tiny_config)
    assert describe_state_file(path)["model"]["architecture"] == "x052"
    back = load_state(path, tiny_config)
    assert torch.equal(back.wkv, saved.wkv) and torch.equal(back.logits, saved.logits) and back.info == {"k": 1}


def test_old_state_file_without_architecture_loads(tmp_path, tiny_config):
    path = save_state(tmp_path / "s.safetensors", _saved(tiny_config), tiny_config)
    _rewrite_model(path, lambda model: model.pop("architecture"))
    assert torch.equal(load_state(path, tiny_config).att_shift, _saved(tiny_config).att_shift)
    assert describe_state_file(path)["model"]["architecture"] == "x052"


def test_foreign_architecture_state_file_is_refused(tmp_path, tiny_config):
    path = save_state(tmp_path / "s.safetensors", _saved(tiny_config), tiny_config)
    _rewrite_model(path, lambda model: model.update(architecture="x060"))
    with pytest.raises(CheckpointError, match=r"s\.safetensors: saved for architecture 'x060'.*known: x052") as e:
        load_state(path, tiny_config)
    assert "\n" not in str(e.value)
