"""`rwkvctl kernels build|check` through the real CLI app."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
runner = CliRunner()


def test_kernels_build_reports_the_library():
    result = runner.invoke(app, ["kernels", "build"])
    assert result.exit_code == 0, result.output
    assert "rwkvctl_wkv5_" in result.output and ".so" in result.output
    assert "CUDA" in result.output


def test_kernels_check_quick_passes():
    result = runner.invoke(app, ["kernels", "check", "--quick", "--reps", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "3x129x4x64" in result.output and "NO" not in result.output


def test_kernels_check_bad_option_is_one_line():
    result = runner.invoke(app, ["kernels", "check", "--dtype", "int8"])
    assert result.exit_code != 0
    assert "--dtype must be fp32 or bf16" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("old, new", [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")])
def test_kernels_check_old_dtype_spelling_prints_a_deprecation(old, new):
    # --device bogus stops the command right after the dtype is read, before anything is compiled
    result = runner.invoke(app, ["kernels", "check", "--dtype", old, "--device", "bogus"])
    assert f"--dtype {old} is deprecated" in result.output and f"use --dtype {new}" in result.output
    current = runner.invoke(app, ["kernels", "check", "--dtype", new, "--device", "bogus"])
    assert "deprecated" not in current.output
