"""`rwkvctl eval`: perplexity, bits per byte and loss by position of one or more models on the same text.

The text is cut into windows of `window` tokens (consecutive, from the start of the data). Each window is run
through the model in segments with the recurrent state carried across them, so a 128k-token window costs the
memory of one segment: a segment's logits are reduced to per-position losses at once and dropped. Losses are summed
per position over the windows; "loss by position" groups positions in powers of two (1, 2, 3-4, 5-8, ...). The loss
falls with position for as long as a model makes use of more context: where the curve flattens or rises is how far
its memory reaches (e.g. a 4k-trained model against its 128k finetune).

Data: a `prepare` output (its val split), a binidx prefix, or text files (tokenized with the models' tokenizer,
one end-of-document token after each file). All models in one run must share the tokenizer and vocabulary, and a
prepared dataset's tokenizer must be theirs, so that the numbers are comparable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwkvctl.data.loader import TokenStream, ValWindows, dataset_tokenizer
from rwkvctl.data.manifest import find_manifest, resolve_prefixes
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import CheckpointError, ConfigError, DataError, NumericsError, TokenizerError
from rwkvctl.io.checkpoint import CheckpointMeta, sidecar_path
from rwkvctl.lifecycle.models import load_model
from rwkvctl.lifecycle.plot import plot_loss_by_position, run_labels
from rwkvctl.train.loss import token_nll
from rwkvctl.train.segmented import segment_bounds

WORLD_SPELLINGS = ("world", "rwkv", "world-native", "world-python")


@dataclass
class EvalProgress:
    """Reported after every segment (the CLI draws it)."""

    model: str
    index: int  # 0-based, of `models`
    models: int
    tokens_done: int  # of this model
    tokens_total: int  # per model


@dataclass
class PositionBucket:
    """Positions first..last (1-based: position p is the token predicted after p tokens of the window)."""

    first: int
    last: int
    loss: float  # mean nats over these positions of every window


@dataclass
class ModelScore:
    label: str
    path: str
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float | None  # None when the text's bytes are unknown
    by_position: list[PositionBucket]
    seconds: float
    tokens_per_s: float


@dataclass
class EvalResult:
    data: str
    kind: str  # "val split" | "binidx" | "text"
    tokenizer: str
    window: int
    segment: int
    windows: int
    tokens: int  # scored positions per model (windows x window)
    bytes: int | None  # UTF-8 bytes of the scored tokens, decoded
    models: list[ModelScore] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@dataclass
class EvalText:
    """The windows every model is scored on."""

    windows: list[tuple[torch.Tensor, torch.Tensor]]  # (x, y), each (1, window) int64, in host memory
    kind: str
    tokenizer: str | None  # what a prepared dataset says it was tokenized with (None: not recorded)
    bytes: int | None


def log2_buckets(window: int) -> list[tuple[int, int]]:
    """[(first, last)] 1-based positions: 1, 2, 3-4, 5-8, ..., (2^(k-1), 2^k], the last cut at `window` (a
    power-of-two window ends a whole bucket: 65,537-131,072)."""
    out, first, last = [], 1, 1
    while first <= window:
        out.append((first, min(last, window)))
        first, last = last + 1, last * 2
    return out


def bucket_means(position_loss: np.ndarray) -> list[PositionBucket]:
    """Mean loss per log2 bucket of a per-position mean loss (index 0 = position 1)."""
    return [PositionBucket(a, b, float(position_loss[a - 1 : b].mean())) for a, b in log2_buckets(len(position_loss))]


def tokenizer_family(spec: str) -> str:
    """What two tokenizer specs must agree on: World in any spelling is `world`; a SentencePiece model is its file
    name (a dataset manifest records only that)."""
    if spec in WORLD_SPELLINGS:
        return "world"
    name = spec[4:] if spec.startswith("spm:") else spec
    return f"spm:{Path(name).name}"


def open_tokenizer(spec: str, near: Sequence[Path]) -> Any:
    """load_tokenizer(spec); a SentencePiece model recorded by file name only is also looked for next to the
    model files and the data (where `prepare` and `train` leave it)."""
    try:
        return load_tokenizer(spec)
    except TokenizerError:
        name = spec[4:] if spec.startswith("spm:") else ""
        for place in near if name else ():
            candidate = (place if place.is_dir() else place.parent) / Path(name).name
            if candidate.is_file():
                return load_tokenizer(f"spm:{candidate}")
        raise


def _peek_meta(path: Path) -> CheckpointMeta | None:
    """The sidecar's metadata without reading the weights (None: no sidecar; checked when the model loads)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return CheckpointMeta.from_dict(json.loads(side.read_text(encoding="utf-8")), source=str(side))
    except (OSError, ValueError):
        return None


