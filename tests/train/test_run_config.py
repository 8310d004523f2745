"""Run configs: YAML round trip, overrides, one-line errors, and every shipped example loads."""

from pathlib import Path

import pytest

from rwkvctl.errors import ConfigError
from rwkvctl.train.config import RunConfig

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_defaults_are_the_published_7b_recipe():
    o = RunConfig().optim
    assert (o.beta1, o.beta2, o.adam_eps, o.lr_init, o.lr_final, o.warmup_steps) == (0.9, 0.99, 1e-8, 2e-4, 1.47e-4, 10)
    assert RunConfig().train.zero_stage == 2


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig().with_overrides({"model.preset": "0.1b", "train.accum": "4", "optim.lr_init": "1e-3"})
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = RunConfig.from_yaml(path)
    assert again == cfg
    assert again.model.n_layer == 12 and again.train.accum == 4 and again.optim.lr_init == 1e-3


def test_token_accounting_includes_accumulation_and_world_size():
    cfg = RunConfig().with_overrides({"train.micro_bsz": 3, "train.accum": 4, "data.ctx_len": 16})
    assert cfg.tokens_per_step(world_size=2) == 3 * 16 * 4 * 2


@pytest.mark.parametrize("bad, message", [
    ({"train.accum": 0}, "train.accum must be a positive integer"),
    ({"train.strategy": "ddp"}, "train.strategy='ddp'"),
    ({"train.zero_stage": 4}, "zero_stage must be 1, 2 or 3"),
    ({"optim.lr_init": "fast"}, "expected float"),
    ({"optim.nope": 1}, "unknown key"),
    ({"model.preset": "13b"}, "unknown model preset"),
])
def test_bad_values_are_one_line_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides(bad)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  accum: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        RunConfig.from_yaml(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level key"):
        RunConfig.from_yaml(unknown)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "precision", None, "train.precision=''; choose one of fp32, bf16"),  # the fuzz find (resume's file)
    ("train", "accum", 0, "train.accum must be a positive integer, got 0"),
    ("optim", "lr_init", -1.0, "need optim.lr_init > 0"),
])
def test_an_invalid_value_in_a_config_file_names_the_file(tmp_path, section, key, value, message):
    """A value that parses but fails validation (the file's run_config.yaml read by --resume) names the file, not
    just `run config:`, so the one error line says which file to fix."""
    import re

    import yaml

    doc = RunConfig().to_dict()
    doc[section][key] = value
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {message}')}") as e:
        RunConfig.from_yaml(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_load(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.data.path and cfg.run_dir


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"tiny-cpu.yaml", "rwkv5-0.1b.yaml", "rwkv5-7b-8gpu.yaml"} <= names
    big = RunConfig.from_yaml(Path(__file__).parents[2] / "examples" / "rwkv5-7b-8gpu.yaml")
    assert (big.model.n_layer, big.model.n_embd, big.model.vocab_size) == (32, 4096, 65536)
    assert (big.train.strategy, big.train.zero_stage, big.train.precision) == ("deepspeed", 2, "bf16")


@pytest.mark.parametrize("key", ["optim.lr_init", "optim.lr_final", "optim.grad_clip", "optim.adam_eps",
                                 "optim.weight_decay", "train.peak_tflops"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_options_are_rejected(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        RunConfig().with_overrides({key: value})


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "cuda:", "gpu", "cpu:0:1", ""])
def test_malformed_devices_are_rejected(device):
    with pytest.raises(ConfigError, match="train.device"):
        RunConfig().with_overrides({"train.device": device})


def test_wellformed_devices_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:3"):
        assert RunConfig().with_overrides({"train.device": device}).train.device == device


def test_model_section_names_its_architecture():
    cfg = RunConfig()
    assert cfg.to_dict()["model"]["architecture"] == "x052"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["model"]["architecture"]  # run configs written before the field
    assert RunConfig.from_dict(old).model == cfg.model
    assert cfg.with_overrides({"model.architecture": "x052", "model.n_layer": "3"}).model.n_layer == 3
    with pytest.raises(ConfigError, match=r"^overrides: model.architecture: unknown architecture 'x060'; known: x052$"):
        cfg.with_overrides({"model.architecture": "x060"})
    with pytest.raises(ConfigError, match="unknown architecture 'x060'"):
        RunConfig.from_dict({"model": {"preset": "tiny", "architecture": "x060"}})
