"""`plot`: runs labelled by their directory names, smoothed by default with the raw curve behind, readable token
units on the x axis."""

from pathlib import Path

from rwkvctl.lifecycle.plot import auto_window, human_count, plot_runs, run_labels
from rwkvctl.lifecycle.train import train


def test_labels_are_the_shortest_distinct_directory_names():
    assert run_labels([Path("runs/a"), Path("runs/b")]) == ["a", "b"]
    assert run_labels([Path("runs/7b/run"), Path("runs/7b-gate/run")]) == ["7b/run", "7b-gate/run"]
    assert run_labels([Path("x/run")]) == ["run"]


def test_token_ticks_read_in_units_and_smoothing_scales_with_the_run():
    assert [human_count(v) for v in (0, 950, 1_500, 2_000_000, 7.5e9, 1.2e12)] == ["0", "950", "1.5K", "2M", "7.5B",
                                                                                   "1.2T"]
    assert auto_window(10) == 1 and auto_window(1000) == 20


def test_plot_defaults(tmp_path, pattern_data, make_config):
    runs = []
    for name in ("lr-a", "lr-b"):
        train(make_config(tmp_path / name / "run", pattern_data, train={"max_steps": 3}))
        runs.append(tmp_path / name / "run")
    result = plot_runs(runs, tmp_path / "loss.png")
    assert result.runs == ["lr-a/run", "lr-b/run"]  # not "run" twice
    assert result.windows == [1, 1]  # 3 points: nothing to smooth
    result = plot_runs(runs, tmp_path / "loss2.png", smooth=2)
    assert result.windows == [2, 2] and (tmp_path / "loss2.png").stat().st_size > 1000
