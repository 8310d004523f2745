"""add-gate: the gate-less -> gated surgery keeps every old tensor and AdamW moment, and the new run resumes the
same trajectory (step, data position, schedule, metrics); checkpoint files convert and load in the `rwkv` package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rwkvctl.config import ModelConfig, param_shapes
from rwkvctl.dir_lock import writer_lock
from rwkvctl.errors import CheckpointError, DirectoryInUse
from rwkvctl.lifecycle.add_gate import add_gate_to_checkpoint, add_gate_to_run
from rwkvctl.lifecycle.train import train
from rwkvctl.surgery import add_gate
from rwkvctl.train.metrics import read_metrics
from rwkvctl.train.optim import param_groups
from rwkvctl.train.run_dir import RunDir
from rwkvctl.train.run_state import read_state


@pytest.fixture
def gateless_run(tmp_path: Path, pattern_data: Path, make_config) -> Path:
    cfg = make_config(tmp_path / "run", pattern_data, model={"gate": False}, train={"max_steps": 12, "save_every": 4})
    result = train(cfg)
    assert result.step == 12 and not cfg.model.gate
    return tmp_path / "run"


def _engine_state(run: Path, step: int) -> dict:
    return torch.load(RunDir(run).checkpoints()[step].engine_state, weights_only=True)


def _moments_by_name(run: Path, step: int) -> dict[str, dict]:
    from rwkvctl.model.rwkv5 import RWKV5
    from rwkvctl.train.config import RunConfig

    saved = read_state(RunDir(run).checkpoints()[step])
    cfg = RunConfig.from_dict(saved.config)
    with torch.device("meta"):
        model = RWKV5(cfg.model)
    names = [n for g in param_groups(model, cfg.optim) for n in g["names"]]
    opt = _engine_state(run, step)["optimizer"]
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    return {name: opt["state"][i] for name, i in zip(names, ids, strict=True) if i in opt["state"]}


def test_surgery_keeps_everything_old_and_resumes_the_same_trajectory(gateless_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "gated"
    result = add_gate_to_run(gateless_run, out, step=8)  # a slightly earlier checkpoint, as the 7B run did
    assert result.step == 8 and result.config.model.gate and result.config.model.dim_ffn == 224  # 3.5 x 64, kept
    before, after = _engine_state(gateless_run, 8)["model"], _engine_state(out, 8)["model"]
    for name, t in before.items():  # every old tensor, bit for bit
        assert torch.equal(after[name], t), name
    new = set(after) - set(before)
    assert new == {f"blocks.{i}.att.{n}" for i in range(2) for n in ("gate.weight", "time_mix_g")}
    assert torch.equal(after["blocks.1.att.time_mix_g"], before["blocks.1.att.time_mix_r"])
    old_m, new_m = _moments_by_name(gateless_run, 8), _moments_by_name(out, 8)
    assert set(new_m) == set(old_m)  # the gate starts without moments
    for name, st in old_m.items():
        for key, value in st.items():
            assert torch.equal(new_m[name][key], value), (name, key)
    old_state = read_state(RunDir(gateless_run).checkpoints()[8])
    new_state = read_state(RunDir(out).checkpoints()[8])
    assert (new_state.step, new_state.position) == (8, old_state.position)
    assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(gateless_run) if r["step"] <= 8]
    exported = RunDir(out).checkpoints()[8].export
    from rwkvctl.io.checkpoint import load_checkpoint

    weights, meta = load_checkpoint(exported)
    assert meta.model.gate and "blocks.0.att.gate.weight" in weights

    resumed = train(result.config, resume="latest")
    assert resumed.resumed_from == 8 and resumed.step == 12 and resumed.final_loss == resumed.final_loss
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r][-4:] == [9, 10, 11, 12]
    # the schedule continued: step 9's lr equals the original run's step-9 lr (no new warm-up)
    lr = {r["step"]: r["lr"] for r in read_metrics(gateless_run) if "lr" in r}
    assert next(r["lr"] for r in records if r.get("step") == 9 and "lr" in r) == lr[9]
    # the original run was only read
    assert max(RunDir(gateless_run).checkpoints()) == 12


def test_add_gate_refusals(gateless_run: Path, tmp_path: Path, make_config, pattern_data: Path) -> None:
    with pytest.raises(CheckpointError, match="choose a new directory"):
        add_gate_to_run(gateless_run, gateless_run)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        add_gate_to_run(gateless_run, tmp_path / "busy")
    with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
        add_gate_to_run(gateless_run, tmp_path / "g5", step=5)
    add_gate_to_run(gateless_run, tmp_path / "g1")
    with pytest.raises(CheckpointError, match="already has the output gate"):
        add_gate_to_run(tmp_path / "g1", tmp_path / "g2")  # (a branch can itself be branched: it got this far)
    with pytest.raises(CheckpointError, match="unknown gate init"):
        add_gate_to_run(gateless_run, tmp_path / "g4", init="zeros")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        add_gate_to_run(tmp_path / "busy", tmp_path / "g3")
    refused = pytest.raises(DirectoryInUse, match="g6 is being written by rwkvctl add-gate")
    with writer_lock(tmp_path / "g6", "rwkvctl add-gate"), refused:  # another writer of the new run dir
        add_gate_to_run(gateless_run, tmp_path / "g6")
    assert add_gate_to_run(gateless_run, tmp_path / "g6").step == 12  # its lock file alone is not "content"
    with pytest.raises(CheckpointError, match="not empty"):
        add_gate_to_run(gateless_run, tmp_path / "g6")


def test_weights_only_surgery_loads_in_the_official_package(tmp_path: Path, random_model) -> None:
    import rwkv.model as rwkv_model

    from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
    from rwkvctl.lifecycle.models import load_model

    cfg = ModelConfig(n_layer=2, n_embd=64, vocab_size=128, head_size=32, gate=False)
    src = save_checkpoint(tmp_path / "plain.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))
    res = add_gate_to_checkpoint(src, tmp_path / "gated.pth", init="v5.2-2023", seed=1)
    assert res.added_params == 2 * (64 * 64 + 64)
    model, meta = load_model(res.out)
    assert meta.model.gate and meta.model.dim_ffn == 224 and meta.extra["surgery"]["add_gate"] == "v5.2-2023"
    official = rwkv_model.RWKV(model=str(res.out.with_suffix("")), strategy="cpu fp32")
    assert official.version == 5.2
    tokens = [1, 5, 9, 77, 3]
    theirs, _ = official.forward(tokens, None, full_output=True)
    with torch.no_grad():
        ours, _ = model(torch.tensor([tokens]))
    assert (theirs - ours[0]).abs().max() <= 1e-3


def test_gate_init_scale_and_order(random_model) -> None:
    cfg = ModelConfig(n_layer=2, n_embd=64, vocab_size=128, head_size=32, gate=False)
    sd = random_model(cfg).state_dict()
    quiet, new_cfg = add_gate(sd, cfg, init="rwkv-lm-2024", seed=0)
    loud, _ = add_gate(sd, cfg, init="v5.2-2023", seed=0)
    assert list(quiet) == list(param_shapes(new_cfg))  # RWKV-LM's order
    g = quiet["blocks.0.att.gate.weight"]
    torch.testing.assert_close(g @ g.T, 0.01 * torch.eye(64), atol=1e-5, rtol=0)  # orthogonal, gain 0.1
    torch.testing.assert_close(loud["blocks.0.att.gate.weight"], 10 * g)
    assert not torch.equal(quiet["blocks.0.att.gate.weight"], quiet["blocks.1.att.gate.weight"])
    old_spelling, _ = add_gate(sd, cfg, init="rwkv-lm", seed=0)  # deprecated, still accepted for one release
    torch.testing.assert_close(old_spelling, quiet, atol=0, rtol=0)


def test_cli_add_gate_and_resume(gateless_run: Path, tmp_path: Path) -> None:
    from rwkvctl.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-gated"
    res = runner.invoke(app, ["add-gate", str(gateless_run), "-o", str(out), "--step", "8", "--resume"])
    assert res.exit_code == 0, res.output
    assert "added the output gate" in res.output and max(RunDir(out).checkpoints()) == 12
    res = runner.invoke(app, ["add-gate", str(out)])
    assert res.exit_code != 0 and "already has the output gate" in res.output and "Traceback" not in res.output
    ckpt = RunDir(gateless_run).checkpoints()[12].export
    res = runner.invoke(app, ["add-gate", str(ckpt), "-o", str(tmp_path / "g.safetensors")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["add-gate", str(ckpt), "--resume"])
    assert res.exit_code == 2 and "run dir" in res.output
    res = runner.invoke(app, ["add-gate", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such run dir" in res.output
    res = runner.invoke(app, ["add-gate", str(gateless_run), "-o", str(tmp_path / "x"), "--max-steps", "20"])
    assert res.exit_code == 2 and "--resume" in res.output and not (tmp_path / "x").exists()


def test_a_quantized_checkpoint_becomes_a_plain_gated_one(tmp_path: Path, random_model) -> None:
    from rwkvctl.io.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    cfg = ModelConfig(n_layer=1, n_embd=64, vocab_size=128, head_size=32, gate=False)
    src = save_checkpoint(tmp_path / "m.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))
    q = quantize_checkpoint(src, tmp_path / "q.safetensors", QuantSpec()).path
    gated = add_gate_to_checkpoint(q, tmp_path / "g.safetensors").out
    _, meta = load_checkpoint(gated)
    assert meta.model.gate and "quantization" not in meta.extra  # full precision now, and says so
    quantize_checkpoint(gated, tmp_path / "gq.safetensors", QuantSpec())  # so it can be quantized again


@pytest.mark.parametrize("given, notice", [("rwkv-lm", True), ("rwkv-lm-2024", False)])
def test_cli_gate_init_spelling(tmp_path: Path, random_model, given: str, notice: bool) -> None:
    """rwkv-lm-2024 is the one spelling (as in `init`/`train`); the old `rwkv-lm` works for one release, with a
    one-line notice, and the file records the current spelling either way."""
    from rwkvctl.cli import app
    from rwkvctl.io.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint

    cfg = ModelConfig(n_layer=1, n_embd=64, vocab_size=128, head_size=32, gate=False)
    src = save_checkpoint(tmp_path / "m.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))
    out = tmp_path / "g.pth"
    res = CliRunner().invoke(app, ["add-gate", str(src), "-o", str(out), "--init", given])
    assert res.exit_code == 0, res.output
    assert ("--init rwkv-lm is deprecated" in res.output) is notice
    assert "init rwkv-lm-2024" in res.output
    assert load_checkpoint(out)[1].extra["surgery"]["add_gate"] == "rwkv-lm-2024"
    with pytest.raises(CheckpointError, match="unknown gate init"):
        add_gate_to_run(tmp_path, tmp_path / "x", init="rwkv")
