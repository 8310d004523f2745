"""The engine interface the loop drives, and what every engine shares (device checks, grad norms, determinism).

An engine owns the model's placement, the optimizer and the distributed plumbing. The loop only calls
`micro_step`, `optimizer_step`/`skip_step`, `eval_loss`, `all_reduce_sum` and `save`/`load`, so the
same loop runs one process (rwkvctl/train/single.py) or many DeepSpeed ranks (rwkvctl/train/deepspeed_engine.py).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import resource
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from rwkvctl.data.loader import Batch
from rwkvctl.errors import ConfigError
from rwkvctl.train.config import RunConfig
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.run_dir import CheckpointDir
from rwkvctl.train.segmented import segmented_loss


def load_deepspeed_engine() -> ModuleType:
    """The DeepSpeed engine module (rwkvctl.train.deepspeed_engine), imported on demand: DeepSpeed is an optional
    extra, and a missing one is a one-line error naming what to install."""
    try:
        return importlib.import_module("rwkvctl.train.deepspeed_engine")
    except ImportError as e:
        if (e.name or "").split(".")[0] != "deepspeed":
            raise
        raise ConfigError("DeepSpeed runs need the `deepspeed` package, which is not installed: "
                          "pip install 'rwkvctl[deepspeed]'") from None  # fmt: skip


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against what this torch build and machine actually have (before
    anything is loaded). `setting` names where the value came from, for the error line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting}={name!r}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting}={name!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{setting}={name!r}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting}={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
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
                    return segmented_loss(self.model, batch.x, batch.y, seg, device=self.device)
                logits, _ = self.model(batch.x.to(self.device))
            return float(lm_loss(logits, batch.y.to(self.device), use_l2wrap=False))
        finally:
            self.model.train(was_training)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        return None

    def save(self, ckpt: CheckpointDir) -> None:
        """Write this rank's share of the model and optimizer state into the checkpoint being written."""
        raise NotImplementedError

    def load(self, ckpt: CheckpointDir) -> None:
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
