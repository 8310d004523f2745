"""The ground floor for writing files (imports nothing of rwkvctl): the one module that knows the crash-safe protocol.

Files: written under a temp name next to the final one (`.NAME.tmp-PID`), fsynced, renamed over NAME, and the
directory fsynced. A reader (or a resumed run) therefore sees either the old complete file or the new complete file,
never a half-written one, even after kill -9 or a full disk. Files that belong together (a `.bin` and its `.idx`,
weights and their sidecar) are renamed one after the other in the order given, so the presence of the last one means
all of them are complete; when they replace an older set, the older companions of the first file are deleted before
it is renamed in, so a kill between the renames never pairs a new file with an old companion that describes another.

Directories (a checkpoint): filled under `.tmp-NAME`, every file fsynced, renamed to NAME. A complete directory that
is replaced or deleted is first renamed aside (`.old-NAME-NS`, `.deleting-NAME-NS`), so NAME is never half there.

Temps of a writer killed mid-write are removed by the next writer of the same name when their pid is dead, or
whatever their pid with `remove_temps(final, any_owner=True)`, for callers that know they are the only writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

PathLike = str | os.PathLike[str]


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX needs the directory entry flushed too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (a read-only descriptor is enough on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and every directory under `directory` (itself included)."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


# --- files -------------------------------------------------------------------------------------------------------


def temp_path(final: PathLike) -> Path:
    """This process's temp name for `final`: `.NAME.tmp-PID` in the same directory (so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def remove_temps(final: PathLike, *, any_owner: bool = False) -> None:
    """Delete temps of earlier writers of `final` that were killed (kill -9, OOM) mid-write.

    By default only temps whose writer process no longer exists are removed, so a concurrent writer (another
    process, or another thread of this one) is safe. `any_owner=True` removes all of them, for a caller that owns
    `final` exclusively (prepare's units, whose earlier writer may have run on another node sharing the directory).
    """
    final = Path(final)
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not any_owner and _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def default_file_mode() -> int:
    """The mode open() gives a new file here: 0o666 less the umask (read from /proc, so the process-wide umask is
    never changed, even for a moment, under other threads)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return 0o666 & ~old


def publish(pairs: Sequence[tuple[Path, Path]], *, private: bool = False) -> None:
    """Make complete files visible under their final names: give each the mode of an ordinary new file (0o600 if
    `private`; some writers, e.g. safetensors, create 0o600 files), fsync it, rename each over its destination in
    the order given (the last pair last), then fsync the destination directories.

    The existing destinations after the first are deleted (durably) before the first rename: the companions of a
    replaced file describe it, not the new one, and the first file is read alone when they are missing."""
    mode = 0o600 if private else default_file_mode()
    for src, _ in pairs:
        os.chmod(src, mode)
        fsync_file(src)
    stale = [dst for _, dst in pairs[1:] if dst.exists()]
    for dst in stale:
        dst.unlink()
    for parent in dict.fromkeys(dst.parent for dst in stale):
        fsync_dir(parent)
    for src, dst in pairs:
        os.replace(src, dst)
    for parent in dict.fromkeys(dst.parent for _, dst in pairs):
        fsync_dir(parent)


class AtomicFiles:
    """Files written under temp names (`temps`, one per final name) and renamed into place together by `commit()`,
    in the order given; `abort()` (or any failure in `commit()`) removes the temps and leaves the final names as
    they were. For a writer that outlives one `with` block (BinIdxWriter); otherwise use `atomic_paths`."""

    def __init__(self, *finals: PathLike, private: bool = False) -> None:
        self.finals = tuple(Path(f) for f in finals)
        self.private = private
        for final in self.finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_temps(final)
        self.temps = tuple(temp_path(f) for f in self.finals)

    def commit(self) -> None:
        try:
            publish(list(zip(self.temps, self.finals, strict=True)), private=self.private)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for tmp in self.temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_paths(*paths: PathLike, private: bool = False) -> Iterator[tuple[Path, ...]]:
    """Yield one temp path per final path; on success all are fsynced and renamed into place in the order given,
    with the mode of an ordinary new file (owner-only with `private`).

    On any exception every temp is removed and the final paths are left untouched.
    """
    files = AtomicFiles(*paths, private=private)
    try:
        yield files.temps
    except BaseException:
        files.abort()
        raise
    files.commit()


@contextlib.contextmanager
def atomic_path(path: PathLike, *, private: bool = False) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path` (mode as atomic_paths).

    On any exception the temp file is removed and `path` is left untouched.
    """
    with atomic_paths(path, private=private) as (tmp,):
        yield tmp


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A private directory under `parent` for a tool that writes its own output files (SentencePiece), removed on
    exit; being on the same filesystem as `parent`, its files can be `publish`ed by rename."""
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=prefix) as tmp:
        yield Path(tmp)


# --- directories -------------------------------------------------------------------------------------------------


def rename(src: Path, dst: Path) -> Path:
    """Rename atomically (same filesystem) and durably; returns `dst`."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst


