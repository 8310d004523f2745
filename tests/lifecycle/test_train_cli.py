"""`rwkvctl train` / `rwkvctl plot` command surface: help, one-line errors, plotting runs."""

from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.lifecycle.train import train

runner = CliRunner()


def test_train_help_lists_the_main_options():
    out = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output  # not the caller's width
    for option in ("--config", "--resume", "--resume-step", "--strategy", "--zero-stage", "--accum", "--wandb",
                   "--grad-cp", "--nan-policy", "--val-every", "--set"):
        assert option in out


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr_init: fast\n")
    for args, message in (
        (["train", "--config", str(bad)], "expected float"),
        (["train", "--run-dir", str(tmp_path / "r")], "no training data"),
        (["train", "--data", str(tmp_path / "nothing"), "--run-dir", str(tmp_path / "r")], "not a dataset"),
        (["train", "--data", "x", "--set", "optim.lr_init"], "expected SECTION.KEY=VALUE"),
        (["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")], "no metrics log"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_plot_command_overlays_runs(tmp_path, pattern_data, make_config):
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        train(make_config(tmp_path / name, pattern_data, optim={"lr_init": lr}, train={"max_steps": 3}))
    result = runner.invoke(app, ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "l.png"),
                                 "--x", "step", "--title", "demo"])
    assert result.exit_code == 0, result.output
    assert "2 run(s), 6 points" in " ".join(result.output.split())
    assert (tmp_path / "l.png").stat().st_size > 1000
