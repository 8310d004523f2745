"""The fuzz suite's harness: mutations of valid files (hypothesis strategies), a runner for the real commands under
an address-space cap, the one assertion every input must pass, and a per-format count printed at the end.

Every input must end one of two ways: the command accepts it (exit 0: the mutation was harmless, e.g. a flipped
byte inside a weight), or it is refused with exit 2 and exactly one `error:` line naming the file. Never the
generic backstop ("unexpected <Exception>"), a traceback, another exit code, or more memory than the cap.

Fast by default (a few dozen inputs per format, derandomized so CI is reproducible); RWKVCTL_FUZZ_EXAMPLES=N runs
N inputs per test with fresh randomness, e.g. `RWKVCTL_FUZZ_EXAMPLES=2000 python -m pytest tests/fuzz -s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_FROM_ENV = int(os.environ.get("RWKVCTL_FUZZ_EXAMPLES", "0") or 0)
BACKSTOP = re.compile(r"^error: unexpected \w+:", re.MULTILINE)  # handles_errors' line for an untyped exception
HEADROOM = 3 << 30  # address space a command may map beyond what the test process already has


def fuzz_settings(default: int) -> settings:
    return settings(max_examples=_FROM_ENV or default, deadline=None, database=None, derandomize=not _FROM_ENV,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# --- counting -----------------------------------------------------------------------------------------------------

TRIED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()
ACCEPTED: Counter[str] = Counter()
UNEXPECTED: Counter[str] = Counter()  # backstop lines and tracebacks (hypothesis' shrinking repeats a failure)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TRIED:
        return
    terminalreporter.section("fuzz: inputs tried per format")
    for fmt in sorted(TRIED):
        terminalreporter.write_line(f"{fmt:<34} {TRIED[fmt]:>6} tried  {REFUSED[fmt]:>6} refused in one line  "
                                    f"{ACCEPTED[fmt]:>6} accepted  {UNEXPECTED[fmt]:>4} unexpected")


# --- mutations ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Deep:
    """A value nested `depth` lists deep (spliced into the serialized text: building it would recurse)."""

    depth: int


HOSTILE_SCALARS = [None, True, False, 0, -1, -(2**63), 2**63, 2**64 + 1, 10**30, 10**7, 10**12, 1.5, -0.5,
                   float("nan"), float("inf"), float("-inf"), "", "x", "\x1b[2J\x9b31m", "../../outside", "/etc/passwd",
                   "NaN", "1e400", [], {}, [1, 2], {"a": {"b": None}}]

hostile_values = st.one_of(
    st.sampled_from(HOSTILE_SCALARS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                 max_leaves=6),
    st.integers(min_value=50, max_value=200_000).map(Deep),
)


def json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as a tuple of keys/indices (the root is ())."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):  # the first few items of long lists are enough
            out += json_paths(v, prefix + (i,))
    return out


def _set(doc: Any, path: tuple, value: Any, how: str) -> Any:
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if how == "delete":
        del node[last]
    elif how == "extra" and isinstance(node, dict):
        node[f"{last}_extra"] = value
    else:
        node[last] = value
    return doc


def json_mutation(doc: Any) -> st.SearchStrategy[tuple[tuple, str, Any]]:
    """(path, how, value): replace the value at path (retype it, make it huge, nest it deeply), delete it, or add
    a key beside it."""
    return st.tuples(st.sampled_from(json_paths(doc)), st.sampled_from(["replace", "replace", "delete", "extra"]),
                     hostile_values)


def apply_json_mutation(doc: Any, mutation: tuple[tuple, str, Any]) -> Any:
    import copy

    path, how, value = mutation
    if how == "delete" and not path:
        how = "replace"
    return _set(copy.deepcopy(doc), path, value, how)


def dumps_hostile(doc: Any) -> str:
    """JSON text of a mutated document, Deep markers spliced in as nested brackets (NaN/Infinity as Python writes
    them: json.loads reads them back)."""
    marks: dict[str, str] = {}

    def default(o: Any) -> Any:
        if isinstance(o, Deep):
            key = f"@@deep{len(marks)}@@"
            marks[json.dumps(key)] = "[" * o.depth + "]" * o.depth
            return key
        raise TypeError(type(o))

    text = json.dumps(doc, default=default)
    for key, nested in marks.items():
        text = text.replace(key, nested)
    return text


def biased_offsets(size: int) -> st.SearchStrategy[int]:
    """Byte offsets, mostly near the start or the end of the file (headers, zip directories, JSON), sometimes
    anywhere."""
    size = max(size, 1)
    head = st.integers(0, min(size, 4096) - 1)
    tail = st.integers(max(0, size - 4096), size - 1)
    return st.one_of(head, tail, st.integers(0, size - 1))


def byte_mutation(size: int) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """A few edits: truncate at an offset, flip a byte, overwrite with 0x00/0xff/non-UTF-8, delete or duplicate a
    chunk."""
    edit = st.tuples(st.sampled_from(["truncate", "flip", "set", "delete", "duplicate"]), biased_offsets(size),
                     st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4)


def apply_byte_mutation(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, at, value in edits:
        if not buf:
            break
        at %= len(buf)
        if kind == "truncate":
            del buf[at:]
        elif kind == "flip":
            buf[at] ^= value or 0x80
        elif kind == "set":
            buf[at] = value | 0x80  # never a plain ASCII byte: stays invalid UTF-8 in text files
        elif kind == "delete":
            del buf[at : at + 1 + value]
        else:
            buf[at:at] = buf[at : at + 1 + value]
    return bytes(buf)


# --- running a command --------------------------------------------------------------------------------------------

def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_cap(headroom: int = HEADROOM) -> Iterator[None]:
    """Lower this process's address-space limit for the duration (restored after): a command that tried to
    allocate for a size taken from a hostile file fails here instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Outcome:
    exit_code: int
    stderr: str
    stdout: str


