"""`rwkvctl prepare`: corpus files -> tokenized binidx shards + manifest.json, parallel and resumable.

Unit of work = one input file -> one train shard and/or one val shard (`OUT/train/<unit>`, `OUT/val/<unit>`).
A unit's shards are written to temp names, fsynced and renamed, and only then is its completion record
`OUT/.prepare/done/<unit>.json` written atomically. A rerun with the same arguments skips units with a
record and redoes the rest from scratch, so after any kill the final output is byte-identical to an
uninterrupted run. The manifest is rebuilt deterministically from the records at the end of every run.

Workers are processes (fork on Linux, else spawn), each taking whole units (lifecycle/prepare_unit.py);
results do not depend on the worker count.
`num_nodes/node_rank` split units by index (`index % num_nodes == node_rank`), so nodes sharing an output
directory never touch each other's units.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkvctl.data.binidx import dtype_for_vocab, magic_prime
from rwkvctl.data.corpus import MAX_LINE_BYTES, expand_inputs, input_size
from rwkvctl.data.manifest import MANIFEST_NAME, BadInput, Manifest, Shard, SourceCounts
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.dir_lock import is_lock_file, writer_lock
from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_write_text, remove_temps
from rwkvctl.lifecycle.prepare_unit import STATE_DIR, PrepareOptions, Unit, done_path, run_unit

__all__ = ["PrepareOptions", "PrepareProgress", "PrepareResult", "Unit", "plan_units", "prepare", "rwkv_lm_numbers"]

PROGRESS_EVERY_S = 0.25


@dataclass
class PrepareProgress:
    files_total: int
    files_done: int = 0
    files_skipped: int = 0
    docs: int = 0
    tokens: int = 0
    text_bytes: int = 0
    in_bytes: int = 0
    in_bytes_total: int = 0
    elapsed: float = 0.0


@dataclass
class PrepareResult:
    manifest: Manifest
    manifest_path: Path
    complete: bool  # False when other nodes' units are still missing
    units_done_now: int
    units_skipped: int
    seconds: float
    stats: PrepareProgress


# --- planning ----------------------------------------------------------------------------------------------------


def _unit_name(index: int, spec: str) -> str:
    stem = Path(spec.removeprefix("hf:")).name
    for suffix in (".zst", ".zstd", ".gz", ".jsonl", ".json", ".parquet"):
        stem = stem.removesuffix(suffix)
    return f"{index:06d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60] or 'input'}"


def _split_layout(inputs: list[str], val_inputs: list[str]) -> tuple[list[str], list[str]]:
    """A SlimPajama-style root (train/ + validation/ subdirs) given as input: train/ trains, validation/
    validates (unless --val-input is given), test/ is left alone, never mixed into training."""
    train, val = [], list(val_inputs)
    for spec in inputs:
        p = Path(spec)
        vdir = next((p / v for v in ("validation", "valid", "val") if (p / v).is_dir()), None)
        if p.is_dir() and (p / "train").is_dir() and vdir is not None:
            train.append(str(p / "train"))
            if not val_inputs:
                val.append(str(vdir))
        else:
            train.append(spec)
    return train, val


def plan_units(opts: PrepareOptions) -> list[Unit]:
    train_specs, val_specs = _split_layout(opts.inputs, opts.val_inputs)
    train = expand_inputs(train_specs)
    val = expand_inputs(val_specs) if val_specs else []
    if not train and not val:
        given = " ".join(opts.inputs + opts.val_inputs)
        raise DataError(f"no input files matched {given!r} (need .jsonl[.zst|.gz], .parquet or a dataset dir)")
    overlap = set(train) & set(val)
    if overlap:
        raise DataError(f"{sorted(overlap)[0]}: given both as training and validation input")
    specs = [(s, None) for s in train] + [(s, "val") for s in val]
    return [Unit(i, s, split, _unit_name(i, s)) for i, (s, split) in enumerate(specs)]


def _data_options(opts: PrepareOptions) -> dict[str, Any]:
    """The options that change the bytes written; worker/node counts and ctx_len deliberately excluded."""
    return {
        "text_key": opts.text_key,
        "source_key": opts.source_key,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "source_weights": dict(sorted(opts.source_weights.items())),
        "verify_every": opts.verify_every,
        # which long lines are bad documents; recorded only when not the default, so outputs written before the
        # option existed (whose options.json lacks it) still match a rerun with the default
        **({"max_line_bytes": opts.max_line_bytes} if opts.max_line_bytes != MAX_LINE_BYTES else {}),
    }


def _fingerprint(opts: PrepareOptions, tok_desc: dict, units: list[Unit]) -> dict[str, Any]:
    """Everything that changes the bytes written: a rerun into the same --out must match it."""
    return {"tokenizer": tok_desc, **_data_options(opts), "units": [[u.name, u.input, u.split] for u in units]}


# prepare's option -> its flag, for the message that refuses a rerun with other options
_FLAGS = {"tokenizer": "--tokenizer", "text_key": "--text-key", "source_key": "--source-key",
          "val_fraction": "--val-fraction", "seed": "--seed", "source_weights": "--source-weight",
          "verify_every": "--verify-every", "max_line_bytes": "--max-line-bytes"}


def _shown(key: str, value: Any) -> str:
    """An option's value as it is typed on the command line."""
    if key == "tokenizer" and isinstance(value, dict):
        return f"spm:{value['model']}" if "model" in value else str(value.get("name"))
    if key == "source_weights" and isinstance(value, dict):
        return " ".join(f"{k}={v:g}" for k, v in value.items()) or "(none)"
    if key == "max_line_bytes" and value is None:  # left out of options.json: the default
        return str(MAX_LINE_BYTES)
    return "(not recorded)" if value is None else str(value)


