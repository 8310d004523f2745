"""The engine interface the loop drives, and its single-process PyTorch implementation.

An engine owns the model's placement, the optimizer and the distributed plumbing. The loop only calls
`micro_step`, `optimizer_step`/`skip_step`, `eval_loss`, `all_reduce_sum` and `save`/`load`, so the
same loop runs one plain process or many DeepSpeed ranks (rwkvctl/train/engine.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rwkvctl.data.loader import Batch
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.train.config import RunConfig
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.optim import build_adamw, set_lr
from rwkvctl.train.segmented import segmented_backward, segmented_loss

STATE_FILE = "engine_state.pt"


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against what this torch build and machine actually have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={name!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"train.device={name!r}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def total_grad_norm(params: list[Tensor]) -> Tensor:
    """Global L2 norm of the gradients, without modifying them."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm([p.grad for p in params])
    # Older torch: clip_grad_norm_ returns the total norm; with max_norm=inf its scale factor is exactly 1.
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


def clip_grads_to(params: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Scale the gradients down so their global norm is at most max_norm (total_norm: their current norm)."""
    clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip_with_norm is not None:
        clip_with_norm(params, max_norm, total_norm)
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)  # the same factor clip_grads_with_norm_ uses
    for p in params:
        p.grad.mul_(coef.to(p.grad.device))


class Engine:
    """Interface + shared helpers. `model` is always the bare RWKV5 module (for export and eval)."""

    model: nn.Module
    device: torch.device
    rank: int = 0
    world_size: int = 1
    name: str = "engine"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_step(self, batch: Batch, accum: int) -> float:
        """Forward + backward of one micro-batch; returns its loss (NaN/Inf: nothing is accumulated)."""
        raise NotImplementedError

    def optimizer_step(self, lr: float) -> float:
        """Apply the accumulated gradients at this lr; returns the global grad norm before clipping."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """Throw the accumulated gradients away (a non-finite loss was seen on some rank)."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        was_training = self.model.training
        self.model.eval()
        seg = getattr(getattr(self, "cfg", None), "train", None)
        seg = seg.segment_len if seg is not None else 0
        try:
            with self._autocast():
                if seg and batch.x.shape[1] > seg:  # a long window: one segment's activations at a time
                    return segmented_loss(self.model, batch.x.to(self.device), batch.y.to(self.device), seg)
                logits, _ = self.model(batch.x.to(self.device))
            return float(lm_loss(logits, batch.y.to(self.device), use_l2wrap=False))
        finally:
            self.model.train(was_training)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        return None

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, Tensor]:
        """Full weights on CPU in RWKV-LM names (rank 0; every rank must call it under ZeRO-3)."""
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

    def peak_memory(self) -> int:
        return peak_memory_bytes(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def close(self) -> None:
        return None


class PlainEngine(Engine):
    """One process, one device, torch AdamW. bf16 means autocast over fp32 master weights."""

    name = "single"

    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.model = model.to(self.device)
        self.model.train()
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.optimizer = build_adamw(self.model, cfg.optim, fused=self.device.type in ("cpu", "cuda"))
        self.bf16 = cfg.train.precision == "bf16"
        self._bad_micro = False

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_step(self, batch: Batch, accum: int) -> float:
        seg = self.cfg.train.segment_len
        if seg and batch.x.shape[1] > seg:
            x, y = batch.x.to(self.device), batch.y.to(self.device)
            value = segmented_backward(self.forward, x, y, seg, scale=1.0 / accum, l2wrap=self.cfg.train.l2wrap,
                                       autocast=self._autocast)  # fmt: skip
            if not math.isfinite(value):
                self._bad_micro = True
            return value
        with self._autocast():
            logits, _ = self.forward(batch.x.to(self.device))
            loss = lm_loss(logits, batch.y.to(self.device), use_l2wrap=self.cfg.train.l2wrap)
        del logits  # the loss keeps what backward needs; the (B, T, V) logits can go before backward runs
        value = float(loss.detach())
        if not torch.isfinite(loss):
            self._bad_micro = True
            return value
        (loss / accum).backward()
        return value

    def optimizer_step(self, lr: float) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = total_grad_norm(params)
        if not torch.isfinite(norm):  # clipping by a NaN norm would poison every weight: skip instead
            self.skip_step()
            return float(norm)
        if self.cfg.optim.grad_clip > 0:
            clip_grads_to(params, self.cfg.optim.grad_clip, norm)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_micro = False

    def save(self, directory: Path) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if not path.is_file():
            hint = " (it was written by the deepspeed strategy; resume with --strategy deepspeed)" if (
                directory / "deepspeed").is_dir() else ""
            raise CheckpointError(f"{path}: missing{hint}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot restore the training state ({str(e).splitlines()[0]})") from None


def configure_determinism(cfg: RunConfig) -> None:
    """Fixed seeds and deterministic kernels: bit-exact resume on CPU fp32, and as close as CUDA allows."""
    import random

    import numpy as np

    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
