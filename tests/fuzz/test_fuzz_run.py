"""Fuzz a training run's own files through `train --resume`: a checkpoint's trainer_state.json and the run's
run_config.yaml. Beyond the pass rule (conftest.py), a resume must never set the real checkpoint aside because of
a damaged file. Also the regression test for the wrong-type run state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.train.run_dir import RunDir

TRAIN = ["--ctx-len", "8", "--micro-bsz", "2", "--device", "cpu", "--set", "model.n_layer=1", "--set",
         "model.n_embd=32", "--set", "model.head_size=32", "--set", "model.vocab_size=64"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run planned for 2 steps and stopped after 1: checkpoint step 1, run_config.yaml, metrics."""
    from typer.testing import CliRunner

    from rwkvctl.cli import app

    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    with BinIdxWriter(root / "data") as w:
        for _ in range(40):
            w.add_document(rng.integers(1, 64, size=30).astype(np.uint16))
    res = CliRunner().invoke(app, ["train", "--data", str(root / "data"), "--run-dir", str(root / "run"), *TRAIN,
                                   "--max-steps", "2", "--stop-after-steps", "1", "--save-every", "1"])
    assert res.exit_code == 0, res.stderr
    assert list(RunDir(root / "run").checkpoints()) == [1]
    return root / "run"


def _resume(fuzz, src: Path, work: Path, edit) -> tuple[Path, object]:
    run = work / "run"
    shutil.copytree(src, run)
    edit(run)
    return run, fuzz.run(["train", "--run-dir", run, "--resume"])


def _kept_checkpoint(run: Path) -> None:
    """Whatever happened, the real checkpoint is where it was (never renamed aside as superseded)."""
    names = [p.name for p in (run / "checkpoints").iterdir()]
    assert "step-00000001" in names and not [n for n in names if n.startswith("superseded")], names


def test_fuzz_trainer_state_json(fuzz, stopped_run, scratch) -> None:
    state = RunDir(stopped_run).checkpoint(1).trainer_state
    doc = json.loads(state.read_text())

    @fuzz.given(8, fuzz.json_mutation(doc))
    def run(mutation) -> None:
        def edit(r: Path) -> None:
            (r / state.relative_to(stopped_run)).write_text(fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, mutation)))

        r, out = _resume(fuzz, stopped_run, scratch(), edit)
        fuzz.check("trainer_state.json", out, ["trainer_state.json", "step-00000001"], str(mutation))
        _kept_checkpoint(r)

    run()


def test_fuzz_trainer_state_bytes(fuzz, stopped_run, scratch) -> None:
    state = RunDir(stopped_run).checkpoint(1).trainer_state
    raw = state.read_bytes()

    @fuzz.given(6, fuzz.byte_mutation(len(raw)))
    def run(edits) -> None:
        def edit(r: Path) -> None:
            (r / state.relative_to(stopped_run)).write_bytes(fuzz.apply_byte_mutation(raw, edits))

        r, out = _resume(fuzz, stopped_run, scratch(), edit)
        fuzz.check("trainer_state.json bytes", out, ["trainer_state.json", "step-00000001"], str(edits))
        _kept_checkpoint(r)

    run()


def test_fuzz_run_config_yaml(fuzz, stopped_run, scratch) -> None:
    """run_config.yaml (read by --resume without --config) retyped, nested, huge, or damaged byte by byte."""
    from hypothesis import strategies as st

    raw = (stopped_run / "run_config.yaml").read_bytes()
    doc = yaml.safe_load(raw)

    @fuzz.given(10, st.one_of(fuzz.json_mutation(doc).map(lambda m: ("tree", m)),
                              fuzz.byte_mutation(len(raw)).map(lambda e: ("bytes", e))))
    def run(mutation) -> None:
        kind, change = mutation

        def edit(r: Path) -> None:
            if kind == "tree":  # JSON is YAML: the hostile values (and deep nesting) serialize the same way
                (r / "run_config.yaml").write_text(fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, change)))
            else:
                (r / "run_config.yaml").write_bytes(fuzz.apply_byte_mutation(raw, change))

        r, out = _resume(fuzz, stopped_run, scratch(), edit)
        fuzz.check("run_config.yaml", out, ["run_config.yaml", str(r)], str(mutation))
        _kept_checkpoint(r)

    run()


@pytest.mark.parametrize("content", ["[]", '"step-1"', "7", "null", '{"step": "1"}', '{"step": 0}',
                                     '{"step": 1, "samples_seen": -4}', '{"step": 1, "config": []}'])
def test_a_run_state_of_the_wrong_type_is_refused_by_name(fuzz, stopped_run, tmp_path: Path, content: str) -> None:
    """A trainer_state.json that parses but is not a trainer state (or not this checkpoint's) must not make
    --resume start over at step 0 and set the real checkpoint aside: it is refused, naming the file."""
    state = RunDir(stopped_run).checkpoint(1).trainer_state

    def edit(r: Path) -> None:
        (r / state.relative_to(stopped_run)).write_text(content)

    r, out = _resume(fuzz, stopped_run, tmp_path, edit)
    assert out.exit_code == 2, out.stderr
    assert "trainer_state.json" in out.stderr and out.stderr.count("error:") == 1, out.stderr
    _kept_checkpoint(r)
    assert not (r / "checkpoints" / "step-00000002").exists()


@pytest.mark.parametrize("change, message", [
    ({"tokens": 17}, "data position says 2 samples but 17 tokens, not samples x ctx_len 8 = 16"),
    ({"samples_seen": 1 << 70}, "trainer state field 'samples_seen' must be integer in"),
    ({"tokens": -1}, "trainer state field 'tokens' must be integer in"),
    ({"format_version": 2}, "trainer state format version 2 was written by a newer rwkvctl"),
    ({"format_version": "1"}, "trainer state field 'format_version' must be an integer format version"),
])
def test_a_damaged_data_position_or_a_newer_state_is_refused_by_name(fuzz, stopped_run, tmp_path: Path,
                                                                     change: dict, message: str) -> None:
    """The run's real trainer state with one field changed: resuming from it would read other data than the run did
    (or a newer rwkvctl wrote it), so --resume refuses it in one line naming the file, keeping the checkpoint."""
    state = RunDir(stopped_run).checkpoint(1).trainer_state
    saved = json.loads(state.read_text())
    assert (saved["format_version"], saved["samples_seen"], saved["tokens"]) == (1, 2, 16)  # as the run wrote it

    def edit(r: Path) -> None:
        (r / state.relative_to(stopped_run)).write_text(json.dumps({**saved, **change}))

    r, out = _resume(fuzz, stopped_run, tmp_path, edit)
    assert out.exit_code == 2, out.stderr
    assert "trainer_state.json" in out.stderr and message in out.stderr and out.stderr.count("error:") == 1
    _kept_checkpoint(r)