def _agree(metas: list[tuple[Path, CheckpointMeta]], tokenizer: str | None) -> None:
    """Every model has the first one's vocabulary size and tokenizer (one-line error naming both files)."""
    first_path, first = metas[0]
    for path, meta in metas[1:]:
        if meta.model.vocab_size != first.model.vocab_size:
            raise ConfigError(f"{path}: vocab_size {meta.model.vocab_size}, but {first_path} has "
                              f"{first.model.vocab_size}; evaluate models that share a vocabulary in one run")
        if tokenizer is None and tokenizer_family(meta.tokenizer) != tokenizer_family(first.tokenizer):
            raise ConfigError(f"{path}: trained with the {meta.tokenizer!r} tokenizer, but {first_path} with "
                              f"{first.tokenizer!r}; evaluate models that share a tokenizer in one run")


def load_eval_text(data: Sequence[str | Path], tok: Any, *, window: int, max_windows: int,
                   vocab_size: int) -> EvalText:
    """The windows to score: a prepared dataset's val split, a binidx prefix, or text files (tokenized with
    `tok`). `max_windows` 0: every whole window of the data."""
    paths = [Path(p) for p in data]
    if not paths:
        raise DataError("no data to evaluate on (--data)")
    recorded: str | None = None
    if len(paths) == 1 and find_manifest(paths[0]) is not None:
        prefixes = resolve_prefixes(paths[0], "val")
        if not prefixes:
            raise DataError(f"{paths[0]}: the dataset has no val split; prepare it with --val-input or "
                            "--val-fraction, or evaluate on a binidx prefix or text files")
        stream, kind, recorded = TokenStream.from_prefixes(prefixes), "val split", dataset_tokenizer(paths[0])
    elif len(paths) == 1 and _is_binidx(paths[0]):
        stream, kind = TokenStream.from_prefixes(resolve_prefixes(paths[0])), "binidx"
    else:
        stream, kind = TokenStream([_encode_files(paths, tok)], [str(p) for p in paths[:1]]), "text"
    if len(stream) < window + 1:
        what = "the val split" if kind == "val split" else "the data"
        raise DataError(f"{paths[0]}: {what} has {len(stream)} tokens, fewer than --window + 1 = {window + 1}; "
                        "use a smaller --window or more data")
    count = (len(stream) - 1) // window
    val = ValWindows(stream, window, max_windows=min(count, max_windows or count), vocab_size=vocab_size)
    windows = [(b.x, b.y) for b in val.batches(1)]  # one window per batch: the state is carried along it
    return EvalText(windows, kind, recorded, _scored_bytes(tok, windows))


def _is_binidx(path: Path) -> bool:
    try:
        return bool(resolve_prefixes(path))
    except DataError:
        return False


def _encode_files(paths: list[Path], tok: Any) -> np.ndarray:
    parts = []
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: no such file or dataset")
        if path.is_dir():
            raise DataError(f"{path}: a directory without manifest.json; name text files, a prepared dataset or a "
                            "binidx prefix")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        parts += [np.asarray(tok.encode(text), dtype=np.int64), np.array([tok.eod_id], dtype=np.int64)]
    return np.concatenate(parts)


def _scored_bytes(tok: Any, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> int | None:
    """UTF-8 bytes of the scored (target) tokens as the tokenizer decodes them."""
    if tok is None:
        return None
    total = 0
    for _, y in windows:
        ids = y[0].numpy()
        if hasattr(tok, "decode_bytes"):  # World: exact bytes, whatever a window's edge cuts through
            total += len(tok.decode_bytes(ids))
        else:
            total += len(tok.decode(ids).encode("utf-8"))
    return total


@torch.inference_mode()
def position_losses(model: torch.nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]], segment: int,
                    device: torch.device | str, on_segment: Callable[[int], None] | None = None) -> np.ndarray:
    """Mean loss per position over the windows, (window,) float64 nats. Each window runs in segments with the
    state carried across them; no more than one segment's logits exist at a time."""
    window = windows[0][0].shape[1]
    sums = np.zeros(window, dtype=np.float64)
    for x, y in windows:
        state = None
        for a, b in segment_bounds(window, segment):
            logits, state = model(x[:, a:b].to(device), state)
            nll = token_nll(logits, y[:, a:b].to(device))  # (1, b - a)
            del logits
            if not bool(torch.isfinite(nll).all()):
                raise NumericsError(f"non-finite loss at positions {a + 1}-{b} of a window; the model's weights or "
                                   "its dtype overflow (try --dtype fp32)")
            sums[a:b] += nll[0].double().cpu().numpy()
            if on_segment is not None:
                on_segment(b - a)
    return sums / len(windows)


