import json
import pickle
import zipfile

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError
from rwkvctl.io.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint, sidecar_path


@pytest.fixture
def saved(tmp_path, tiny_config, random_model):
    model = random_model(tiny_config)
    path = save_checkpoint(tmp_path / "m.pth", model.state_dict(), CheckpointMeta(model=tiny_config, step=7, tokens=99))
    return path, model.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip(tmp_path, tiny_config, random_model, suffix, dtype):
    sd = random_model(tiny_config).state_dict()
    meta = CheckpointMeta(model=tiny_config, step=3, tokens=1000, init="v5.2-2023", extra={"note": "x"})
    path = save_checkpoint(tmp_path / f"m{suffix}", sd, meta, dtype=dtype)
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == meta
    assert list(loaded) == list(sd)
    for k in sd:
        assert loaded[k].dtype == dtype
        assert torch.equal(loaded[k], sd[k].to(dtype))


def test_pth_is_a_plain_state_dict_rwkv_lm_can_read(saved):
    path, sd = saved
    obj = torch.load(path, weights_only=True)
    assert type(obj) is dict and list(obj) == list(sd)


def test_bare_official_file_without_sidecar_infers_config(saved):
    path, _ = saved
    sidecar_path(path).unlink()
    _, meta = load_checkpoint(path)
    assert meta.model == ModelConfig(n_layer=2, n_embd=128, vocab_size=256)
    assert meta.step is None


def test_wrapper_prefixes_are_stripped(tmp_path, saved):
    path, sd = saved
    wrapped = {f"_forward_module.{k}": v for k, v in sd.items()}
    torch.save(wrapped, tmp_path / "w.pth")
    loaded, _ = load_checkpoint(tmp_path / "w.pth")
    assert list(loaded) == list(sd)


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"emb.weight": torch.zeros(2, 2), "evil": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused") as exc:
        load_checkpoint(tmp_path / "evil.pth")
    assert "evil.pth" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "PWNED").exists()


def test_legacy_raw_pickle_is_refused(tmp_path):
    (tmp_path / "old.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a torch zip"):
        load_checkpoint(tmp_path / "old.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files_give_one_line_errors(tmp_path, tiny_config, random_model, suffix):
    path = save_checkpoint(tmp_path / f"m{suffix}", random_model(tiny_config).state_dict(), CheckpointMeta(tiny_config))
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(cut)
    assert str(cut) in str(exc.value) and "\n" not in str(exc.value)


def test_shape_mismatch_names_the_tensor(tmp_path, saved):
    path, sd = saved
    sd = dict(sd)
    sd["blocks.1.att.time_decay"] = torch.zeros(3, 64)
    torch.save(sd, tmp_path / "bad.pth")
    (tmp_path / "bad.pth.json").write_text(sidecar_path(path).read_text())
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.time_decay is \(3, 64\), expected \(2, 64\)"):
        load_checkpoint(tmp_path / "bad.pth")


def test_missing_and_unexpected_keys_are_listed(tmp_path, saved):
    path, sd = saved
    sd = dict(sd)
    del sd["head.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    (tmp_path / "bad.pth.json").write_text(sidecar_path(path).read_text())
    with pytest.raises(CheckpointError, match=r"missing keys \[head.weight\].*unexpected keys \[extra.weight\]"):
        load_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"transformer.wte.weight": torch.zeros(4, 4)}, "not an RWKV checkpoint"),
        (
            {
                "emb.weight": torch.zeros(4, 4),
                "blocks.0.att.time_maa_x": torch.zeros(1, 1, 4),
                "blocks.0.ln1.weight": torch.zeros(4),
            },
            "RWKV-6",
        ),
        ({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_first": torch.zeros(4)}, "RWKV-4"),
    ],
)
def test_foreign_checkpoints(tmp_path, sd, message):
    torch.save(sd, tmp_path / "f.pth")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "f.pth")


def test_missing_file_dir_and_bad_suffix(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="suffix"):
        save_checkpoint(tmp_path / "m.bin", {}, CheckpointMeta(tiny_config))


def test_corrupt_sidecar(saved):
    path, _ = saved
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt sidecar"):
        load_checkpoint(path)
    sidecar_path(path).write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not an rwkvctl sidecar"):
        load_checkpoint(path)