def rename_aside(path: Path, tag: str) -> Path:
    """Move `path` out of its namespace to the hidden `.TAG-NAME-NS` next to it; returns the new path."""
    return rename(path, path.with_name(f".{tag}-{path.name}-{time.time_ns()}"))


def remove_tree(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves it half there under its name: it is renamed aside
    first; `remove_leftovers` clears what such a crash leaves."""
    shutil.rmtree(rename_aside(path, "deleting"), ignore_errors=True)


def remove_leftovers(parent: Path) -> None:
    """Delete what `remove_tree` left in `parent` when killed after renaming aside (`.old-*` of `commit_dir` is
    kept: killed between its two renames, it may be the only complete copy; `remove_dir_temps` settles it)."""
    for d in parent.glob(".deleting-*"):
        shutil.rmtree(d, ignore_errors=True)


def dir_temp(final: Path) -> Path:
    """Where the directory `final` is filled before `commit_dir`: `.tmp-NAME` next to it."""
    return final.with_name(f".tmp-{final.name}")


def remove_dir_temps(parent: Path) -> None:
    """Finish what a killed `commit_dir` left in `parent`, then delete every other `dir_temp` (directories a killed
    writer never committed). Temp directories record no pid: only for a caller that holds `parent` as its one
    writer.

    Killed between its two renames, `commit_dir` leaves NAME missing, the old copy at `.old-NAME-NS` and the new
    one, complete (fsynced before the old was set aside), at `.tmp-NAME`: the new one is renamed in. Killed after
    both, the `.old-` copy is a leftover and is deleted."""
    def stamp(old: Path) -> int:  # the nanosecond time commit_dir put in the name: newest first below
        tail = old.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    for old in sorted(parent.glob(".old-*"), key=stamp, reverse=True):
        name = old.name.removeprefix(".old-").rsplit("-", 1)[0]
        final, tmp = parent / name, dir_temp(parent / name)
        if not final.exists():
            rename(tmp if tmp.is_dir() else old, final)
        shutil.rmtree(old, ignore_errors=True)
    for d in parent.glob(".tmp-*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def begin_dir(final: Path) -> Path:
    """A fresh, empty temp directory for `final` (a leftover of an interrupted attempt is discarded)."""
    tmp = dir_temp(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(final: Path) -> Path:
    """fsync everything in `dir_temp(final)` and rename it to `final`. An existing `final` is renamed aside
    first and deleted after, so a crash leaves either the old or the new complete directory under the name,
    or (between the two renames) none: never a mix."""
    tmp = dir_temp(final)
    fsync_tree(tmp)
    if final.exists():
        old = rename_aside(final, "old")
        rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        rename(tmp, final)
    return final


def abort_dir(final: Path) -> None:
    shutil.rmtree(dir_temp(final), ignore_errors=True)
