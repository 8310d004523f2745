"""DeepSpeed ZeRO engine: the only module in rwkvctl that imports deepspeed.

Launch the standard way; every rank runs the same `rwkvctl train ... --strategy deepspeed`:
    deepspeed --no_local_rank --num_gpus 8 --module rwkvctl train --config examples/rwkv5-7b-8gpu.yaml
    torchrun --nproc_per_node 8 -m rwkvctl train --config examples/rwkv5-7b-8gpu.yaml
    deepspeed --no_local_rank --hostfile hosts.txt --module rwkvctl train ...   (multi-node; or torchrun --rdzv-*)
(`--no_local_rank`: the launcher would otherwise insert `--local_rank=N` before the subcommand; the
rank comes from the LOCAL_RANK environment variable either way.)
On a CPU-only machine DeepSpeed picks its CPU accelerator and we use gloo, so the same code path is
tested here with two processes (the first start JIT-builds a small comm op, cached afterwards).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from rwkvctl.data.loader import Batch
from rwkvctl.errors import CheckpointError, TrainingError
from rwkvctl.train import zero_layout
from rwkvctl.train.config import RunConfig
from rwkvctl.train.engine import Engine
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.optim import optimizer_groups, param_groups, set_lr
from rwkvctl.train.run_dir import CheckpointDir
from rwkvctl.train.segmented import segmented_backward, segmented_loss


def _checkpoint_records() -> list[type]:
    """The DeepSpeed types inside its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def enum_member(cls: object, name: object) -> enum.Enum:
    """Stands in for `builtins.getattr` while unpickling a DeepSpeed checkpoint. Python 3.11.0-3.11.4 pickle an enum
    member as `getattr(EnumClass, "NAME")`, so DeepSpeed's ZeroStageEnum records reach the unpickler that way; this
    answers only for an allowlisted Enum class and one of its member names, so `getattr` cannot fetch anything else."""
    allowed = [t for t in _checkpoint_records() if issubclass(t, enum.Enum)]
    if cls not in allowed or not isinstance(name, str) or name not in cls.__members__:  # type: ignore[attr-defined]
        raise pickle.UnpicklingError(f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r}) is not "
                                     "a DeepSpeed enum member")  # fmt: skip
    return cls[name]  # type: ignore[index]


def _checkpoint_types() -> list[Any]:
    """What torch.load(weights_only=True) may build from a DeepSpeed checkpoint: the record types, and the guarded
    getattr that older Pythons write for enum members. Allowlisted, they let us read ZeRO files without running any
    other pickled code."""
    return [*_checkpoint_records(), (enum_member, "builtins.getattr")]


def _allowlisted_names() -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in _checkpoint_records()} | {"builtins.getattr"}


