import pytest

from rwkvctl.config import PRESETS, ModelConfig, infer_config, param_count, param_shapes, preset
from rwkvctl.errors import ConfigError


def closed_form(cfg: ModelConfig) -> int:
    """Closed form with A = C: per layer 6C^2 (r, k, v, o, gate, ffn.receptance) + 2FC (ffn.key, ffn.value) + 14C
    (6 mixes, decay + bonus, ln1/ln2/ln_x weights and biases); emb + head 2VC; ln0 + ln_out 4C."""
    C, F, L, V = cfg.n_embd, cfg.dim_ffn, cfg.n_layer, cfg.vocab_size
    return L * (6 * C * C + 2 * F * C + 14 * C) + 2 * V * C + 4 * C


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0.1b", 192_807_936),
        ("0.4b", 461_721_600),
        ("1.5b", 1_577_754_624),
        ("3b", 3_062_999_040),
        ("7b", 7_518_044_160),
    ],
)
def test_preset_param_counts_match_published_exact_counts(name, expected):
    cfg = preset(name)
    assert param_count(cfg) == expected
    assert closed_form(cfg) == expected


def test_7b_shape_and_tensor_count():
    cfg = preset("7b")
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.dim_ffn, cfg.n_head) == (32, 4096, 65536, 14336, 64)
    assert len(param_shapes(cfg)) == 710


@pytest.mark.parametrize(
    "n_embd, gate, ffn", [(768, True, 2688), (1024, True, 3584), (4096, True, 14336), (768, False, 2688),
                          (4096, False, 14336)]
)
def test_dim_ffn_rounding_as_rwkv_lm(n_embd, gate, ffn):
    assert ModelConfig(n_layer=1, n_embd=n_embd, gate=gate).dim_ffn == ffn


def test_gateless_layout_has_no_gate_tensors_and_the_same_ffn():
    gated, gateless = preset("0.1b"), preset("0.1b", gate=False)
    names = param_shapes(gateless)
    assert not any("gate" in k or "time_mix_g" in k for k in names)
    # one FFN rule (3.5x) for both layouts, as in the 7B run: the gate adds att.gate and time_mix_g per layer only
    assert gated.dim_ffn == gateless.dim_ffn
    assert param_count(gated) - param_count(gateless) == gated.n_layer * (gated.dim_att * gated.n_embd + gated.n_embd)


def test_one_gateless_ffn_rule_for_init_train_and_add_gate(tmp_path):
    """`init --no-gate`, training with model.gate=false (a preset, then the override) and a config built gate-less
    all give the 7B's 14336 = 3.5 x 4096."""
    from typer.testing import CliRunner

    from rwkvctl.cli import app
    from rwkvctl.train.config import RunConfig

    assert preset("7b", gate=False).dim_ffn == preset("7b").dim_ffn == 14336
    run = RunConfig().with_overrides({"model.preset": "7b", "model.gate": "false"})
    assert run.model.dim_ffn == 14336 and run.model.gate is False
    assert ModelConfig(n_layer=1, n_embd=4096, gate=False).dim_ffn == 14336
    res = CliRunner().invoke(app, ["init", "--preset", "7b", "--no-gate", "--meta"])
    assert res.exit_code == 0, res.output
    assert f"{param_count(preset('7b', gate=False)):,}" in res.output


@pytest.mark.parametrize(
    "kwargs", [{"n_embd": 100}, {"n_layer": 0}, {"n_embd": 128, "head_size": 48}, {"n_embd": 128, "vocab_size": -1}]
)
def test_invalid_configs_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        ModelConfig(**{"n_layer": 2, "n_embd": 128, **kwargs})


def test_unknown_preset_and_unknown_keys():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("13b")
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({"n_layer": 2, "n_embd": 128, "n_head": 2})


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("gate", [True, False])
def test_infer_config_roundtrips_every_preset(name, gate):
    cfg = preset(name, gate=gate)
    assert infer_config(param_shapes(cfg)) == cfg
