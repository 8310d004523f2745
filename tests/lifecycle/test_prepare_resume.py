"""kill -9 `prepare` at random moments, rerun with the same arguments: output is byte-identical to a clean run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkvctl.lifecycle.prepare import PrepareOptions, prepare

# The pure-Python encoder (~1-3 MB/s) makes each input take a noticeable time, so kills land mid-unit; its ids
# equal the native encoder's, which the reference run uses.
RUNNER = """
import sys
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare
prepare(PrepareOptions(inputs=[sys.argv[1]], out_dir=sys.argv[2], val_fraction=0.1, seed=7, ctx_len=64,
                       tokenizer="world-python", workers=int(sys.argv[3]), batch_bytes=32 << 10))
"""


def _start(corpus: Path, out: Path, workers: int) -> subprocess.Popen:
    env = {**os.environ, "RWKVCTL_TOKENIZER": "python"}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(corpus), str(out), str(workers)],
        env=env,
        start_new_session=True,  # its own process group, so kill -9 reaches spawned workers too
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _kill_at_progress(proc: subprocess.Popen, out: Path, rng: random.Random, want_tmp: bool, poll: float) -> bool:
    """Kill -9 after 0-2 more units complete, optionally once a shard is being written, then a few random
    milliseconds later (inside a unit, a rename or a record write). True if the kill landed mid-run."""
    done_dir = out / ".prepare" / "done"
    target = len(list(done_dir.glob("*.json"))) + rng.randint(0, 2)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(done_dir.glob("*.json"))) >= target and (not want_tmp or list(out.rglob("*.tmp-*"))):
            break
        time.sleep(poll)
    time.sleep(rng.uniform(0.0, 10 * poll))
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    return True


def _finish(proc: subprocess.Popen, out: Path) -> int:
    """Wait for a (killed or finished) run; the number of completed units it leaves."""
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]  # ended by our kill or by finishing
    return len(list((out / ".prepare" / "done").glob("*.json")))


def test_kill_and_resume_is_byte_identical(tmp_path: Path, make_corpus, tree_bytes) -> None:
    make_corpus(tmp_path / "c", n_files=10, docs_per_file=400, seed=1)
    ref = prepare(
        PrepareOptions(
            inputs=[str(tmp_path / "c")],
            out_dir=tmp_path / "ref",
            val_fraction=0.1,
            seed=7,
            ctx_len=64,
            batch_bytes=32 << 10,
        )
    )
    assert ref.complete
    rng = random.Random(1234)
    out = tmp_path / "out"
    interrupted, done_counts = 0, []
    for attempt in range(5):
        proc = _start(tmp_path / "c", out, workers=1 + attempt % 2)
        if attempt == 0:
            time.sleep(rng.uniform(0.05, 0.6))  # early: during start-up, planning or the first unit
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                interrupted += 1
        else:
            interrupted += _kill_at_progress(proc, out, rng, want_tmp=rng.random() < 0.5, poll=0.005)
        done_counts.append(_finish(proc, out))
    assert interrupted >= 3, f"only {interrupted} kills landed mid-run; timings too short for this machine?"
    final = _start(tmp_path / "c", out, workers=2)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()[-2000:]
    got, want = tree_bytes(out), tree_bytes(tmp_path / "ref")
    assert sorted(got) == sorted(want)  # no stray temp files, no missing shards
    # The manifest also names the encoder of the last run (here pure Python; the reference used C++): the
    # rest of it must match byte for byte.
    manifest = json.loads(got.pop("manifest.json"))
    ref_manifest = json.loads(want.pop("manifest.json"))
    assert manifest.pop("encoder")["backend"] == "python" and ref_manifest.pop("encoder")
    assert manifest == ref_manifest
    assert got == want, [k for k in want if got.get(k) != want[k]]
    assert manifest["totals"]["train"]["docs"] + manifest["totals"]["val"]["docs"] == 4000
    assert done_counts == sorted(done_counts)  # completed units are never redone or lost
    assert any(0 < c < 10 for c in done_counts), done_counts  # some kills landed between units of work


NATIVE_RUNNER = """
import sys
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare
prepare(PrepareOptions(inputs=[sys.argv[1]], out_dir=sys.argv[2], workers=int(sys.argv[3]), batch_bytes=64 << 10))
"""


def test_kill_and_resume_on_the_native_block_path(tmp_path: Path, make_corpus, tree_bytes) -> None:
    """The default path (C++ JSONL blocks, no val split): kills inside units, between them and in renames."""
    from rwkvctl.data.tokenizer_world import WorldTokenizer

    if WorldTokenizer().backend != "native":
        import pytest

        pytest.skip("no C++ compiler: the native path is not used")
    make_corpus(tmp_path / "c", n_files=12, docs_per_file=1500, seed=2)
    ref_opts = PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "ref", batch_bytes=64 << 10)
    assert prepare(ref_opts).complete
    rng = random.Random(99)
    out = tmp_path / "out"
    interrupted, done_counts = 0, []
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", NATIVE_RUNNER, str(tmp_path / "c"), str(out), str(1 + attempt % 2)],
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        interrupted += _kill_at_progress(proc, out, rng, want_tmp=attempt % 3 == 0, poll=0.002)
        done_counts.append(_finish(proc, out))
    assert interrupted >= 3, f"only {interrupted} kills landed mid-run"
    assert prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=out, batch_bytes=64 << 10)).complete
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert done_counts == sorted(done_counts)


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_workers_end_when_the_prepare_process_is_killed(tmp_path: Path, make_corpus) -> None:
    """kill -9 of the main prepare process alone (not its process group) must not leave workers blocked forever."""
    make_corpus(tmp_path / "c", n_files=8, docs_per_file=400, seed=2)
    proc = _start(tmp_path / "c", tmp_path / "out", workers=2)
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = [w for w in _children(proc.pid) if "python" in Path(f"/proc/{w}/cmdline").read_bytes().decode()]
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("prepare finished before its workers could be seen; corpus too small for this machine")
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text()]
    for w in alive:  # do not leave them behind for the rest of the suite
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed prepare process"
