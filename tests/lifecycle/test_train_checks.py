"""Train/plot fixes from review: fresh-start metrics, resume guards, exported tokenizer, resume markers, plots."""

import json
import subprocess

import matplotlib
import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.data.manifest import Manifest
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.checkpoint import load_checkpoint
from rwkvctl.lifecycle.plot import plot_runs
from rwkvctl.lifecycle.train import train
from rwkvctl.train.metrics import read_metrics
from rwkvctl.train.run_dir import RunDir

runner = CliRunner()


def test_fresh_start_does_not_append_to_an_old_metrics_log(tmp_path, pattern_data, make_config):
    run = tmp_path / "run"
    run.mkdir()
    old = [{"step": s, "tokens": s * 128, "loss": 9.0} for s in (1, 2, 3)]  # a run killed before its checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    train(make_config(run, pattern_data, train={"max_steps": 2}))
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2]
    assert len(RunDir(run).metrics_superseded.read_text().splitlines()) == 3  # moved aside, not lost


@pytest.mark.parametrize(("section", "change"), [("data", {"ctx_len": 16}), ("train", {"micro_bsz": 2}),
                                                  ("train", {"accum": 2}), ("train", {"seed": 5}),
                                                  ("data", {"sampling": "random"})])
def test_resume_refuses_data_order_changes(tmp_path, pattern_data, make_config, section, change):
    run = tmp_path / "run"
    train(make_config(run, pattern_data, train={"max_steps": 4, "stop_after_steps": 2}))
    sections = {"train": {"max_steps": 4}, section: change} if section != "train" else {
        "train": {"max_steps": 4, **change}}
    changed = make_config(run, pattern_data, **sections)
    key = f"{section}.{next(iter(change))}"
    with pytest.raises(CheckpointError, match=f"saved with {key}="):
        train(changed, resume="latest")


def test_resume_accepts_the_same_data_named_differently(tmp_path, pattern_data, make_config, monkeypatch):
    run = tmp_path / "run"
    train(make_config(run, pattern_data, train={"max_steps": 3, "stop_after_steps": 2}))
    monkeypatch.chdir(pattern_data.parent)
    result = train(make_config(run, pattern_data.name, train={"max_steps": 3}), resume="latest")
    assert result.step == 3 and result.resumed_from == 2


def test_runs_saved_before_architectures_were_recorded_resume(tmp_path, pattern_data, make_config):
    from rwkvctl.train.run_dir import RunDir

    run = tmp_path / "run"
    train(make_config(run, pattern_data, train={"max_steps": 3, "stop_after_steps": 2}))
    state_json = RunDir(run).latest().trainer_state
    state = json.loads(state_json.read_text())
    assert state["config"]["model"].pop("architecture") == "x052"
    state_json.write_text(json.dumps(state))
    result = train(make_config(run, pattern_data, train={"max_steps": 3}), resume="latest")
    assert result.step == 3 and result.resumed_from == 2


def test_exported_checkpoint_records_the_datasets_tokenizer(tmp_path, pattern_data, make_config):
    data = tmp_path / "data"
    data.mkdir()
    for ext in (".bin", ".idx"):
        (data / f"pattern{ext}").write_bytes(pattern_data.with_suffix(ext).read_bytes())
    tok = {"name": "sentencepiece", "vocab_size": 64, "eod_id": 0, "model": "tiny.model"}
    manifest = Manifest(tokenizer=tok, dtype="uint16")
    manifest.shards = [__import__("rwkvctl.data.manifest", fromlist=["Shard"]).Shard(
        prefix="pattern", split="train", input="x", docs=200, tokens=len(pattern_data.with_suffix(".bin")
                                                                         .read_bytes()) // 2)]
    manifest.save(data)
    result = train(make_config(tmp_path / "run", data, train={"max_steps": 1}))
    _, meta = load_checkpoint(result.export_path)
    assert meta.tokenizer == "spm:tiny.model"


def test_resume_is_marked_on_the_first_logged_record(tmp_path, pattern_data, make_config):
    run = tmp_path / "run"
    sections = {"train": {"max_steps": 8, "save_every": 4, "log_every": 2}}
    train(make_config(run, pattern_data, train={**sections["train"], "stop_after_steps": 4}))  # checkpoint at 4
    train(make_config(run, pattern_data, **sections), resume="latest")  # step 5 is not logged, step 6 is
    marked = [r["step"] for r in read_metrics(run) if r.get("resumed")]
    assert marked == [6]


def _metrics(run, losses, resumed_at=None):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "tokens": (i + 1) * 10, "loss": v, "resumed": i + 1 == resumed_at}) + "\n"
        for i, v in enumerate(losses)))
    return run


