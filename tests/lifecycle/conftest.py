"""Fixtures for the lifecycle tests: small datasets (binidx patterns, JSONL.zst corpora for prepare) and tiny, fast
run configs."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zstandard

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


# --- small real-text JSONL.zst corpora for the prepare tests (fast to build; stdlib sources as text) -------------
SOURCES = ("RedPajamaGithub", "RedPajamaC4", "RedPajamaBook")
EXTRA = ["naïve café 中文 日本語 🎉", "Ωμέγα — “quotes” … \t tabs", "\x00 control \x1b bytes"]


def _make_corpus(root: Path, n_files: int = 3, docs_per_file: int = 40, seed: int = 0) -> list[dict]:
    """Write train/chunk1/example_train_{i}.jsonl.zst; return every row (text, source) in file order."""
    rng = random.Random(seed)
    text = Path(argparse.__file__).read_text(encoding="utf-8") + Path(textwrap.__file__).read_text(encoding="utf-8")
    rows = []
    for f in range(n_files):
        lines = []
        for _ in range(docs_per_file):
            start = rng.randrange(len(text) - 4000)
            doc = text[start : start + rng.randrange(100, 3000)] + " " + rng.choice(EXTRA)
            row = {"text": doc, "meta": {"redpajama_set_name": rng.choice(SOURCES)}}
            rows.append(row)
            lines.append(json.dumps(row))
        path = root / "train" / "chunk1" / f"example_train_{f}.jsonl.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return rows


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), for byte-identical comparisons of outputs."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def make_corpus():
    """(root, n_files=3, docs_per_file=40, seed=0) -> rows: writes a small JSONL.zst corpus under root."""
    return _make_corpus


@pytest.fixture
def tree_bytes():
    """(root) -> {relative path: bytes} of every file under root."""
    return _tree_bytes