def run_cli(args: list[str]) -> Outcome:
    from typer.testing import CliRunner

    from rwkvctl.cli import app

    with memory_cap():
        res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(res.exception))
        raise AssertionError(f"rwkvctl {' '.join(map(str, args))} raised past the CLI:\n{tb}")
    return Outcome(res.exit_code, res.stderr, res.stdout)


def check(fmt: str, out: Outcome, names: list[str], what: str = "") -> None:
    """The one rule: accepted (0), or refused with exit 2 and one `error:` line naming one of `names`; counted."""
    TRIED[fmt] += 1
    context = f"[{fmt}] {what}\nexit {out.exit_code}\nstderr:\n{out.stderr}\nstdout tail:\n{out.stdout[-800:]}"
    if BACKSTOP.search(out.stderr) or "Traceback" in out.stderr:
        UNEXPECTED[fmt] += 1
        raise AssertionError(f"the generic backstop or a traceback:\n{context}")
    if out.exit_code == 0:
        ACCEPTED[fmt] += 1
        return
    assert out.exit_code == 2, context
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, context
    assert any(name in errors[0] for name in names), f"the error line names none of {names}\n{context}"
    REFUSED[fmt] += 1


@dataclass
class Fuzz:
    """What the fuzz tests get from the `fuzz` fixture."""

    run: Callable[[list[str]], Outcome] = run_cli
    check: Callable[..., None] = check

    @staticmethod
    def given(default_examples: int, *strategies: Any) -> Callable:
        def wrap(fn: Callable) -> Callable:
            return fuzz_settings(default_examples)(given(*strategies)(fn))

        return wrap

    json_mutation = staticmethod(json_mutation)
    apply_json_mutation = staticmethod(apply_json_mutation)
    dumps_hostile = staticmethod(dumps_hostile)
    byte_mutation = staticmethod(byte_mutation)
    apply_byte_mutation = staticmethod(apply_byte_mutation)


@pytest.fixture
def fuzz() -> Fuzz:
    return Fuzz()


@pytest.fixture(scope="session")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture
def scratch(tmp_path: Path) -> Callable[[], Path]:
    """A fresh empty directory per hypothesis example (tmp_path is shared by all examples of one test)."""
    count = iter(range(10**9))

    def fresh() -> Path:
        d = tmp_path / f"ex{next(count)}"
        d.mkdir()
        return d

    return fresh
