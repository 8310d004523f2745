"""open_engine (rwkvctl/lifecycle/infer.py): what it refuses before loading anything."""

from __future__ import annotations

import pytest

from rwkvctl.errors import RwkvctlError
from rwkvctl.lifecycle.infer import open_engine


@pytest.mark.parametrize(("var", "value"), [("RWKVCTL_STEP", "fast"), ("RWKVCTL_CPU_ISA", "avx-512"),
                                            ("RWKVCTL_BF16_INPUT", "exact")])  # fmt: skip
def test_a_bad_cpu_decode_setting_is_refused_before_the_model_loads(tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(RwkvctlError, match=f"{var} must be one of .*, got '{value}'"):
        open_engine(tmp_path / "missing.pth")  # the setting, not the missing file, is what it reports
