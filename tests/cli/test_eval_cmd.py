"""`rwkvctl eval`: the table of several models, --json (only JSON on stdout), --plot, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.config import ModelConfig
from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint

CFG = ModelConfig(n_layer=2, n_embd=32, vocab_size=65536, head_size=16)


@pytest.fixture
def setup(random_model, tmp_path: Path) -> tuple[Path, Path, Path]:
    a = save_checkpoint(tmp_path / "base.pth", random_model(CFG, seed=0).state_dict(), CheckpointMeta(model=CFG))
    b = save_checkpoint(tmp_path / "tuned.pth", random_model(CFG, seed=1).state_dict(), CheckpointMeta(model=CFG))
    with BinIdxWriter(tmp_path / "val") as w:
        w.add_document(np.random.default_rng(0).integers(1, 65536, 200).astype(np.uint16))
    return a, b, tmp_path / "val"


def test_two_models_in_one_table_and_a_plot(setup, tmp_path: Path) -> None:
    a, b, data = setup
    png = tmp_path / "by_pos.png"
    res = CliRunner().invoke(app, ["eval", str(a), str(b), "--data", str(data), "--window", "64", "--segment", "16",
                                   "--windows", "2", "--plot", str(png)])  # fmt: skip
    assert res.exit_code == 0, res.output
    scores = res.output.split("scores", 1)[1]
    assert "base.pth" in scores and "tuned.pth" in scores and "perplexity" in scores and "bits/byte" in scores
    assert "33-64" in res.output  # the last log2 bucket of a 64-token window
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_json_is_all_that_is_printed(setup) -> None:
    a, b, data = setup
    res = CliRunner().invoke(app, ["eval", str(a), str(b), "-d", str(data), "--window", "32", "--segment", "8",
                                   "--label", "A", "--label", "B", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["window"] == 32 and d["windows"] == 6 and d["tokens"] == 192 and d["kind"] == "binidx"
    assert [m["label"] for m in d["models"]] == ["A", "B"]
    assert [(p["first"], p["last"]) for p in d["models"][0]["by_position"]] == [(1, 1), (2, 2), (3, 4), (5, 8),
                                                                                 (9, 16), (17, 32)]  # fmt: skip
    assert all(m["perplexity"] > 1 and m["bits_per_byte"] > 0 for m in d["models"])


def test_errors_are_one_line(setup, tmp_path: Path) -> None:
    a, _, data = setup
    small = ModelConfig(n_layer=2, n_embd=32, vocab_size=64, head_size=16)
    other = save_checkpoint(tmp_path / "small.pth", {k: v for k, v in _weights(small).items()},
                            CheckpointMeta(model=small))  # fmt: skip
    for argv, message in (
        (["eval", str(a), "--data", str(data), "--window", "500"], "fewer than --window + 1 = 501"),
        (["eval", str(a), "--data", str(tmp_path / "missing.txt")], "missing.txt: no such file or dataset"),
        (["eval", str(a), str(other), "--data", str(data), "--window", "8"], "vocab_size 64"),
        (["eval", str(a), "--data", str(data), "--label", "x", "--label", "y"], "2 labels for 1 models"),
        (["eval", str(a)], "--data"),
    ):
        res = CliRunner().invoke(app, argv)
        out = res.output.strip()
        assert res.exit_code == 2 and message in out and len(out.splitlines()) == 1, (argv, res.output)


def _weights(cfg: ModelConfig) -> dict:
    from rwkvctl.model.registry import build_model, initialize

    return initialize(build_model(cfg), "rwkv-lm-2024", seed=0).state_dict()
