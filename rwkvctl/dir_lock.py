"""One writer per output: the advisory lock a command holds on what it writes, for as long as it runs.

fs.py makes each write whole or absent; this makes sure two commands never write the same output at once (two
`prepare` runs with different options into one --out, a `train --resume` while the first run still trains), which
would leave a manifest that says one thing and shards that hold another. Imports only rwkvctl.errors.

A whole directory (prepare's --out, a run dir) is held through `.rwkvctl.lock` inside it; one output file (quantize,
add-gate to a file, merge-binidx) through `.rwkvctl-NAME.lock` next to it, so unrelated files written into one
directory never block each other. Lock files are created when missing and never deleted (deleting a lock file
races with a process that has just opened it). The holder stamps its file with one JSON line (pid, host, start time,
command) for the message of a refused writer, and clears the line when it is done.

The lock is an exclusive `flock`, taken without waiting: a second writer is refused at once with DirectoryInUse
naming the holder. The kernel drops the lock when the holder exits however it exits (kill -9, OOM), so a lock left
by a dead process is free with nothing to clean up. Processes forked by the holder (prepare's workers) share it.
On a filesystem without file locks (ENOLCK, EOPNOTSUPP: some network mounts), or where the lock file cannot be
created, the command runs unlocked, as before, with a warning. flock works across machines on NFS (Linux maps it
to an NFS lock) and on Lustre mounted with `-o flock`.

Shared mode is for writers that own disjoint parts of one directory by design (`prepare --num-nodes N`: each node
holds the directory shared and its node's part exclusively): they exclude a whole-directory writer, not each other.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rwkvctl.errors import DirectoryInUse

try:
    import fcntl
except ImportError:  # not POSIX: commands run unlocked, as on a filesystem without locks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("rwkvctl.lock")

LOCK_NAME = ".rwkvctl.lock"
# errors that mean "this filesystem has no locks", not "someone holds it"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_file(directory: str | os.PathLike[str], part: str | None = None) -> Path:
    """The lock file of `directory` as a whole (part None), or of one `part` of it (a file name, a node's share)."""
    return Path(directory) / (LOCK_NAME if part is None else f".rwkvctl-{part}.lock")


def is_lock_file(path: Path) -> bool:
    """True for the lock files of this module, which a check for "an empty directory" must not count."""
    return path.name == LOCK_NAME or (path.name.startswith(".rwkvctl-") and path.name.endswith(".lock"))


def holder(path: Path) -> str:
    """Who holds (or last held) the lock file `path`, as its stamp says: "rwkvctl train (pid N on host H, since T)"."""
    try:
        stamp = json.loads(path.read_text(encoding="utf-8").strip() or "{}")
        return f"{stamp['command']} (pid {stamp['pid']} on host {stamp['host']}, since {stamp['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # not stamped yet, or being restamped right now
        return "another process"


@contextlib.contextmanager
def writer_lock(
    directory: str | os.PathLike[str], command: str, *, part: str | None = None, shared: bool = False
) -> Iterator[None]:
    """Hold `directory` (or its `part`) for this process's whole body; `command` ("rwkvctl train") goes in the
    stamp. Raises DirectoryInUse, without waiting, while another live process holds it. `directory` is created if
    missing. See the module docstring for `shared` and for filesystems without locks."""
    directory = Path(directory)
    what = directory if part is None else directory / part
    fd = _acquire(lock_file(directory, part), what, command, shared)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd)


def _acquire(path: Path, what: Path, command: str, shared: bool) -> int | None:
    """The locked file's descriptor, or None where this filesystem (or platform) cannot lock."""
    if fcntl is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # an unwritable place: the command's own checks say so in its words
        log.debug("writing %s without a lock: cannot create %s (%s)", what, path, e)
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUse(
            f"{what} is being written by {holder(path)}; wait for it to finish or choose another directory"
        ) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in NO_LOCKS:
            raise
        log.warning("%s: the filesystem has no file locks; writing %s without one", path, what)
        return None
    stamp = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
             "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": " ".join(sys.argv)[:500]}
    line = (json.dumps(stamp) + "\n").encode()
    try:  # write, then cut: a reader sees the old line, the new one, or (rarely) nothing, never a mix
        os.pwrite(fd, line, 0)
        os.ftruncate(fd, len(line))
    except OSError as e:  # the stamp is for messages only; the lock is held either way
        log.debug("%s: cannot stamp the lock (%s)", path, e)
    return fd


def _release(fd: int) -> None:
    """Clear the stamp if no one else holds the file (a shared holder may not be the last), then unlock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # always granted to an exclusive holder
        os.ftruncate(fd, 0)
    except OSError:
        pass  # another shared holder still writes: its stamp stays
    finally:
        os.close(fd)  # drops the flock
