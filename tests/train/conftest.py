"""Shared data for the DeepSpeed process tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def motif_data(tmp_path_factory) -> Path:
    """100 documents of a repeated 5-token motif (vocab 64): a tiny model learns them in a few steps."""
    from rwkvctl.data.binidx import BinIdxWriter

    root = tmp_path_factory.mktemp("dsdata")
    rng = np.random.default_rng(0)
    with BinIdxWriter(root / "d") as w:
        for _ in range(100):
            w.add_document(np.tile(rng.integers(1, 64, size=5), 16).astype(np.uint16))
    return root / "d"
