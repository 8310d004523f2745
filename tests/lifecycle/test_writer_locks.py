"""One writer per output: every command that writes an output directory (or file) holds its lock for the whole
command, so a second `train` on a run dir or `prepare` into an --out is refused (exit 2, the holder named) instead of
mixing its files with the first one's; and a rerun of prepare with other options is refused by flag."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app
from rwkvctl.config import ModelConfig
from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.data.merge import merge_binidx
from rwkvctl.dir_lock import holder, lock_file, writer_lock
from rwkvctl.errors import DataError, DirectoryInUse
from rwkvctl.io.checkpoint import CheckpointMeta, save_checkpoint
from rwkvctl.lifecycle.add_gate import add_gate_to_checkpoint
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare
from rwkvctl.lifecycle.quantize import quantize_checkpoint
from rwkvctl.lifecycle.train import _hold_run_dir, train
from rwkvctl.quant.policy import QuantSpec

REFUSED = "is being written by rwkvctl {cmd} (pid {pid} on host "


def _wait_until_held(directory: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while f"pid {proc.pid} " not in holder(lock_file(directory)):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            raise AssertionError(f"the first command never held {directory}: rc={proc.returncode} {err[-2000:]}")
        time.sleep(0.1)


def test_train_on_a_held_run_dir_exits_2_naming_the_holder(tmp_path: Path, pattern_data: Path, lock_holder) -> None:
    run = tmp_path / "run"
    first = lock_holder(run, command="rwkvctl train")
    for extra in ([], ["--resume"]):  # a second fresh start, and a resume while the first still runs
        result = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--data", str(pattern_data), "--device",
                                          "cpu", "--max-steps", "2", *extra])
        msg = " ".join(result.output.split())  # the red line, however the terminal wrapped it
        assert result.exit_code == 2, result.output
        assert f"{run} " + REFUSED.format(cmd="train", pid=first.pid) in msg
        assert msg.endswith("wait for it to finish or choose another directory") and "Traceback" not in msg


@pytest.mark.slow
def test_a_second_train_on_a_running_run_dir_is_refused(tmp_path: Path, pattern_data: Path, train_cli,
                                                        train_env) -> None:
    """Two real commands: the second `train` (fresh or --resume) exits 2 while the first keeps training."""
    run = tmp_path / "run"
    first = subprocess.Popen(train_cli(run, pattern_data, "--max-steps", "100000", "--save-every", "1000"),
                             env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_held(run, first)
        for extra in ([], ["--resume"]):
            second = subprocess.run(train_cli(run, pattern_data, "--max-steps", "4", *extra), env=train_env,
                                    capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr
            assert f"{run} " + REFUSED.format(cmd="train", pid=first.pid) in " ".join(second.stderr.split())
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_train_holds_the_run_dir_before_writing_anything(tmp_path: Path, pattern_data: Path, make_config) -> None:
    cfg = make_config(tmp_path / "run", pattern_data)
    with writer_lock(tmp_path / "run", "rwkvctl train"), pytest.raises(DirectoryInUse, match="rwkvctl train"):
        train(cfg)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [lock_file(tmp_path / "run").name]


def test_only_rank_0_of_a_deepspeed_launch_holds_the_run_dir(tmp_path: Path, pattern_data: Path, make_config,
                                                              monkeypatch) -> None:
    from rwkvctl.train.run_dir import RunDir

    cfg = make_config(tmp_path / "run", pattern_data, train={"strategy": "deepspeed"})
    run = RunDir(tmp_path / "run")
    with writer_lock(run.path, "rwkvctl train"):  # rank 0 of this launch, as far as the other ranks can tell
        monkeypatch.setenv("RANK", "1")
        with _hold_run_dir(cfg, run):  # rank 1 takes no lock: it writes for the launch rank 0 holds
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(DirectoryInUse), _hold_run_dir(cfg, run):
            pass
        single = make_config(tmp_path / "run", pattern_data)  # independent processes are independent writers
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(DirectoryInUse), _hold_run_dir(single, run):
            pass


def test_a_second_prepare_into_a_busy_out_is_refused(tmp_path: Path, make_corpus, lock_holder) -> None:
    make_corpus(tmp_path / "c", n_files=1, docs_per_file=5)
    out = tmp_path / "out"
    first = lock_holder(out, command="rwkvctl prepare")
    cmd = [sys.executable, "-m", "rwkvctl", "prepare", str(tmp_path / "c"), "--out", str(out), "--val-fraction", "0.1"]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert f"{out} " + REFUSED.format(cmd="prepare", pid=first.pid) in " ".join(second.stderr.split())
    first.kill()
    first.wait()
    assert [p.name for p in out.iterdir()] == [lock_file(out).name]  # it wrote nothing, not even its options
    res = prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=out))  # the lock file is not "foreign"
    assert res.complete and lock_file(out).read_text() == ""


def test_nodes_of_one_prepare_share_the_out_dir(tmp_path: Path, make_corpus) -> None:
    make_corpus(tmp_path / "c", n_files=2, docs_per_file=5)
    out = tmp_path / "out"

    def node(rank: int, nodes: int = 2):
        return prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=out, num_nodes=nodes, node_rank=rank))

    with writer_lock(out, "rwkvctl prepare", shared=True), writer_lock(out, "rwkvctl prepare", part="node-0-of-2"):
        node(1)  # node 0 is running: node 1 works beside it
        with pytest.raises(DirectoryInUse, match="node-0-of-2 is being written"):
            node(0)  # a second start of node 0
        with pytest.raises(DirectoryInUse, match=f"{out} is being written"):
            node(0, nodes=1)  # the final single run waits for the nodes
    node(0)
    assert node(0, nodes=1).complete


def test_prepare_refuses_changed_options_by_flag(tmp_path: Path, make_corpus) -> None:
    make_corpus(tmp_path / "c", n_files=1, docs_per_file=5)
    make_corpus(tmp_path / "d", n_files=2, docs_per_file=5)
    out = tmp_path / "out"
    prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=out, val_fraction=0.05))
    options = out / ".prepare" / "options.json"
    cases = [
        ({"val_fraction": 0.1}, f"--val-fraction 0.1 differs from 0.05 used for {out} ({options}); use a new --out "
                                "or the same options"),
        ({"source_weights": {"RedPajamaC4": 0.5}}, "--source-weight RedPajamaC4=0.5 differs from (none) used for"),
        ({"text_key": "body"}, "--text-key body differs from text used for"),
        ({"inputs": [str(tmp_path / "d")]}, f"the input files differ from those used for {out} ({options}); use a "
                                            "new --out or the same inputs"),
    ]
    for change, message in cases:
        opts = {"inputs": [str(tmp_path / "c")], "out_dir": out, "val_fraction": 0.05, **change}
        with pytest.raises(DataError) as e:
            prepare(PrepareOptions(**opts))
        assert str(e.value).startswith(message) or message in str(e.value), str(e.value)
    assert prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=out, val_fraction=0.05)).complete


@pytest.fixture
def checkpoint(tmp_path: Path, random_model) -> Path:
    cfg = ModelConfig(n_layer=2, n_embd=64, vocab_size=128, head_size=32, gate=False)
    return save_checkpoint(tmp_path / "m.pth", random_model(cfg).state_dict(), CheckpointMeta(model=cfg))


def test_file_writers_hold_their_output_file(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "models"
    with writer_lock(out, "rwkvctl quantize", part="q.safetensors"):
        with pytest.raises(DirectoryInUse, match=r"q\.safetensors is being written by rwkvctl quantize"):
            quantize_checkpoint(checkpoint, out / "q.safetensors", QuantSpec())
        quantize_checkpoint(checkpoint, out / "q8.safetensors", QuantSpec(bits=8))  # another file: no conflict
    assert quantize_checkpoint(checkpoint, out / "q.safetensors", QuantSpec()).path.is_file()
    with writer_lock(out, "rwkvctl add-gate", part="gated.pth"), pytest.raises(DirectoryInUse):
        add_gate_to_checkpoint(checkpoint, out / "gated.pth")
    assert not (out / "gated.pth").exists()
    with BinIdxWriter(tmp_path / "a") as w:
        w.add_document(np.array([1, 2, 3], np.uint16))
    with writer_lock(tmp_path, "rwkvctl merge-binidx", part="m"), pytest.raises(DirectoryInUse):
        merge_binidx([tmp_path / "a"], tmp_path / "m")
    assert merge_binidx([tmp_path / "a"], tmp_path / "m")["tokens"] == 3
