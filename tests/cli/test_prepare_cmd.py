"""CLI: sample-corpus -> prepare -> inspect/merge (the README path), and one-line errors for bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkvctl.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    """Output without whitespace: Rich wraps long lines (paths) at the test terminal's width."""
    return "".join(text.split())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    r = run("sample-corpus", root / "corpus")
    assert r.exit_code == 0, r.output
    assert "validation/chunk1/example_holdout_0.jsonl.zst" in flat(r.output)
    # A SlimPajama root: train/ is used for training, validation/ for the val split.
    r = run("prepare", root / "corpus", "--out", root / "data", "--ctx-len", "512", "--workers", "2")
    assert r.exit_code == 0, r.output
    for text in ("RedPajamaGithub", "tokens/byte", "manifest:", "--magic_prime"):
        assert text in flat(r.output)
    return root


def test_rerun_skips_everything(prepared: Path) -> None:
    r = run("prepare", prepared / "corpus", "--out", prepared / "data")
    assert r.exit_code == 0 and "0input(s)tokenized,5alreadydone" in flat(r.output)


def test_inspect_and_merge(prepared: Path) -> None:
    r = run("inspect", prepared / "data")
    assert r.exit_code == 0, r.output
    assert (
        "RedPajamaStackExchange" in r.output and "decodedasworld" in flat(r.output) and "<endofdoc>" in flat(r.output)
    )
    r = run("merge-binidx", prepared / "data", prepared / "merged", "--ctx-len", "512")
    assert r.exit_code == 0, r.output
    assert "--magic_prime" in flat(r.output) and (prepared / "merged.bin").is_file()
    r = run("inspect", prepared / "merged.idx")
    assert r.exit_code == 0 and "sequences/docs" in flat(r.output)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "{tmp}/missing*.zst", "--out", "{tmp}/o"], "no input files matched"),
        (["prepare", "{corpus}", "--out", "{tmp}/busy"], "not an rwkvctl prepare output"),
        (["prepare", "{corpus}", "--out", "{tmp}/o", "--source-weight", "oops"], "expected SOURCE=WEIGHT"),
        (["prepare", "{corpus}", "--out", "{tmp}/o", "--tokenizer", "spm:{tmp}/nope.model"], "no such SentencePiece"),
        (["inspect", "{tmp}/busy"], "not a dataset"),
        (["prepare", "{corpus}", "--out", "{tmp}/o", "--ctx-len", "0"], "--ctx-len must be at least 1"),
        (["merge-binidx", "{data}", "{tmp}/m", "--ctx-len", "0"], "--ctx-len must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line(prepared: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    args = [a.format(tmp=tmp_path, corpus=prepared / "corpus", data=prepared / "data") for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and r.exception is None or isinstance(r.exception, SystemExit)
    assert flat(message) in flat(r.output) and "Traceback" not in r.output
    assert r.output.count("error:") == 1 and flat(r.output).startswith("error:")  # one message, nothing else


def test_tokenizer_commands(tmp_path: Path, prepared: Path) -> None:
    r = run("tokenizer", "encode", "Hello world")
    assert r.exit_code == 0 and "[33155,40213]" in flat(r.output)
    r = run(
        "tokenizer",
        "train",
        prepared / "corpus" / "train",
        "--out",
        tmp_path / "[bold]" / "t.model",
        "--vocab-size",
        "400",
        "--sample-mb",
        "1",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "[bold]" / "t.model").is_file() and (tmp_path / "[bold]" / "t.vocab").is_file()
    assert "[bold]/t.model" in flat(r.output)  # a path is shown as-is, never read as Rich markup
    r = runner.invoke(app, ["tokenizer", "train", str(prepared / "corpus"), "--out", str(tmp_path / "[bold]/t.model")])
    assert r.exit_code != 0 and "t.model:alreadyexists;pass--force" in flat(r.output)


def test_user_text_is_never_rich_markup(tmp_path: Path, prepared: Path) -> None:
    # World ids of "x[/x] [bold]": x | [/ | x | ] | " [" | bold | ]
    r = run("tokenizer", "encode", "x[/x] [bold]")
    assert r.exit_code == 0, r.output
    assert "'[/' | 'x' | ']' | ' [' | 'bold' | ']'" in r.output
    r = run("tokenizer", "decode", "121", "1651", "121", "94", "326", "24900", "94")
    assert r.exit_code == 0 and "'x[/x] [bold]'" in r.output
    r = run("sample-corpus", tmp_path / "[bold]corpus")
    assert r.exit_code == 0 and f"{tmp_path}/[bold]corpus".replace(" ", "") in flat(r.output)
    holdout = next((tmp_path / "[bold]corpus" / "validation").rglob("*.zst"))
    r = run("prepare", holdout, "--out", tmp_path / "[bold]data", "--ctx-len", "16")
    assert r.exit_code == 0, r.output
    assert "[bold]data/manifest.json" in flat(r.output) and "merge-binidx" in flat(r.output)
    r = run("inspect", tmp_path / "[bold]data")
    assert r.exit_code == 0 and "[bold]data" in flat(r.output)
    r = run("merge-binidx", prepared / "data", tmp_path / "[/x]merged", "--ctx-len", "512")
    assert r.exit_code == 0 and "[/x]merged.bin/.idx" in flat(r.output) and "[/x]merged--data_type" in flat(r.output)
    r = runner.invoke(app, ["merge-binidx", str(prepared / "data"), str(tmp_path / "[/x]merged")])
    assert r.exit_code != 0 and "alreadyexists;pass--force" in flat(r.output)
    r = run("merge-binidx", prepared / "data", tmp_path / "[/x]merged", "--force", "--split", "val")
    assert r.exit_code == 0, r.output


def test_prepare_summary_names_a_slow_encoder(tmp_path: Path, prepared: Path, monkeypatch) -> None:
    from rwkvctl.data import tokenizer, tokenizer_native

    monkeypatch.setattr(tokenizer_native, "_lib", None)
    monkeypatch.setattr(tokenizer_native, "_reason", "g++ failed on world_trie.cpp: boom")
    tokenizer._world.cache_clear()
    try:
        holdout = next((prepared / "corpus" / "validation").rglob("*.zst"))
        r = run("prepare", holdout, "--out", tmp_path / "data")
    finally:
        tokenizer._world.cache_clear()
    assert r.exit_code == 0, r.output
    assert "encoder:python" in flat(r.output) and "g++failedonworld_trie.cpp:boom" in flat(r.output)


def test_max_line_bytes_flag(tmp_path: Path) -> None:
    """--max-line-bytes: a longer JSONL line is a line_too_long bad document; a non-positive value is refused in one
    line; a rerun into the same --out with another value is refused by name; the default stays unrecorded, so an
    output written before the flag existed still matches."""
    import json

    src = tmp_path / "in" / "part.jsonl"
    src.parent.mkdir()
    src.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 500}) + "\n")
    for bad in ("0", "-5", "1k"):
        r = runner.invoke(app, ["prepare", str(src.parent), "--out", str(tmp_path / "never"), "--max-line-bytes", bad])
        assert r.exit_code == 2 and "--max-line-bytes" in r.stderr and not (tmp_path / "never").exists(), r.output
    r = runner.invoke(app, ["prepare", str(src.parent), "--out", str(tmp_path / "x"), "--max-line-bytes", "0"])
    assert "--max-line-bytes 0: give a positive number of bytes" in r.stderr and r.stderr.count("error:") == 1
    out = tmp_path / "out"
    r = run("prepare", src.parent, "--out", out, "--max-line-bytes", "100")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["train"]["docs"] + manifest["totals"].get("val", {}).get("docs", 0) == 1
    assert [(b["kind"], b["first_line"]) for b in manifest["bad_inputs"]] == [("line_too_long", 2)]
    assert run("prepare", src.parent, "--out", out, "--max-line-bytes", "100").exit_code == 0  # same: resumes
    r = runner.invoke(app, ["prepare", str(src.parent), "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.count("error:") == 1, r.output
    assert "--max-line-bytes67108864differsfrom100" in flat(r.stderr), r.stderr
    default = tmp_path / "default"
    assert run("prepare", src.parent, "--out", default).exit_code == 0
    assert "max_line_bytes" not in json.loads((default / ".prepare" / "options.json").read_text())
