"""JSON from files is bounded (size, depth) before parsing and checked field by field, in one line naming the file."""

import json
from pathlib import Path

import pytest

from rwkvctl.errors import CheckpointError, DataError
from rwkvctl.io import bounded_json


def test_a_deeply_nested_document_is_refused_before_parsing() -> None:
    with pytest.raises(CheckpointError, match=r"^x\.json: corrupt sidecar \(nested 100000 levels deep, at most 32"):
        bounded_json.loads("[" * 100_000 + "]" * 100_000, "x.json", CheckpointError, what="sidecar")
    # brackets inside strings are text, not nesting
    assert bounded_json.loads(json.dumps({"a": "[" * 1000}), "x.json", DataError) == {"a": "[" * 1000}


def test_size_utf8_json_and_top_level_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="over the 0 MiB limit"):
        bounded_json.loads(b"{}" * 10, "m.json", DataError, max_bytes=8)
    with pytest.raises(DataError, match=r"m\.json: corrupt manifest \(not UTF-8 text at byte 2\)"):
        bounded_json.loads(b'{"\xff": 1}', "m.json", DataError, what="manifest")
    with pytest.raises(DataError, match="not valid JSON"):
        bounded_json.loads("{not json", "m.json", DataError)
    with pytest.raises(DataError, match="must be a JSON object, found a array"):
        bounded_json.loads("[]", "m.json", DataError)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 100 + b"{}")
    with pytest.raises(DataError, match="big.json"):
        bounded_json.read(big, DataError, max_bytes=50)  # reads no more than the limit


@pytest.mark.parametrize("value, message", [
    (True, "must be integer in \\[0, 10\\], got True"),  # a bool is never an int here
    (-1, "must be integer in \\[0, 10\\], got -1"),
    (11, "got 11"),
    ("3", "got '3'"),
    (None, "got None"),
])
def test_field_names_the_file_the_field_and_what_was_expected(value, message) -> None:
    with pytest.raises(DataError, match=f"^s.json: field 'steps' .*{message}"):
        bounded_json.field({"steps": value}, "steps", int, "s.json", DataError, minimum=0, maximum=10)


def test_field_defaults_and_floats() -> None:
    assert bounded_json.field({}, "k", int, "s", DataError, default=7) == 7
    with pytest.raises(DataError, match="'k' is missing"):
        bounded_json.field({}, "k", int, "s", DataError)
    assert bounded_json.field({"k": 3}, "k", float, "s", DataError) == 3.0
    with pytest.raises(DataError, match="got nan"):
        bounded_json.field({"k": float("nan")}, "k", float, "s", DataError)
