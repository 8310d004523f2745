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
    windows: list[int]  # the moving-average window used per run (1: raw)


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


def auto_window(points: int) -> int:
    """The default smoothing: about 1/50 of the logged points (odd steps of noise average out, trends stay)."""
    return max(1, points // 50)


def run_labels(runs: list[Path]) -> list[str]:
    """Legend names: each run's directory name, with as many parent directories as it takes to tell runs apart
    (runs/7b/run and runs/7b-gate/run -> 7b/run and 7b-gate/run)."""
    parts = [Path(r).resolve().parts for r in runs]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in runs]


def human_count(value: float, _pos: Any = None) -> str:
    """Axis ticks in readable units: 1.5M, 2B, 750K."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _pyplot(out: Path) -> tuple[Any, str]:
    """matplotlib.pyplot on the file-only Agg backend, and the image format `out` asks for (checked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = (out.suffix.lstrip(".") or "png").lower()
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise ConfigError(f"{out}: cannot write .{fmt} images; use one of {', '.join('.' + k for k in supported)}")
    return plt, fmt


def plot_runs(runs: list[Path], out: Path, *, x: str = "tokens", smooth: int | None = None, title: str | None = None,
              labels: list[str] | None = None) -> PlotResult:
    """Draw the training (and validation, if logged) loss of every run; vertical dotted lines mark resumes.
    `smooth`: moving-average window in logged points (None: about 1/50 of each run's points; 1: raw only); the raw
    curve stays faint behind a smoothed one."""
    if x not in ("tokens", "step"):
        raise ConfigError(f"x axis must be 'tokens' or 'step', got {x!r}")
    if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1):
        raise ConfigError(f"--smooth must be a whole number of points >= 1 (1: raw), got {smooth!r}")
    if labels and len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} labels for {len(runs)} runs")
    out = Path(out)
    plt, fmt = _pyplot(out)
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    try:
        points, resumes, names, windows = _draw(ax, runs, x=x, smooth=smooth, labels=labels)
        ax.set_xlabel("tokens" if x == "tokens" else "optimizer step")
        ax.set_ylabel("loss")
        if x == "tokens":
            from matplotlib.ticker import FuncFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(human_count))
        ax.set_title(title or "training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return PlotResult(path=out, runs=names, points=points, resumes=resumes, windows=windows)


def _draw(ax: Any, runs: list[Path], *, x: str, smooth: int | None,
          labels: list[str] | None) -> tuple[int, int, list[str], list[int]]:
    """Every run's curves; returns (points, resumes marked, legend names, smoothing windows)."""
    points = resumes = 0
    names, windows = [], []
    default_names = run_labels(runs)
    for i, run in enumerate(runs):
        records = read_metrics(RunDir(run))
        train = [r for r in records if r.get("loss") is not None]
        val = [r for r in records if r.get("val_loss") is not None]
        if not train and not val:
            raise TrainingError(f"{run}: {RunDir(run).metrics.name} has no loss records yet")
        name = labels[i] if labels else default_names[i]
        names.append(name)
        color = f"C{i % 10}"
        xs, losses = [r[x] for r in train], [r["loss"] for r in train]
        window = auto_window(len(losses)) if smooth is None else smooth
        windows.append(window)
        if window > 1:
            ax.plot(xs, losses, color=color, lw=0.8, alpha=0.25)  # the raw curve, faint behind the smoothed one
        label = f"{name} (smoothed over {window})" if window > 1 else name
        ax.plot(xs, _smooth(losses, window), color=color, lw=1.4, label=label)
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
    return points, resumes, names, windows


def plot_loss_by_position(curves: dict[str, list[tuple[int, int, float]]], out: Path, *, window: int,
                          title: str | None = None) -> Path:
    """Loss vs position in the window, one line per model: `curves` maps a label to (first, last, mean loss) per
    log2 bucket of positions (rwkvctl eval); each point sits at its bucket's geometric middle, on a log2 axis."""
    out = Path(out)
    plt, fmt = _pyplot(out)
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    try:
        for i, (label, buckets) in enumerate(curves.items()):
            xs = [(first * last) ** 0.5 for first, last, _ in buckets]
            ax.plot(xs, [loss for _, _, loss in buckets], color=f"C{i % 10}", marker="o", ms=3, lw=1.4, label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(human_count))
        ax.set_xlabel("position in the window (tokens of context)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title or f"loss by position, windows of {human_count(window)} tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return out
