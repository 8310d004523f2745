"""What the memory check counts as available: MemAvailable, the cgroup v2 working-set headroom, `ulimit -v`."""

from pathlib import Path

import pytest

import rwkvctl.lifecycle.models as models
from rwkvctl.errors import ConfigError


def _cgroup(root: Path, limit: str, current: int, inactive_file: int) -> Path:
    root.mkdir()
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text(f"anon 123\nfile {inactive_file + 5}\ninactive_file {inactive_file}\n")
    return root


def test_cgroup_headroom_counts_reclaimable_page_cache_as_free(tmp_path: Path, monkeypatch) -> None:
    gib = 1 << 30
    # an 8 GiB container that just wrote 6 GiB of shards (cached, inactive): 1 GiB of real use
    base = _cgroup(tmp_path / "cg", str(8 * gib), 7 * gib, 6 * gib)
    monkeypatch.setattr(models, "_own_cgroup_dir", lambda: str(base))
    assert models._cgroup_headroom() == 7 * gib
    monkeypatch.setattr(models, "_meminfo_available", lambda: 64 * gib)
    monkeypatch.setattr(models, "_address_space_headroom", lambda: None)
    assert models._available_memory() == 7 * gib
    with pytest.raises(ConfigError, match="needs ~7.5 GiB of RAM and 7.0 GiB is available"):
        models.check_fits_in_memory(int(7.5 * gib), "this model", "try a smaller one")


def test_no_cgroup_limit_and_unreadable_files_are_ignored(tmp_path: Path, monkeypatch) -> None:
    base = _cgroup(tmp_path / "cg", "max", 5, 0)
    monkeypatch.setattr(models, "_own_cgroup_dir", lambda: str(base))
    assert models._cgroup_headroom() is None  # "max": no limit
    monkeypatch.setattr(models, "_own_cgroup_dir", lambda: str(tmp_path / "missing"))
    assert models._cgroup_headroom() is None
