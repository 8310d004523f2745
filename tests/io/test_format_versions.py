"""Every JSON format rwkvctl writes records its version, and every reader words a version the same way
(rwkvctl.io.bounded_json.format_version): absent loads as the current version (files from before the version was
recorded), a newer one is refused as written by a newer rwkvctl, and one that is not a version is refused by name."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rwkvctl.config import ModelConfig, param_shapes
from rwkvctl.data.manifest import FORMAT_VERSION as MANIFEST_VERSION
from rwkvctl.data.manifest import Manifest
from rwkvctl.errors import CheckpointError, DataError, RwkvctlError
from rwkvctl.io import bounded_json
from rwkvctl.io.checkpoint import SIDECAR_VERSION, CheckpointMeta, load_checkpoint, sidecar_path
from rwkvctl.io.state_file import FORMAT_VERSION as STATE_VERSION
from rwkvctl.io.state_file import StateMeta
from rwkvctl.quant.format import FORMAT_VERSION as QUANT_VERSION
from rwkvctl.quant.format import META_KEY as QUANT_KEY
from rwkvctl.quant.format import read_packed_weights
from rwkvctl.train.run_state import FORMAT_VERSION as TRAINER_VERSION
from rwkvctl.train.run_state import TrainerState

CFG = ModelConfig(n_layer=1, n_embd=64, vocab_size=64, head_size=32)


def _safetensors_meta(meta: dict[str, Any], tmp_path: Path) -> Any:
    """A checkpoint whose only metadata is the safetensors header's (no sidecar), loaded."""
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    tensors = {k: torch.zeros(s) for k, s in param_shapes(CFG).items()}
    save_file(tensors, str(path), metadata={"rwkvctl": json.dumps(meta)})
    sidecar_path(path).unlink(missing_ok=True)
    return load_checkpoint(path)[1]


class _Stored:  # what read_packed_weights reads of a StoredCheckpoint
    path = Path("q.safetensors")
    tensors: dict = {}

    def __init__(self, meta: dict[str, Any]) -> None:
        self.metadata = {QUANT_KEY: json.dumps(meta)}


# format -> (a document as the writer writes it, version key, current version, reader, error class, file named)
FORMATS: dict[str, tuple[Callable[[], dict], str, int, Callable[[dict, Path], Any], type[RwkvctlError], str]] = {
    "sidecar": (lambda: CheckpointMeta(model=CFG).to_dict(), "format_version", SIDECAR_VERSION,
                lambda d, tmp: CheckpointMeta.from_dict(d, source="m.pth.json"), CheckpointError, "m.pth.json"),
    "safetensors metadata": (lambda: CheckpointMeta(model=CFG).to_dict(), "format_version", SIDECAR_VERSION,
                             _safetensors_meta, CheckpointError, "m.safetensors (metadata)"),
    "state metadata": (lambda: json.loads(StateMeta(model={"architecture": "x052"}).to_json()), "format",
                       STATE_VERSION, lambda d, tmp: StateMeta.from_json(json.dumps(d), Path("chat.safetensors")),
                       CheckpointError, "chat.safetensors"),
    "quantization record": (lambda: {"format": QUANT_VERSION, "tensors": {}}, "format", QUANT_VERSION,
                            lambda d, tmp: read_packed_weights(_Stored(d)), CheckpointError, "q.safetensors"),
    "manifest": (lambda: Manifest(tokenizer={"name": "world"}, dtype="uint16").to_dict(), "version",
                 MANIFEST_VERSION, lambda d, tmp: Manifest.from_dict(d, "ds/manifest.json"), DataError,
                 "ds/manifest.json"),
    "trainer state": (lambda: TrainerState(step=3).to_dict(), "format_version", TRAINER_VERSION,
                      lambda d, tmp: TrainerState.from_dict(d, source="trainer_state.json"), CheckpointError,
                      "trainer_state.json"),
}
NAMES = list(FORMATS)


@pytest.mark.parametrize("name", NAMES)
def test_the_writer_records_the_current_version(name: str) -> None:
    make, key, current, *_ = FORMATS[name]
    assert make()[key] == current


@pytest.mark.parametrize("name", NAMES)
def test_a_file_without_a_version_loads_as_the_current_one(name: str, tmp_path: Path) -> None:
    make, key, _, read, _, _ = FORMATS[name]
    doc = make()
    assert read(doc, tmp_path) is not None  # as written
    del doc[key]
    assert read(doc, tmp_path) is not None  # as written before the version was recorded


@pytest.mark.parametrize("name", NAMES)
def test_a_newer_version_is_refused_in_one_line_naming_file_found_and_supported(name: str, tmp_path: Path) -> None:
    make, key, current, read, error, named = FORMATS[name]
    doc = {**make(), key: current + 1}
    with pytest.raises(error, match=f"format version {current + 1} was written by a newer rwkvctl \\(this one reads "
                                    f"up to {current}\\); upgrade rwkvctl$") as err:
        read(doc, tmp_path)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["1", True, 1.0, 0, -1, None, [1]])
def test_a_version_that_is_not_one_is_refused_by_name(name: str, bad: Any, tmp_path: Path) -> None:
    make, key, _, read, error, named = FORMATS[name]
    with pytest.raises(error, match=f"field '{key}' must be an integer format version") as err:
        read({**make(), key: bad}, tmp_path)
    assert named in str(err.value) and str(err.value).endswith(f"got {bad!r}") and "\n" not in str(err.value)


def test_the_shared_check_names_the_supported_range() -> None:
    with pytest.raises(DataError, match=r"^q: quantization metadata field 'format' must be an integer format version "
                                        r"\(1-2\), got 0$"):
        bounded_json.format_version({"format": 0}, "format", 2, "q", DataError, what="quantization metadata")
    assert bounded_json.format_version({"format": 1}, "format", 2, "q", DataError, what="x", oldest=1) == 1
    assert bounded_json.format_version({}, "format", 2, "q", DataError, what="x") == 2
