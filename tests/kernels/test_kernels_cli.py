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
    assert "--dtype must be float32 or bfloat16" in result.output and "Traceback" not in result.output