def evaluate_models(
    models: Sequence[str | Path],
    data: Sequence[str | Path],
    *,
    window: int = 4096,
    segment: int = 1024,
    max_windows: int = 8,
    labels: Sequence[str] | None = None,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    keep_quantized: bool = False,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> EvalResult:
    """Score every model on the same windows of `data` (see the module docstring)."""
    paths = [Path(m) for m in models]
    if not paths:
        raise ConfigError("name at least one model to evaluate")
    if window < 1 or segment < 1 or max_windows < 0:
        raise ConfigError(f"need --window >= 1, --segment >= 1 and --windows >= 0, got {window}, {segment}, "
                          f"{max_windows}")
    if labels and len(labels) != len(paths):
        raise ConfigError(f"{len(labels)} labels for {len(paths)} models")
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
    names = list(labels) if labels else run_labels(paths)  # file names, parents where needed
    peeked = [(p, m) for p in paths if (m := _peek_meta(p)) is not None]
    if peeked:
        _agree(peeked, tokenizer)  # before any weights are read
    result: EvalResult | None = None
    text: EvalText | None = None
    first: tuple[Path, CheckpointMeta] | None = None
    for i, path in enumerate(paths):
        model, meta = load_model(path, dtype=dtype, device=device, keep_quantized=keep_quantized)
        if first is None:
            first = (path, meta)
            spec = tokenizer or meta.tokenizer or "world"
            tok = open_tokenizer(spec, [path, *(Path(d) for d in data)])
            if tok.vocab_size > meta.model.vocab_size:
                raise CheckpointError(f"{path}: the model has {meta.model.vocab_size} vocabulary rows but the "
                                      f"{spec!r} tokenizer has {tok.vocab_size} ids; pass the tokenizer the model "
                                      "was trained with (--tokenizer)")
            text = load_eval_text(data, tok, window=window, max_windows=max_windows,
                                  vocab_size=meta.model.vocab_size)
            if text.tokenizer is not None and tokenizer_family(text.tokenizer) != tokenizer_family(spec):
                raise DataError(f"{data[0]}: tokenized with {text.tokenizer!r}, but {path} uses {spec!r}; evaluate "
                                "on data prepared with the model's tokenizer")
            result = EvalResult(data=", ".join(str(d) for d in data), kind=text.kind, tokenizer=spec, window=window,
                                segment=min(segment, window), windows=len(text.windows),
                                tokens=len(text.windows) * window, bytes=text.bytes)
        else:
            _agree([first, (path, meta)], tokenizer)
        assert text is not None and result is not None
        result.models.append(_score(model, names[i], path, text, segment, device, i, len(paths), on_progress))
        del model
    assert result is not None
    return result


def _score(model: torch.nn.Module, label: str, path: Path, text: EvalText, segment: int, device: Any, index: int,
           count: int, on_progress: Callable[[EvalProgress], None] | None) -> ModelScore:
    total = len(text.windows) * text.windows[0][0].shape[1]
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(EvalProgress(label, index, count, done, total))

    t0 = time.perf_counter()
    per_position = position_losses(model, text.windows, segment, device, tick)
    seconds = time.perf_counter() - t0
    loss = float(per_position.mean())
    bpb = loss * total / math.log(2) / text.bytes if text.bytes else None
    return ModelScore(label=label, path=str(path), loss=loss, perplexity=math.exp(loss), bits_per_byte=bpb,
                      by_position=bucket_means(per_position), seconds=round(seconds, 3),
                      tokens_per_s=total / seconds if seconds > 0 else 0.0)


def plot_result(result: EvalResult, out: str | Path, *, title: str | None = None) -> Path:
    """The loss-by-position plot of `result` (one line per model) to an image file."""
    curves = {m.label: [(b.first, b.last, b.loss) for b in m.by_position] for m in result.models}
    return plot_loss_by_position(curves, Path(out), window=result.window, title=title)
