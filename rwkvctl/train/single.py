"""The single strategy: one process, one device, torch AdamW (`--strategy single`)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from rwkvctl.data.loader import Batch
from rwkvctl.errors import CheckpointError
from rwkvctl.train.config import RunConfig
from rwkvctl.train.engine import Engine, clip_grads_to, resolve_device, total_grad_norm
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.optim import build_adamw, set_lr
from rwkvctl.train.run_dir import CheckpointDir
from rwkvctl.train.segmented import segmented_backward


class SingleEngine(Engine):
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

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_step(self, batch: Batch, accum: int) -> float:
        seg = self.cfg.train.segment_len
        if seg and batch.x.shape[1] > seg:
            # the window stays in host memory: segmented_backward moves one segment's tokens at a time
            return segmented_backward(self.forward, batch.x, batch.y, seg, scale=1.0 / accum,
                                      l2wrap=self.cfg.train.l2wrap, autocast=self._autocast, device=self.device)
        with self._autocast():
            logits, _ = self.forward(batch.x.to(self.device))
            loss = lm_loss(logits, batch.y.to(self.device), use_l2wrap=self.cfg.train.l2wrap)
        del logits  # the loss keeps what backward needs; the (B, T, V) logits can go before backward runs
        value = float(loss.detach())
        if not torch.isfinite(loss):  # no backward: the loop sees the NaN and skips the step
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

    def save(self, ckpt: CheckpointDir) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, ckpt.engine_state)

    def load(self, ckpt: CheckpointDir) -> None:
        path = ckpt.engine_state
        if not path.is_file():
            hint = " (it was written by the deepspeed strategy; resume with --strategy deepspeed)" if (
                ckpt.deepspeed_dir.is_dir()) else ""
            raise CheckpointError(f"{path}: missing{hint}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot restore the training state ({str(e).splitlines()[0]})") from None