def check_no_pickled_code(state_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint any of whose files would run code or build objects when unpickled.

    Only the pickle stream of each file is read (not its tensors), so every rank can check every file before
    DeepSpeed touches any of them: all ranks refuse together instead of one failing inside a collective."""
    allowed = _allowlisted_names()
    files = sorted(state_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{state_dir}: no DeepSpeed checkpoint files")
    for f in files:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception as e:  # not a zip-format torch file, a truncated archive, an unreadable pickle stream
            raise CheckpointError(f"{f}: unreadable DeepSpeed checkpoint file ({str(e).splitlines()[0][:160]}); "
                                  "resume from an earlier checkpoint") from None  # fmt: skip
        unsafe = sorted(set(found) - allowed)
        if unsafe:
            raise CheckpointError(f"{f}: holds pickled objects other than tensors and DeepSpeed's own records "
                                  f"({', '.join(unsafe[:3])}); it was not written by DeepSpeed for this run, so it "
                                  "is not loaded: resume from an earlier checkpoint")  # fmt: skip
        if "builtins.getattr" in found:
            _check_enum_lookups(f)


def _check_enum_lookups(f: Path) -> None:
    """A file that calls getattr (an enum member pickled by Python 3.11.0-3.11.4) is unpickled once, weights-only
    and memory-mapped (its tensor bytes are not read), so a getattr on anything but a DeepSpeed enum member is
    refused here, on every rank, before DeepSpeed reads the file."""
    try:
        with torch.serialization.safe_globals(_checkpoint_types()):
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{f}: holds a pickled lookup that is not a DeepSpeed enum member "
                              f"({str(e).splitlines()[0][:160]}); it is not loaded: resume from an earlier "
                              "checkpoint") from None  # fmt: skip


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every torch.load in this process weights-only, with DeepSpeed's record types allowed, even where
    DeepSpeed asks for weights_only=False: the backstop behind `check_no_pickled_code` for any file DeepSpeed
    reads while resuming."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # read by torch.load at every call
    try:
        with torch.serialization.safe_globals(_checkpoint_types()):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def read_zero_checkpoint(ckpt: CheckpointDir, expected: dict[str, tuple[int, ...]] | None = None,
                         ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], float]:
    """Per-parameter fp32 master weights, AdamW moments and the step count of a ZeRO-1/2 checkpoint written by
    `DeepSpeedEngine.save` with any number of ranks, read from its files without starting DeepSpeed.

    The ZeRO mapping (which part of which rank's flat tensors holds which parameter) is checked by
    rwkvctl.train.zero_layout before any tensor is sliced; `expected` (the model config's {name: shape}) must then
    match its shapes. -> (weights, {name: {"exp_avg", "exp_avg_sq"}}, step)."""
    state_dir = ckpt.deepspeed_state
    shards = sorted(state_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                    key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))  # fmt: skip
    if not shards:
        raise CheckpointError(f"{state_dir}: no ZeRO-1/2 optimizer shards (ZeRO-3 checkpoints are not supported)")
    ranks = [int(f.name.split("zero_pp_rank_")[1].split("_")[0]) for f in shards]
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{state_dir}: optimizer shards for ranks {ranks}; a complete checkpoint has one per "
                              "rank from 0 (copy every node's shards into this directory)")  # fmt: skip
    current = state_dir / "mp_rank_00_model_states.pt"
    try:
        with torch.serialization.safe_globals(_checkpoint_types()):
            # mmap: a 7B run's shards are ~90 GB; only the slices being gathered are read
            model_states = torch.load(current, map_location="cpu", weights_only=True, mmap=True)
            shapes = zero_layout.ZeroShapes.from_dict(model_states, current, expected)
            partitions = []
            for current in shards:
                data = torch.load(current, map_location="cpu", weights_only=True, mmap=True)
                partitions.append(zero_layout.ZeroPartition.from_dict(data, current, len(shards), shapes))
        return zero_layout.gather(shapes, partitions, state_dir)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{current}: unreadable ZeRO checkpoint file ({str(e).splitlines()[0][:160]})") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_dist_env() -> None:
    """Started without a launcher: become a world of one (same code path, no MPI discovery)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())})


def shm_allreduce_buffer(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp, DeepSpeed 0.1x) keeps this rank's
    buffer: a POSIX shm object named after the user, MASTER_ADDR, MASTER_PORT and the rank."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_name(rank: int) -> None:
    """Unlink this rank's shm allreduce buffer once every rank has mapped every buffer (the barrier). DeepSpeed
    creates one per rank when all ranks are local (~69 MB of RAM each, in /dev/shm) and never unlinks it, so each
    CPU launch leaked one per rank: a day of tests left 15 GB of RAM in /dev/shm. The mappings stay valid until the
    processes exit, and a killed run now leaves nothing behind."""
    dist.barrier()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        shm_allreduce_buffer(rank).unlink()