def _option_change(out: Path, state: Path, old: dict[str, Any], fp: dict[str, Any]) -> str:
    """The one-line refusal of a rerun into `out` whose options differ from those saved in `state`."""
    key = next(k for k in (*_FLAGS, *sorted(set(fp) | set(old))) if fp.get(k) != old.get(k))
    used = f"used for {out} ({state})"
    if key == "units":
        return f"the input files differ from those {used}; use a new --out or the same inputs"
    new, was = _shown(key, fp.get(key)), _shown(key, old.get(key))
    flag = _FLAGS.get(key, key)
    if new == was:  # the same name, other bytes: a tokenizer file that changed since
        return f"{flag} {new} is not the file {used} (its sha256 differs); use a new --out or the original file"
    return f"{flag} {new} differs from {was} {used}; use a new --out or the same options"


def _is_foreign(out: Path) -> bool:
    """`out` holds something that is not ours: a file, or a directory with more than our state dir and lock files
    (a first run killed before options.json was in place leaves only those)."""
    if (out / STATE_DIR / "options.json").is_file() or not out.exists():
        return False
    return not out.is_dir() or any(p.name != STATE_DIR and not is_lock_file(p) for p in out.iterdir())


def _check_out_dir(out: Path, fp: dict[str, Any]) -> None:
    state = out / STATE_DIR / "options.json"
    if state.is_file():
        try:
            old = json.loads(state.read_text())
        except ValueError:
            raise DataError(f"{state}: damaged; delete {out} and start again") from None
        if old != fp:
            raise DataError(_option_change(out, state, old, fp))
        return
    if _is_foreign(out):
        raise DataError(f"{out} exists and is not an rwkvctl prepare output; choose a new or empty --out")
    atomic_write_text(state, json.dumps(fp, indent=1) + "\n")


