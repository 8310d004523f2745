"""I/O faults during `prepare`: a failed write or a transient read error never marks an input done."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from rwkvctl.data import binidx, corpus
from rwkvctl.errors import DataError
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare


@pytest.fixture
def corpus_dir(tmp_path: Path, make_corpus) -> Path:
    make_corpus(tmp_path / "c", n_files=2, docs_per_file=12)
    return tmp_path / "c"


def _opts(corpus_dir: Path, out: Path, **kw) -> PrepareOptions:
    return PrepareOptions(inputs=[str(corpus_dir)], out_dir=out, batch_bytes=4 << 10, **kw)


def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, err: OSError) -> list[int]:
    orig = getattr(owner, name)
    calls = [0]

    def flaky(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # mid-input: something was already written/read
            raise err
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return calls


def _assert_like_clean_run(corpus_dir: Path, tmp_path: Path, out: Path, tree_bytes) -> None:
    clean = tmp_path / "clean"
    prepare(_opts(corpus_dir, clean))
    assert tree_bytes(out) == tree_bytes(clean)


def test_write_error_is_fatal_and_records_nothing(corpus_dir: Path, tmp_path: Path, monkeypatch, tree_bytes) -> None:
    out = tmp_path / "out"
    enospc = OSError(errno.ENOSPC, "No space left on device")
    calls = _fail_once(monkeypatch, binidx.BinIdxWriter, "add_documents", enospc)
    with pytest.raises(OSError, match="No space left"):
        prepare(_opts(corpus_dir, out))
    assert calls[0] == 2
    assert not list(out.glob(".prepare/done/*.json"))
    assert [p for p in out.rglob("*") if ".tmp-" in p.name] == []
    monkeypatch.undo()
    res = prepare(_opts(corpus_dir, out))  # disk freed: the rerun does the input, nothing is skipped as bad
    assert res.manifest.bad_inputs == [] and len(res.manifest.inputs_done) == 2
    _assert_like_clean_run(corpus_dir, tmp_path, out, tree_bytes)


def test_close_error_is_fatal_too(corpus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(binidx, "write_index", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(OSError):
        prepare(_opts(corpus_dir, out))
    assert not list(out.glob(".prepare/done/*.json"))
    monkeypatch.undo()
    res = prepare(_opts(corpus_dir, out))
    assert res.manifest.bad_inputs == [] and res.units_done_now == 2


def test_transient_read_error_is_not_a_permanent_skip(
    corpus_dir: Path, tmp_path: Path, monkeypatch, tree_bytes
) -> None:
    out = tmp_path / "out"
    _fail_once(monkeypatch, corpus._Counting, "read", OSError(errno.EIO, "Input/output error"))
    with pytest.raises(DataError, match="read error .*rerun to resume"):
        prepare(_opts(corpus_dir, out))
    assert all("unreadable" not in p.read_text() for p in out.glob(".prepare/done/*.json"))
    monkeypatch.undo()
    res = prepare(_opts(corpus_dir, out))
    assert res.manifest.bad_inputs == [] and len(res.manifest.inputs_done) == 2
    _assert_like_clean_run(corpus_dir, tmp_path, out, tree_bytes)


def test_unopenable_input_is_fatal_not_skipped(corpus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_open = open

    def deny(path, *a, **k):
        if str(path).endswith("example_train_1.jsonl.zst"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(DataError, match="example_train_1.*Permission denied"):
        prepare(_opts(corpus_dir, out))
    monkeypatch.undo()
    res = prepare(_opts(corpus_dir, out))  # permission fixed: the input is prepared, not listed as bad
    assert res.manifest.bad_inputs == [] and len(res.manifest.inputs_done) == 2
