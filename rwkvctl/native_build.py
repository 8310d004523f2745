"""The ground floor of rwkvctl's two compiled parts, the WKV5 kernels (kernels/build.py) and the World tokenizer's
C++ library (data/tokenizer_native.py): where builds are cached, the RWKVCTL_* settings that steer them, the
content-hash cache key and the build lock. Imports only rwkvctl.errors.

Cache: `$RWKVCTL_CACHE_DIR` (default ~/.cache/rwkvctl), one subdirectory per part (`extensions/`, `tokenizer/`),
each build named `<name>-<key>`, the key a hash of every source byte and of the toolchain, so an edit rebuilds
and a shared cache never serves a foreign build.

Settings: `RWKVCTL_<PART>` picks the backend (`RWKVCTL_WKV=auto|compiled|reference`,
`RWKVCTL_TOKENIZER=auto|native|python`); `RWKVCTL_<PART>_<SETTING>` tunes the build (`RWKVCTL_WKV_CXXFLAGS`,
`RWKVCTL_TOKENIZER_CXXFLAGS`, `RWKVCTL_WKV_SKIP_CUDA`); `CXX` names the compiler for both. The spellings of earlier
releases (`DEPRECATED`) are still read, with a warning.

Lock: one build of a target at a time, machine- and node-wide: an exclusive `flock` on `<target>.lock`. The kernel
drops it when the holder exits however it exits, so a lock left by a killed build (kill -9, OOM) is taken over at
once, and a live holder is waited for, up to `LOCK_TIMEOUT_S`, then refused with its pid in the message.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rwkvctl.errors import BuildLockTimeout, RwkvctlError

try:
    import fcntl
except ImportError:  # not POSIX: builds run unlocked, as on a filesystem without locks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("rwkvctl.build")

# part -> its subdirectory of the cache root
PARTS = {"WKV": "extensions", "TOKENIZER": "tokenizer"}
# old variable -> (the variable it now means, how its value translates: None = as if unset). Remove next release.
DEPRECATED: dict[str, tuple[str, dict[str, str | None] | None]] = {
    "RWKVCTL_NO_NATIVE": ("RWKVCTL_TOKENIZER", {"": None, "0": None, "*": "python"}),
    "RWKVCTL_SKIP_CUDA_BUILD": ("RWKVCTL_WKV_SKIP_CUDA", None),
    "RWKVCTL_EXTENSIONS_DIR": ("RWKVCTL_CACHE_DIR", None),  # it named <root>/extensions itself: see cache_dir()
}
# no build (a minute for WKV5 with CUDA, seconds for the tokenizer) holds the lock this long unless it hangs
LOCK_TIMEOUT_S = 30 * 60
_warned: set[str] = set()


def _deprecated(old: str) -> str | None:
    """The value the deprecated variable `old` stands for (None: unset or off), warning once per process."""
    value = os.environ.get(old)
    if value is None:
        return None
    new, table = DEPRECATED[old]
    if old not in _warned:
        _warned.add(old)
        log.warning("%s is deprecated and will stop working in the next release; use %s", old, new)
    if table is None:
        return value or None
    return table.get(value.strip(), table["*"])


def setting(name: str, default: str = "") -> str:
    """The value of `RWKVCTL_<name>` (stripped), else what a deprecated spelling of it says, else `default`."""
    var = f"RWKVCTL_{name}"
    value = os.environ.get(var, "").strip()
    if value:
        return value
    for old, (new, _) in DEPRECATED.items():
        if new == var and old != "RWKVCTL_EXTENSIONS_DIR" and (translated := _deprecated(old)) is not None:
            return translated
    return default


def flag(name: str) -> bool:
    """`RWKVCTL_<name>` set to anything but empty or 0."""
    return setting(name, "0") != "0"


def choice(part: str, choices: tuple[str, ...], error: type[RwkvctlError]) -> str:
    """The backend `RWKVCTL_<part>` asks for, lower-cased; the first of `choices` (auto) when unset. Any other
    value raises `error` (the part's own error type)."""
    mode = setting(part, choices[0]).lower()
    if mode not in choices:
        raise error(f"RWKVCTL_{part} must be one of {', '.join(choices)}, got {mode!r}")
    return mode


class Switch:
    """An `RWKVCTL_<part>` setting choosing between a compiled path and its pure-PyTorch reference. Its modes are
    (auto, strict, reference): auto takes the compiled path where it runs, else the reference with one notice per
    reason (a logging warning); strict fails with the part's error instead; reference always takes the reference."""

    def __init__(self, part: str, modes: tuple[str, str, str], error: type[RwkvctlError], logger: logging.Logger,
                 notice: str) -> None:  # fmt: skip
        self.part, self.modes, self.error, self.logger = part, modes, error, logger
        self.notice = notice  # a %-format with one %s: the reason
        self.warned: set[str] = set()

    def mode(self) -> str:
        return choice(self.part, self.modes, self.error)

    def fallback(self, reason: str, mode: str) -> bool:
        """False (take the reference), after one notice per reason; raises in the strict mode."""
        if mode == self.modes[1]:
            raise self.error(f"RWKVCTL_{self.part}={mode} but {reason}")
        if reason not in self.warned:
            self.warned.add(reason)
            self.logger.warning(self.notice, reason)
        return False


def cache_root() -> Path:
    """`$RWKVCTL_CACHE_DIR`, default ~/.cache/rwkvctl: every compiled part is cached below it."""
    env = os.environ.get("RWKVCTL_CACHE_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rwkvctl"


def cache_dir(part: str) -> Path:
    """Where the builds of `part` (WKV, TOKENIZER) are kept."""
    if part == "WKV" and (legacy := _deprecated("RWKVCTL_EXTENSIONS_DIR")):
        return Path(legacy).expanduser()
    return cache_root() / PARTS[part]


def compiler() -> str:
    """The C++ compiler both parts build with: `$CXX`, default c++."""
    return os.environ.get("CXX", "").strip() or "c++"


def extra_flags(part: str) -> list[str]:
    """Compiler flags `RWKVCTL_<part>_CXXFLAGS` adds to a part's build (they change its cache key)."""
    return setting(f"{part}_CXXFLAGS").split()


def cache_key(files: Iterable[Path], base: Path, toolchain: tuple) -> str:
    """16 hex digits of SHA-256 over every file (its path relative to `base`, then its bytes) in sorted order and
    the toolchain (flags, compiler, versions): what decides the machine code, so the name of a build."""
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes())
    digest.update(repr(toolchain).encode())
    return digest.hexdigest()[:16]


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _holder(fd: int) -> str:
    """Who holds the lock, as written by it: "pid N on HOST"."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return "another process"
    return f"pid {pid} on {host}" if pid else "another process"


@contextlib.contextmanager
def build_lock(target: Path, timeout_s: float | None = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the build lock of `target` (a file or a build directory) for the body.

    Waits while a live process holds it, warning once; after `timeout_s` (default LOCK_TIMEOUT_S) raises
    BuildLockTimeout naming the holder. A lock whose holder died is free (flock ends with its process). Where the
    lock file cannot be created (a read-only cache) or the filesystem has no locks, the body runs unlocked: the
    build still lands under its final name whole or not at all (tokenizer), or is reused as it is (WKV5).
    """
    lock = lock_path(target)
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        log.debug("building %s without a lock: cannot create %s (%s)", target, lock, e)
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("%s: the filesystem has no file locks; building %s without one", lock, target.name)
                break
            if time.monotonic() >= deadline:
                raise BuildLockTimeout(
                    f"{lock}: {_holder(fd)} has been building {target.name} for over {timeout_s:.0f} s; wait for "
                    "it or stop it (the lock frees itself when that process exits)"
                )
            if not waited:
                waited = True
                log.warning("waiting for %s to finish building %s", _holder(fd), target.name)
            time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)  # for the messages of waiters
        yield
    finally:
        os.close(fd)  # releases the flock
