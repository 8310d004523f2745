"""`rwkvctl --version`: the package version and the versions a bug report needs, without importing torch."""

import subprocess
import sys

from typer.testing import CliRunner

from rwkvctl import __version__
from rwkvctl.cli import app


def test_version_flag_prints_versions_and_exits():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"rwkvctl {__version__} (torch ") and "python " in res.output


def test_version_is_fast_and_imports_no_torch():
    code = "import sys; from rwkvctl.cli import app; app(['--version'])"
    res = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert res.returncode == 0 and __version__ in res.stdout
    code = ("import sys\nfrom rwkvctl.cli import app\ntry:\n    app(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip().endswith("False")