@contextlib.contextmanager
def _out_lock(opts: PrepareOptions) -> Iterator[None]:
    """One prepare per --out at a time. Nodes of one multi-node job write disjoint units by design: each holds the
    directory shared (excluding a whole-directory run) and its own node's part exclusively (excluding a second
    run of the same node)."""
    if opts.num_nodes == 1:
        with writer_lock(opts.out_dir, "rwkvctl prepare"):
            yield
        return
    node = f"node-{opts.node_rank}-of-{opts.num_nodes}"
    with writer_lock(opts.out_dir, "rwkvctl prepare", shared=True), \
            writer_lock(opts.out_dir, "rwkvctl prepare", part=node):
        yield


# --- worker processes --------------------------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _die_with_parent(parent: int) -> None:
    """Linux: a worker is sent SIGTERM when the prepare process dies, kill -9 included, instead of waiting forever
    for work that will never come (prctl PR_SET_PDEATHSIG). Elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(opts: PrepareOptions, q: Any, parent: int) -> None:
    _die_with_parent(parent)
    _W["opts"], _W["q"], _W["tok"] = opts, q, load_tokenizer(opts.tokenizer)


def _worker_run(unit: Unit) -> dict[str, Any]:
    q = _W["q"]
    return run_unit(unit, _W["opts"], _W["tok"], lambda d: q.put(d))


# --- driver ------------------------------------------------------------------------------------------------------


def _load_record(out: Path, unit: Unit) -> dict[str, Any] | None:
    path = done_path(out, unit)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    for s in rec.get("shards", []):
        for ext in (".bin", ".idx"):
            if not (out / (s["prefix"] + ext)).is_file():
                return None  # shard deleted since: redo the unit
    return rec


def build_manifest(
    out: Path, units: list[Unit], records: dict[str, dict], opts: PrepareOptions, tok_desc: dict
) -> Manifest:
    m = Manifest(tokenizer=tok_desc, dtype=str(dtype_for_vocab(tok_desc["vocab_size"])))
    for u in units:
        rec = records.get(u.name)
        if rec is None:
            continue
        m.inputs_done.append(u.input)
        for s in rec["shards"]:
            m.shards.append(Shard(**{**s, "sources": {k: SourceCounts(**v) for k, v in s["sources"].items()}}))
        m.bad_inputs.extend(BadInput(**b) for b in rec["bad_inputs"])
    m.options = {**_data_options(opts), "inputs": len(units)}
    if opts.ctx_len is not None:
        m.rwkv_lm = rwkv_lm_numbers(m.tokens("train"), opts.ctx_len)
    return m


def rwkv_lm_numbers(tokens: int, ctx_len: int) -> dict[str, Any]:
    """What RWKV-LM's train.py needs for this data (on the merged .bin): --my_exit_tokens, --magic_prime."""
    out: dict[str, Any] = {"ctx_len": ctx_len, "my_exit_tokens": tokens}
    try:
        out["magic_prime"] = magic_prime(tokens, ctx_len)
    except DataError as e:
        out["magic_prime"] = None
        out["note"] = str(e)
    return out


def prepare(opts: PrepareOptions, on_progress: Callable[[PrepareProgress], None] | None = None) -> PrepareResult:
    t0 = time.monotonic()
    if not 0 <= opts.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.num_nodes < 1 or not 0 <= opts.node_rank < opts.num_nodes:
        raise DataError(f"--node-rank {opts.node_rank} must be in 0..{opts.num_nodes - 1}")
    if opts.ctx_len is not None and opts.ctx_len < 1:
        raise DataError(f"--ctx-len must be at least 1, got {opts.ctx_len}")
    if opts.workers < 1 or opts.verify_every < 1:
        raise DataError("--workers and --verify-every must be at least 1")
    if any(w < 0 or not math.isfinite(w) for w in opts.source_weights.values()):
        raise DataError("source weights must be finite and non-negative")
    opts.out_dir = Path(opts.out_dir)
    units = plan_units(opts)
    tok = load_tokenizer(opts.tokenizer)
    tok_desc = tok.describe()
    if _is_foreign(opts.out_dir):  # before a lock file lands in someone else's directory
        raise DataError(f"{opts.out_dir} exists and is not an rwkvctl prepare output; choose a new or empty --out")
    with _out_lock(opts):
        _check_out_dir(opts.out_dir, _fingerprint(opts, tok_desc, units))
        return _prepare_locked(opts, units, tok, tok_desc, t0, on_progress)


