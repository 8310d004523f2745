"""Fixtures for the training tests: small datasets and tiny, fast run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Same thread count in every process of a test, so that a resumed run's floating-point reductions are
# ordered exactly as the uninterrupted run's.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}

TINY_MODEL = {"n_layer": 2, "n_embd": 64, "vocab_size": 64, "head_size": 32}


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> Path:
    """~16k tokens of short repeated motifs (vocab 64): a tiny model learns them in a few dozen steps."""
    from rwkvctl.data.binidx import BinIdxWriter

    root = tmp_path_factory.mktemp("pattern")
    rng = np.random.default_rng(0)
    with BinIdxWriter(root / "pattern") as w:
        for _ in range(200):
            motif = rng.integers(1, 64, size=int(rng.integers(3, 9)))
            w.add_document(np.concatenate([np.tile(motif, 80 // len(motif)), [0]]).astype(np.uint16))
    return root / "pattern"


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """The bundled sample corpus (SlimPajama layout), prepared with the World tokenizer: train + val."""
    from rwkvctl.data.sample_corpus import write_sample_corpus
    from rwkvctl.lifecycle.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("sample")
    write_sample_corpus(root / "corpus")
    prepare(PrepareOptions(inputs=[str(root / "corpus" / "train")], val_inputs=[str(root / "corpus" / "validation")],
                           out_dir=root / "data"))
    return root / "data"


def _tiny_config(run_dir: Path, data_path: Path, **sections):
    """A RunConfig for the pattern data; `sections` override per section, e.g. train={"accum": 2}."""
    from rwkvctl.train.config import RunConfig

    base = {
        "run_dir": str(run_dir),
        "model": dict(TINY_MODEL),
        "data": {"path": str(data_path), "ctx_len": 32},
        "optim": {"lr_init": 3e-3, "lr_final": 1e-3, "warmup_steps": 2},
        "train": {"micro_bsz": 4, "accum": 1, "max_steps": 12, "save_every": 4, "device": "cpu"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return RunConfig.from_dict(base)


def _cli_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    """`rwkvctl train` for the tiny pattern model, as a subprocess command line."""
    sets = [a for k, v in TINY_MODEL.items() for a in ("--set", f"model.{k}={v}")]
    return [sys.executable, "-m", "rwkvctl", "train", "--run-dir", str(run_dir), "--data", str(data), *sets,
            "--ctx-len", "32", "--micro-bsz", "4", "--lr-init", "3e-3", "--lr-final", "1e-3", "--warmup-steps", "2",
            "--device", "cpu", *extra]




@pytest.fixture
def make_config():
    return _tiny_config


@pytest.fixture
def run_cli():
    def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=TRAIN_ENV, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def train_cli():
    """(run_dir, data, *extra flags) -> the argv of a tiny `rwkvctl train` subprocess."""
    return _cli_args


@pytest.fixture
def train_env():
    """Environment for training subprocesses (fixed thread count, official runtime on its CPU path)."""
    return dict(TRAIN_ENV)
