"""Loss curves of one or more runs (metrics.jsonl) to a PNG: loss vs tokens, resumes marked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkvctl.errors import ConfigError, TrainingError
from rwkvctl.fs import atomic_path
from rwkvctl.train.metrics import read_metrics
from rwkvctl.train.run_dir import RunDir


@dataclass
class PlotResult:
    path: Path
    runs: list[str]
    points: int
    resumes: int


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs: list[Path], out: Path, *, x: str = "tokens", smooth: int = 1, title: str | None = None,
              labels: list[str] | None = None) -> PlotResult:
    """Draw the training (and validation, if logged) loss of every run; vertical dotted lines mark resumes."""
    if x not in ("tokens", "step"):
        raise ConfigError(f"x axis must be 'tokens' or 'step', got {x!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ConfigError(f"--smooth must be a whole number of points >= 1 (1: raw), got {smooth!r}")
    if labels and len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} labels for {len(runs)} runs")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out)
    fmt = (out.suffix.lstrip(".") or "png").lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ConfigError(f"{out}: cannot write .{fmt} images; use one of {', '.join('.' + k for k in supported)}")
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    try:
        points, resumes, names = _draw(ax, runs, x=x, smooth=smooth, labels=labels)
        ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
        ax.set_ylabel("loss")
        if x == "tokens":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
        ax.set_title(title or "training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return PlotResult(path=out, runs=names, points=points, resumes=resumes)


def _draw(ax: Any, runs: list[Path], *, x: str, smooth: int, labels: list[str] | None) -> tuple[int, int, list[str]]:
    """Every run's curves; returns (points, resumes marked, legend names)."""
    points = resumes = 0
    names = []
    for i, run in enumerate(runs):
        records = read_metrics(RunDir(run))
        train = [r for r in records if r.get("loss") is not None]
        val = [r for r in records if r.get("val_loss") is not None]
        if not train and not val:
            raise TrainingError(f"{run}: {RunDir(run).metrics.name} has no loss records yet")
        name = labels[i] if labels else Path(run).name
        names.append(name)
        color = f"C{i % 10}"
        xs = [r[x] for r in train]
        ax.plot(xs, _smooth([r["loss"] for r in train], smooth), color=color, lw=1.2, label=name)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], color=color, ls="--", marker="o", ms=3,
                    lw=1.0, label=f"{name} (val)")
        for r in records:
            if r.get("resumed"):
                ax.axvline(r[x], color=color, ls=":", lw=1.0, alpha=0.8)
                # x in data units, y as a fraction of the axes: stays at the top however the y range grows
                ax.annotate("resumed", (r[x], 0.98), xycoords=ax.get_xaxis_transform(), rotation=90, va="top",
                            ha="right", fontsize=7, color=color)
                resumes += 1
        points += len(train) + len(val)
    return points, resumes, names
