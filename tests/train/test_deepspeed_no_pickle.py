"""Resuming a DeepSpeed run never runs pickled code: a payload planted in any file of a ZeRO-2 or ZeRO-3
checkpoint is refused in one line naming the file, and the payload does not run. DeepSpeed's own loader calls
torch.load(weights_only=False); we check every file's pickle stream first and force weights-only loads while
DeepSpeed reads them (the backstop is tested on its own too)."""

import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvctl.errors import CheckpointError
from rwkvctl.train.deepspeed_engine import check_no_pickled_code, weights_only_loads

pytestmark = pytest.mark.deepspeed

MODEL = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.vocab_size=64",
         "--set", "model.head_size=16"]


class _Payload:
    """Unpickling this creates the marker file: the proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _plant(file: Path, marker: Path) -> None:
    """Add a payload to a torch file we wrote ourselves, keeping everything else it holds."""
    obj = torch.load(file, map_location="cpu", weights_only=False)  # our own test file: trusted
    obj["note"] = _Payload(marker)
    torch.save(obj, file)


def _train(run_dir: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rwkvctl", "train", "--run-dir", str(run_dir), "--data", str(data), *MODEL,
           "--ctx-len", "16", "--micro-bsz", "2", "--max-steps", "3", "--save-every", "2", "--val-every", "0",
           "--strategy", "deepspeed", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_planted_global_is_named_and_deepspeed_records_pass(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "stage": ZeroStageEnum(2)}, good)
    check_no_pickled_code(tmp_path)
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"w": torch.ones(2)}, bad)
    _plant(bad, tmp_path / "ran")
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: .*pathlib\.Path"):
        check_no_pickled_code(tmp_path)
    assert not (tmp_path / "ran").exists()
    bad.write_bytes(bad.read_bytes()[:50])  # truncated archive: one line naming it, not a traceback
    with pytest.raises(CheckpointError, match="optim_states.pt: unreadable"):
        check_no_pickled_code(tmp_path)


class _EnumAsOldPythonsPickleIt:
    """Pickles as Python 3.11.0-3.11.4 pickle an enum member: `builtins.getattr(EnumClass, "NAME")`."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_enum_members_pickled_by_older_pythons_load_and_other_lookups_are_refused(tmp_path: Path) -> None:
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from rwkvctl.train.deepspeed_engine import _checkpoint_types

    good = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(2), "stage": _EnumAsOldPythonsPickleIt(ZeroStageEnum, "optimizer_states")}, good)
    assert "builtins.getattr" in torch.serialization.get_unsafe_globals_in_checkpoint(good)
    check_no_pickled_code(tmp_path)  # DeepSpeed's checkpoints from Debian 12's Python 3.11.2 look like this
    with weights_only_loads():
        assert torch.load(good, weights_only=False)["stage"] is ZeroStageEnum.optimizer_states
    with torch.serialization.safe_globals(_checkpoint_types()):  # add-gate's reader
        assert torch.load(good, weights_only=True, mmap=True)["stage"] is ZeroStageEnum.optimizer_states

    for cls, name in [(ZeroStageEnum, "__init__"), (ZeroStageEnum, "_member_map_"), (LossScaler, "__init__"),
                      (OrderedDict, "fromkeys")]:
        bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        torch.save({"w": torch.ones(2), "stage": _EnumAsOldPythonsPickleIt(cls, name)}, bad)
        with pytest.raises(CheckpointError, match=r"optim_states\.pt: holds a pickled lookup that is not a "
                                                  r"DeepSpeed enum member"):
            check_no_pickled_code(tmp_path)
        with weights_only_loads(), pytest.raises(Exception, match="not a DeepSpeed enum member"):
            torch.load(bad, weights_only=False)


def test_the_backstop_forces_weights_only_even_when_asked_not_to(tmp_path: Path) -> None:
    planted = tmp_path / "f.pt"
    torch.save({"w": torch.ones(2)}, planted)
    _plant(planted, tmp_path / "ran")
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(planted, weights_only=False)  # what DeepSpeed's loader asks for
    assert not (tmp_path / "ran").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["2", "3"])
def test_resume_refuses_a_payload_in_every_file(tmp_path: Path, motif_data: Path, stage: str) -> None:
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    first = _train(run, motif_data, "--zero-stage", stage, "--stop-after-steps", "2")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    state = run / "checkpoints" / "step-00000002" / "deepspeed" / "state"
    files = sorted(state.glob("*.pt"))
    assert len(files) >= 2  # model states and optimizer states
    for f in files:
        _plant(f, marker)
    res = _train(run, motif_data, "--zero-stage", stage, "--resume")
    assert res.returncode == 2, (res.stdout + res.stderr)[-3000:]
    assert not marker.exists()
    assert "Traceback" not in res.stderr and "earlier checkpoint" in res.stderr
    assert str(state) in res.stderr

    # The backstop alone (the file check switched off) also refuses: DeepSpeed's own torch.load calls are
    # forced to weights-only, so its weights_only=False cannot run the payload either.
    script = (
        "import sys\n"
        "import rwkvctl.train.deepspeed_engine as e\n"
        "from rwkvctl.errors import CheckpointError\n"
        "from rwkvctl.model.rwkv5 import RWKV5\n"
        "from rwkvctl.train.config import RunConfig\n"
        "from rwkvctl.train.run_dir import RunDir\n"
        "e.check_no_pickled_code = lambda d: None\n"
        "run = RunDir(sys.argv[1])\n"
        "cfg = RunConfig.from_yaml(run.config_file)\n"
        "eng = e.DeepSpeedEngine(RWKV5(cfg.model), cfg)\n"
        "try:\n"
        "    eng.load(run.checkpoint(2))\n"
        "except CheckpointError as err:\n"
        "    print('refused:', err); sys.exit(3)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script, str(run)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, (res.stdout + res.stderr)[-3000:]
    assert "refused:" in res.stdout and not marker.exists()