def test_failed_save_leaves_previous_file_intact(tmp_path, saved, tiny_config):
    path, sd = saved
    before = path.read_bytes()
    bad = dict(sd)
    bad["emb.weight"] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError):
        save_checkpoint(path, bad, CheckpointMeta(tiny_config))
    assert path.read_bytes() == before
    assert zipfile.is_zipfile(path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "field, value", [("step", "12"), ("tokens", 1.5), ("tokenizer", 7), ("extra", [1]), ("init", True)]
)
def test_sidecar_field_types_are_checked(saved, field, value):
    path, _ = saved
    data = json.loads(sidecar_path(path).read_text())
    data[field] = value
    sidecar_path(path).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"sidecar field '{field}'"):
        load_checkpoint(path)


def test_sidecar_gate_must_be_boolean(saved):
    path, _ = saved
    data = json.loads(sidecar_path(path).read_text())
    data["model"]["gate"] = "no"
    sidecar_path(path).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="gate must be true or false"):
        load_checkpoint(path)


def test_stale_sidecar_is_named(tmp_path, saved, tiny_config, random_model):
    path, _ = saved
    other = ModelConfig(n_layer=1, n_embd=64, vocab_size=256)
    save_checkpoint(tmp_path / "other.pth", random_model(other).state_dict(), CheckpointMeta(other))
    sidecar_path(path).write_text(sidecar_path(tmp_path / "other.pth").read_text())
    with pytest.raises(CheckpointError, match="stale sidecar"):
        load_checkpoint(path)


def test_corrupt_embedded_safetensors_metadata(tmp_path, tiny_config, random_model):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in random_model(tiny_config).state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"rwkvctl": "{broken"})
    with pytest.raises(CheckpointError, match="corrupt rwkvctl metadata"):
        load_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_files_record_the_architecture(tmp_path, tiny_config, random_model, suffix):
    path = save_checkpoint(tmp_path / f"m{suffix}", random_model(tiny_config).state_dict(), CheckpointMeta(tiny_config))
    data = json.loads(sidecar_path(path).read_text())
    assert data["model"]["architecture"] == "x052" and data["architecture"] == "rwkv5.2-x052"
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["rwkvctl"])["model"]["architecture"] == "x052"
    else:  # the weights file itself stays a plain RWKV-LM state dict: the id lives in the sidecar only
        assert all(isinstance(v, torch.Tensor) for v in torch.load(path, weights_only=True).values())


def _forget_architecture(model: dict) -> None:
    del model["architecture"]


def _foreign_architecture(model: dict) -> None:
    model["architecture"] = "x060"


def test_old_files_without_an_architecture_load_as_x052(tmp_path, saved, tiny_config, random_model,
                                                        rewrite_embedded_model):
    path, _ = saved  # .pth + sidecar written before the field existed
    data = json.loads(sidecar_path(path).read_text())
    _forget_architecture(data["model"])
    sidecar_path(path).write_text(json.dumps(data))
    assert load_checkpoint(path)[1].model == tiny_config
    sd = random_model(tiny_config).state_dict()
    st = save_checkpoint(tmp_path / "m.safetensors", sd, CheckpointMeta(tiny_config))
    sidecar_path(st).unlink()  # the embedded metadata is all there is
    rewrite_embedded_model(st, _forget_architecture)
    assert load_checkpoint(st)[1].model.architecture == "x052"


def test_foreign_architecture_in_a_sidecar_is_refused(saved):
    path, _ = saved
    data = json.loads(sidecar_path(path).read_text())
    _foreign_architecture(data["model"])
    sidecar_path(path).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"m\.pth\.json: written for architecture 'x060'.*known: x052") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_foreign_architecture_in_safetensors_metadata_is_refused(tmp_path, tiny_config, random_model,
                                                                 rewrite_embedded_model):
    sd = random_model(tiny_config).state_dict()
    st = save_checkpoint(tmp_path / "m.safetensors", sd, CheckpointMeta(tiny_config))
    sidecar_path(st).unlink()
    rewrite_embedded_model(st, _foreign_architecture)
    with pytest.raises(CheckpointError, match=r"m\.safetensors \(metadata\): written for architecture 'x060'"):
        load_checkpoint(st)