def _prepare_locked(opts: PrepareOptions, units: list[Unit], tok: Any, tok_desc: dict, t0: float,
                    on_progress: Callable[[PrepareProgress], None] | None) -> PrepareResult:
    """The work of `prepare`, once --out is held and known to be ours."""
    mine = [u for u in units if u.index % opts.num_nodes == opts.node_rank]
    own_manifest = f"manifest.node-{opts.node_rank}-of-{opts.num_nodes}.json"
    for name in (MANIFEST_NAME, own_manifest, "options.json"):  # temps of a run killed while writing these
        for d in (opts.out_dir, opts.out_dir / STATE_DIR):
            remove_temps(d / name, any_owner=True)
    records = {u.name: r for u in units if (r := _load_record(opts.out_dir, u)) is not None}
    todo = [u for u in mine if u.name not in records]
    sizes = {u.name: input_size(u.input) for u in todo}
    prog = PrepareProgress(
        files_total=len(mine), files_skipped=len(mine) - len(todo), in_bytes_total=sum(sizes.values())
    )
    prog.files_done = prog.files_skipped
    last = [0.0]

    def report(delta: dict, force: bool = False) -> None:
        for k, v in delta.items():
            setattr(prog, k, getattr(prog, k) + v)
        now = time.monotonic()
        if on_progress and (force or now - last[0] >= PROGRESS_EVERY_S):
            last[0] = now
            prog.elapsed = now - t0
            on_progress(prog)

    report({}, force=True)
    if opts.workers == 1 or len(todo) <= 1:
        for u in todo:
            records[u.name] = run_unit(u, opts, tok, report)
            report({"files_done": 1}, force=True)
    else:
        _run_parallel(todo, sizes, opts, records, report)

    done_all = all(u.name in records for u in units)
    listed = units if done_all else [u for u in units if u.name in records and u in mine]
    manifest = build_manifest(opts.out_dir, listed, records, opts, tok_desc)
    manifest.encoder = {"backend": tok.backend, "note": tok.backend_note}
    name = MANIFEST_NAME if done_all else own_manifest
    path = manifest.save(opts.out_dir / name)
    report({}, force=True)
    return PrepareResult(manifest, path, done_all, len(todo), prog.files_skipped, time.monotonic() - t0, prog)


def _run_parallel(
    todo: list[Unit], sizes: dict[str, int], opts: PrepareOptions, records: dict, report: Callable
) -> None:
    # fork (Linux): workers inherit the loaded tokenizer and native library, so they start in milliseconds
    # instead of re-importing and re-parsing the vocab (~1 s each). RWKVCTL_MP_START=spawn opts out.
    method = os.environ.get("RWKVCTL_MP_START") or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    q = ctx.Queue()
    # Biggest inputs first, so one large file does not run alone at the end.
    order = sorted(todo, key=lambda u: (-sizes[u.name], u.index))

    def drain() -> None:
        with contextlib.suppress(queue_mod.Empty):
            while True:
                report(q.get_nowait())

    # ProcessPoolExecutor (not Pool): a worker that dies raises BrokenProcessPool instead of hanging.
    with ProcessPoolExecutor(
        min(opts.workers, len(todo)), mp_context=ctx, initializer=_worker_init, initargs=(opts, q, os.getpid())
    ) as pool:
        pending = {pool.submit(_worker_run, u) for u in order}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                drain()
                for fut in finished:
                    rec = fut.result()
                    records[rec["unit"]] = rec
                    report({"files_done": 1}, force=True)
                report({})
        except BrokenProcessPool:
            raise DataError(
                "a prepare worker died (killed or out of memory); rerun the same command to resume"
            ) from None
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    drain()
