"""The architecture registry: lookups, the x052 entry's rules, and the model half (build/init) against the old
direct construction."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

from rwkvctl.arch import ARCHITECTURES, DEFAULT_ARCH, arch_for_version, arch_of, config_from_dict, get_arch
from rwkvctl.config import PRESETS, ModelConfig, infer_config, param_count, param_shapes, preset
from rwkvctl.errors import ConfigError
from rwkvctl.model.init import init_weights
from rwkvctl.model.registry import MODELS, build_model, initialize, model_spec
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.model.state import RecurrentState
from rwkvctl.quant.policy import QuantSpec
from rwkvctl.train.metrics import flops_per_token

CFG = ModelConfig(n_layer=2, n_embd=64, vocab_size=80, head_size=32)


def test_x052_is_the_only_and_default_architecture():
    assert list(ARCHITECTURES) == ["x052"] and DEFAULT_ARCH == "x052"
    spec = get_arch("x052")
    assert spec.config_class is ModelConfig and arch_of(CFG) is spec
    assert spec.presets is PRESETS and spec.param_shapes is param_shapes and spec.infer_config is infer_config


@pytest.mark.parametrize("bad", ["x060", "", None, 52])
def test_unknown_architecture_is_a_one_line_error_listing_the_known_ids(bad):
    with pytest.raises(ConfigError, match=r"unknown architecture .*; known: x052$") as e:
        get_arch(bad)
    assert "\n" not in str(e.value)


def test_config_from_dict_defaults_to_x052_and_refuses_unknown_ids():
    old = {k: v for k, v in CFG.to_dict().items() if k != "architecture"}  # a mapping written before the field
    assert config_from_dict(old, source="f.json") == CFG
    with pytest.raises(ConfigError, match=r"^f.json: unknown architecture 'x060'; known: x052$"):
        config_from_dict({**old, "architecture": "x060"}, source="f.json")
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict([1], source="f.json")


def test_model_config_records_its_architecture_and_holds_only_x052():
    assert CFG.architecture == "x052" and CFG.to_dict()["architecture"] == "x052"
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ConfigError, match="x052 fields, got architecture 'x060'"):
        ModelConfig(n_layer=1, n_embd=64, architecture="x060")


def test_spec_presets_and_counts_match_the_config_module():
    spec = get_arch("x052")
    for name in PRESETS:
        assert spec.preset(name, gate=False) == preset(name, gate=False)
        assert spec.param_count(spec.preset(name)) == param_count(preset(name))
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        spec.preset("huge")


def test_bare_state_dicts_map_to_an_architecture_by_rwkv_generation():
    assert arch_for_version("5.2") is arch_for_version("5.2-nogate") is get_arch("x052")
    assert arch_for_version("6") is None and arch_for_version("unknown") is None


def test_flops_per_token_is_the_x052_formula():
    L, C, A, N, V = CFG.n_layer, CFG.n_embd, CFG.dim_att, CFG.head_size, CFG.vocab_size
    assert flops_per_token(CFG) == 6.0 * (param_count(CFG) - V * C) + 12 * L * A * N


def test_state_layout_is_what_the_model_carries():
    spec = get_arch("x052")
    assert list(spec.state_shapes(CFG)) == [f.name for f in dataclasses.fields(RecurrentState)]
    state = RecurrentState.zeros(CFG, 3, dtype=torch.bfloat16)
    assert state.att_shift.shape == state.ffn_shift.shape == (2, 3, 64) and state.att_shift.dtype == torch.bfloat16
    assert state.wkv.shape == (2, 3, 2, 32, 32) and state.wkv.dtype == torch.float32  # state_fp32
    _, out = init_weights(RWKV5(CFG), seed=0)(torch.zeros(3, 4, dtype=torch.long))
    for name, shape in spec.state_shapes(CFG).items():
        assert getattr(out, name).shape == (shape[0], 3, *shape[1:])


def test_quantizable_tensors_come_from_the_registry():
    spec = QuantSpec(bits=4, embed_bits=8)
    assert spec.bits_for("blocks.3.att.gate.weight") == 4 and spec.bits_for("blocks.0.ffn.value.weight") == 4
    assert spec.bits_for("emb.weight") == spec.bits_for("head.weight") == 8
    assert spec.bits_for("blocks.0.att.time_decay") is None and spec.bits_for("blocks.0.ln1.weight") is None
    assert isinstance(get_arch("x052").quant.linear, re.Pattern)
    with pytest.raises(ConfigError, match="unknown architecture 'x060'"):
        QuantSpec(architecture="x060").bits_for("emb.weight")


def test_every_architecture_has_a_model():
    assert set(MODELS) == set(ARCHITECTURES)
    assert all(MODELS[k].arch is ARCHITECTURES[k] for k in MODELS)
    with pytest.raises(ConfigError, match="unknown architecture 'x060'; known: x052"):
        model_spec("x060")
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_model(SimpleNamespace(architecture="x060"))


@pytest.mark.parametrize("gate", [True, False])
def test_build_model_equals_the_direct_construction(gate):
    cfg = dataclasses.replace(CFG, gate=gate, dim_ffn=0)
    built = build_model(cfg)
    assert type(built) is RWKV5 and built.cfg == cfg
    old = RWKV5(cfg)
    assert [(k, v.shape) for k, v in built.state_dict().items()] == [(k, v.shape) for k, v in old.state_dict().items()]
    assert list(built.state_dict()) == list(param_shapes(cfg))
    for scheme in get_arch("x052").init_schemes:
        a = initialize(build_model(cfg), scheme, seed=3).state_dict()
        b = init_weights(RWKV5(cfg), scheme, seed=3).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ConfigError, match="unknown init scheme"):
        initialize(build_model(cfg), "2025")