def test_plot_resume_labels_stay_at_the_top_and_figures_are_closed(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    a = _metrics(tmp_path / "a", [2.0, 1.8, 1.5, 1.2], resumed_at=3)
    b = _metrics(tmp_path / "b", [20.0, 15.0, 11.0, 9.0])
    seen = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (seen.append(fig), real_close(fig)))
    plot_runs([a, b], tmp_path / "p.png", x="step")
    (ax,) = seen[0].axes
    (label,) = [t for t in ax.texts if t.get_text() == "resumed"]
    y_display = label.get_transform().transform(label.xy)[1]
    y_axes = ax.transAxes.inverted().transform((0, y_display))[1]
    assert y_axes > 0.9  # at the top of the final y range, not of run a's range when it was drawn
    before = set(plt.get_fignums())
    with pytest.raises(Exception, match="no metrics log"):
        plot_runs([a, tmp_path / "missing"], tmp_path / "q.png")
    assert set(plt.get_fignums()) == before


@pytest.mark.parametrize("smooth", [0, -3])
def test_plot_rejects_a_smoothing_window_below_one(tmp_path, smooth):
    a = _metrics(tmp_path / "a", [2.0, 1.0])
    with pytest.raises(ConfigError, match="--smooth"):
        plot_runs([a], tmp_path / "p.png", smooth=smooth)
    result = runner.invoke(app, ["plot", str(a), "-o", str(tmp_path / "p.png"), "--smooth", str(smooth)])
    assert result.exit_code == 2 and "--smooth" in result.output and "Traceback" not in result.output


def test_plot_unsupported_format_is_a_one_line_error(tmp_path):
    a = _metrics(tmp_path / "a", [2.0, 1.0])
    result = runner.invoke(app, ["plot", str(a), "-o", str(tmp_path / "p.xyz")])
    assert result.exit_code == 2, result.output
    assert "cannot write .xyz" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.xyz").exists()
    assert matplotlib.get_backend().lower() == "agg"


def test_plot_and_train_print_paths_with_markup_literally(tmp_path, pattern_data, train_cli, train_env):
    run = tmp_path / "run[bold]"
    done = subprocess.run(train_cli(run, pattern_data, "--max-steps", "2", "--save-every", "2"), timeout=300,
                          env={**train_env, "COLUMNS": "400"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {run}/checkpoints/step-00000002" in done.stdout, done.stdout
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "x[bold]y.png")], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "x[bold]y.png" in result.output


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "cuda"])
def test_bad_device_is_a_one_line_error_on_its_own_line(tmp_path, pattern_data, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for how in (["--device", device], ["--set", f"train.device={device}"]):
        result = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r"), "--data", str(pattern_data),
                                     "--max-steps", "1", *how])
        assert result.exit_code == 2, result.output
        assert "train.device" in result.output and "Traceback" not in result.output
        assert result.output.lstrip().lower().startswith("error"), result.output  # nothing glued before it


def test_error_after_validation_starts_on_its_own_line(tmp_path):
    result = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path / "nothing"),
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "not a dataset" in result.output
    assert result.output.lstrip().lower().startswith("error"), result.output  # no live display glued before it
