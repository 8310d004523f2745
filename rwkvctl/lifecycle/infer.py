"""Opening a model for inference: checkpoint (any kind, dtype, device, packed or expanded) and tokenizer, checked
against each other, as one InferenceEngine (rwkvctl.generate.engine) that chat, generate and serve share."""

from __future__ import annotations

from pathlib import Path

import torch

from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import CheckpointError, RwkvctlError
from rwkvctl.generate.engine import InferenceEngine
from rwkvctl.io.checkpoint import CheckpointMeta
from rwkvctl.lifecycle.models import load_model
from rwkvctl.model.cpu_fast import step_mode
from rwkvctl.model.large_pages import place_in_large_pages


def open_engine(
    path: str | Path,
    *,
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep_quantized: bool = False,
    chunk_len: int = 256,
) -> tuple[InferenceEngine, CheckpointMeta]:
    """The engine for the checkpoint at `path`. `tokenizer`: a spec for load_tokenizer, or None for the one the
    checkpoint records (its sidecar; World for a bare RWKV-LM file)."""
    if torch.device(device).type == "cpu":
        step_mode()  # a typo in RWKVCTL_STEP / _CPU_ISA / _BF16_INPUT: one line now, not after the prompt is shown
    model, meta = load_model(path, dtype=dtype, device=device, keep_quantized=keep_quantized)
    spec = tokenizer or meta.tokenizer or "world"
    try:
        tok = load_tokenizer(spec)
    except RwkvctlError as e:
        if tokenizer:  # the user's --tokenizer: its own message says what is wrong with it
            raise
        raise CheckpointError(f"{path}: the tokenizer it records cannot be loaded ({e}); pass --tokenizer") from None
    if tok.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the model has {model.cfg.vocab_size} vocabulary rows but the {spec!r} tokenizer has "
            f"{tok.vocab_size} ids; pass the tokenizer the model was trained with (--tokenizer)"
        )
    if torch.device(device).type == "cpu":
        place_in_large_pages(model)  # decode streams every weight per token: ~1.2-1.5x faster in 2 MB pages
    return InferenceEngine(model, tok, chunk_len=chunk_len), meta