def ds_config(cfg: RunConfig, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """RWKV-LM's deepspeed_stage_2 preset (contiguous grads, overlap, reduce-scatter, buckets of ds_bucket_mb)."""
    t = cfg.train
    bucket = int(t.ds_bucket_mb * 1e6)
    zero: dict[str, Any] = {
        "stage": t.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_cuda,  # overlapping needs streams; the CPU accelerator has none
        "reduce_scatter": True,
        "allgather_bucket_size": bucket,
        "reduce_bucket_size": bucket,
    }
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    # A segmented window backpropagates one segment at a time; DeepSpeed sees each segment's backward as one of its
    # micro-steps (its ZeRO-2 buckets reduce every gradient once per micro-step), so it accumulates over
    # accum x segments of them and steps the optimizer once per window batch, as without segments.
    steps = t.accum * segments_per_window(cfg)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_bsz,
        "gradient_accumulation_steps": steps,
        "train_batch_size": t.micro_bsz * steps * world_size,
        "zero_optimization": zero,
        # ZeRO-1/2 skip a step with a non-finite grad norm only when this is on (the default since ~0.16)
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        out["gradient_clipping"] = cfg.optim.grad_clip
    return out


def segments_per_window(cfg: RunConfig) -> int:
    seg = cfg.train.segment_len
    return cfg.data.ctx_len // seg if seg and seg < cfg.data.ctx_len else 1


class DeepSpeedEngine(Engine):
    """ZeRO stage 1/2/3 data parallelism; bf16 params with fp32 master weights when precision=bf16."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        _ensure_dist_env()
        accel = get_accelerator()
        on_cuda = accel.device_name() == "cuda"
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if not on_cuda:  # the launcher's one-process runs make a buffer too (LOCAL_SIZE == world size == 1)
            release_shm_allreduce_name(self.rank)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(accel.device_name(local_rank)) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(self.device)
        self.model = model
        groups = optimizer_groups(param_groups(model, cfg.optim))
        o = cfg.optim
        if cfg.train.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer: Any = DeepSpeedCPUAdam(groups, lr=o.lr_init, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                              weight_decay=0.0, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr_init, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                          weight_decay=0.0, fused=True)  # CPU and CUDA both have it
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg, self.world_size, on_cuda)
        )
        if cfg.train.compile:
            self.ds.compile()
        self.zero_stage = self.ds.zero_optimization_stage()
        self.name = f"deepspeed-zero{self.zero_stage}"

    def micro_step(self, batch: Batch, accum: int) -> float:
        segments = segments_per_window(self.cfg)
        if segments > 1:
            return self._segmented_micro_step(batch, accum, segments)
        logits, _ = self.ds(batch.x.to(self.device))
        loss = lm_loss(logits, batch.y.to(self.device), use_l2wrap=self.cfg.train.l2wrap)
        del logits  # the loss keeps what backward needs; the (B, T, V) logits can go before backward runs
        value = float(loss.detach())
        if not torch.isfinite(loss):
            loss = self._zero_loss()
        self._backward(loss)
        return value

    def _zero_loss(self) -> Tensor:
        # DeepSpeed counts micro-steps itself, so a skipped one still goes through backward, with an exactly-zero loss
        return sum((p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad), torch.zeros(()))

    def _backward(self, loss: Tensor) -> None:
        self.ds.backward(loss)  # divides by gradient_accumulation_steps itself
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter

    def _segmented_micro_step(self, batch: Batch, accum: int, segments: int) -> float:
        """Exact backprop through a long window, segment by segment (train/segmented.py), each segment's backward
        one DeepSpeed micro-step. DeepSpeed takes a scalar loss and divides it by its accumulation count c, so a
        segment passes loss / c + sum(state_out * grad_in / c): its gradient is the same vector-Jacobian product
        as backward([loss, *state_out], [1, *grad_in]), and the gradient it leaves at the segment's initial state
        is again the true one for the segment before."""
        c = 1.0 / (accum * segments)
        done = 0

        def backward(loss: Tensor, outputs: list[Tensor], grads: list[Tensor]) -> None:
            nonlocal done
            surrogate = loss / c
            for out, grad in zip(outputs, grads, strict=True):
                surrogate = surrogate + (out * (grad.to(out.dtype) / c)).sum()
            self._backward(surrogate)
            done += 1

        value = segmented_backward(self.ds, batch.x, batch.y, self.cfg.train.segment_len, scale=1.0 / accum,
                                   l2wrap=self.cfg.train.l2wrap, device=self.device, backward=backward)
        for _ in range(segments - done):  # a non-finite segment: the rest still count as micro-steps
            self._backward(self._zero_loss())
        return value

    def optimizer_step(self, lr: float) -> float:
        """DeepSpeed computes the grad norm inside step(), so finiteness can only be judged afterwards. ZeRO-1/2
        (fp32, and bf16 with check_grad_overflow) see a non-finite norm as an overflow and skip the update; we
        report the norm and the loop counts a skipped step. Where DeepSpeed applied it anyway (ZeRO-3 checks
        overflow only under fp16, as do old releases) the weights are no longer trustworthy: stop, naming
        the way back, rather than train on."""
        set_lr(self.optimizer, lr)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is None:  # compute_grad_norm disabled in the DeepSpeed config: nothing to judge by
            return float("nan")
        value = float(norm)
        if not math.isfinite(value) and not getattr(self.optimizer, "overflow", False):
            raise TrainingError(f"non-finite gradient norm ({value}) was applied by DeepSpeed {self.name}, "
                                "which does not skip such steps; the weights are no longer valid: resume from "
                                "the last checkpoint with --resume (and a lower optim.lr_init)")
        return value

    def skip_step(self) -> None:
        # ZeRO keeps its gradients in private partitioned buffers; an update at lr 0 changes no weight
        # (AdamW's decay term is lr-scaled too). Adam's moments still see the finite micro-batches.
        set_lr(self.optimizer, 0.0)
        self.ds.step()

    def eval_loss(self, batch: Batch) -> float:
        with torch.no_grad():
            seg = self.cfg.train.segment_len
            if seg and batch.x.shape[1] > seg:  # a long window: one segment's activations at a time
                return segmented_loss(self.ds, batch.x, batch.y, seg, device=self.device)
            logits, _ = self.ds(batch.x.to(self.device))
            return float(lm_loss(logits, batch.y.to(self.device), use_l2wrap=False))

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()

    def save(self, ckpt: CheckpointDir) -> None:
        self.ds.save_checkpoint(str(ckpt.deepspeed_dir), tag=ckpt.DEEPSPEED_TAG, save_latest=False)

    def load(self, ckpt: CheckpointDir) -> None:
        if not ckpt.deepspeed_state.is_dir():
            if ckpt.engine_state.is_file():  # the single strategy's (or add-gate's) per-parameter state
                self._load_portable(ckpt.engine_state)
                return
            raise CheckpointError(f"{ckpt.deepspeed_dir}: no DeepSpeed state")
        check_no_pickled_code(ckpt.deepspeed_state)
        try:
            with weights_only_loads():
                path, _ = self.ds.load_checkpoint(str(ckpt.deepspeed_dir), tag=ckpt.DEEPSPEED_TAG,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{ckpt.deepspeed_dir}: refused to unpickle a non-tensor object "
                                  f"({str(e).splitlines()[0][:160]}); resume from an earlier checkpoint") from None
        if path is None:
            raise CheckpointError(f"{ckpt.deepspeed_dir}: DeepSpeed could not load this checkpoint")
        self._replay_cpu_adam_steps()

    def _replay_cpu_adam_steps(self) -> None:
        """--offload: DeepSpeedCPUAdam's C++ half keeps beta1^t and beta2^t itself, multiplying by beta once a step,
        but a fresh one first called at step t (after a resume) takes pow(beta, t) instead (csrc/includes/cpu_adam.h,
        IncrementStep), which can differ in the last bit (float 0.99^3). 1 - beta2^t magnifies that bit to ~2e-6 of
        the update, the fp32 master weights move by an ulp, some bf16 weights round the other way, and the resumed
        run drifts from the uninterrupted one. Replaying steps 1..t on empty tensors, the calls an optimizer step
        makes in the same order (only the powers change, ~1 us a call), gives it the running optimizer's products."""
        base = getattr(self.optimizer, "optimizer", None)
        if not hasattr(base, "ds_opt_adam"):  # not DeepSpeedCPUAdam
            return
        steps = max((int(s["step"]) for s in base.state.values() if "step" in s), default=0)
        empty = torch.empty(0)
        for t in range(1, steps + 1):
            for g in base.param_groups:
                beta1, beta2 = g["betas"]
                base.ds_opt_adam.adam_update(base.opt_id, t, 0.0, beta1, beta2, g["eps"], 0.0, g["bias_correction"],
                                             empty, empty, empty, empty)

    def _load_portable(self, path: Path) -> None:
        """Start from a per-parameter state (the single strategy's file, e.g. written by `add-gate` for a ZeRO run):
        module weights, fp32 master weights and AdamW moments are set parameter by parameter, so the ZeRO layout
        (rank count, flat groups) of whoever wrote it does not matter. Parameters without saved moments (new ones)
        start at zero; ZeRO keeps one step count per flat group, so they share the run's."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.zero_stage == 3:
            raise CheckpointError(f"{path}: a ZeRO-3 run cannot start from a per-parameter state yet; use stage 1/2")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            weights, saved = state["model"], state["optimizer"]
            groups = param_groups(self.model, self.cfg.optim)
            names = [n for g in groups for n in g["names"]]
            ids = [i for g in saved["param_groups"] for i in g["params"]]
            sizes = [len(g["params"]) for g in saved["param_groups"]]
            if sizes != [len(g["names"]) for g in groups]:
                raise ValueError(f"saved parameter groups of {sizes} parameters do not match this model's "
                                 "(optim.weight_decay or optim.layerwise_lr changed?)")  # fmt: skip
            moments = {name: saved["state"].get(i) for name, i in zip(names, ids, strict=True)}
            step = max((float(st["step"]) for st in moments.values() if st), default=0.0)
            self._materialize_optimizer_state(step)
            for name, p in self.model.named_parameters():
                w = weights[name].to(self.device, torch.float32)
                with torch.no_grad():
                    p.data.copy_(w.to(p.dtype))  # the (bf16) module weights the next forward uses
                safe_set_full_fp32_param(p, w)
                st = moments.get(name)
                for key in ("exp_avg", "exp_avg_sq"):
                    value = st[key].to(self.device, torch.float32) if st else torch.zeros_like(w)
                    safe_set_full_optimizer_state(p, value, key)
        except (KeyError, ValueError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot restore the training state ({str(e).splitlines()[0]})") from None

    def _materialize_optimizer_state(self, step: float) -> None:
        """AdamW creates its state at the first step, and ZeRO links each parameter to its slice of that state
        only then; a state restored before any step needs both now. One entry per flat fp32 partition, at the
        run's step count (ZeRO cannot keep per-parameter counts)."""
        base = self.optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                base.state[flat] = {
                    "step": torch.tensor(step, dtype=torch.float32, device=flat.device),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        self.optimizer._lazy_init_hp_params_optimizer_state()  # DeepSpeed's own hook for exactly this linking

    def export_state_dict(self) -> dict[str, Tensor]:
        if self.zero_stage == 3:
            full = self.ds._zero3_consolidated_16bit_state_dict()  # every rank must call; rank 0 gets it
            return {k: v.detach().cpu().clone() for k, v in (full or {}).items()}
        return super().export_state_dict()

    def close(self) -> None:
        # The process group stays up: deepspeed.comm caches it, and a second engine in the same process
        # (a benchmark, a notebook) must find it; it ends with the process.
        destroy = getattr(self.ds, "destroy", None)
        if destroy is not None:
            destroy()
