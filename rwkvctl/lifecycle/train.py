"""Python API of `rwkvctl train`: build the model, data and engine from a RunConfig, resume, run the loop.

    from rwkvctl.lifecycle.train import train
    result = train(RunConfig.from_yaml("examples/tiny-cpu.yaml"), resume="latest")

SIGINT/SIGTERM during training finish the current step, write a checkpoint and return with
`interrupted=True`; `resume="latest"` (or a step number) continues exactly where a checkpoint left off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rwkvctl.arch import DEFAULT_ARCH, arch_of  # runs saved before architectures were recorded are x052
from rwkvctl.data.loader import DataPosition, TrainWindows, ValWindows, dataset_tokenizer, open_train, open_val
from rwkvctl.dir_lock import writer_lock
from rwkvctl.errors import CheckpointError, ConfigError, TrainingError
from rwkvctl.lifecycle.models import check_fits_in_memory
from rwkvctl.model.registry import build_model, initialize
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.quant.format import load_checkpoint_expanded
from rwkvctl.train.config import RunConfig
from rwkvctl.train.engine import Engine, configure_determinism, load_deepspeed_engine, resolve_device
from rwkvctl.train.loop import FitOutcome, LoopContext, TrainProgress, fit
from rwkvctl.train.metrics import MetricsLog, WandbSink, mfu, peak_flops, truncate_after
from rwkvctl.train.run_dir import CheckpointDir, RunDir
from rwkvctl.train.run_state import CheckpointWriter, TrainerState, load_rng, read_state, write_run_config
from rwkvctl.train.schedule import planned_steps
from rwkvctl.train.single import SingleEngine

__all__ = ["TrainProgress", "TrainResult", "end_distributed", "resume_config", "train"]


@dataclass
class TrainResult:
    """Summary of one `train` invocation (a resumed run reports its totals so far)."""

    run_dir: Path
    step: int
    total_steps: int
    tokens: int
    steps_this_run: int
    final_loss: float | None
    val_loss: float | None
    last_checkpoint: Path | None
    export_path: Path | None
    resumed_from: int | None
    interrupted: bool
    elapsed_s: float
    tokens_per_s: float
    mfu: float | None
    peak_memory_bytes: int
    engine: str
    world_size: int
    nan_skips: int
    device: str
    stop_signal: int | None = None
    """The signal that stopped the run (SIGINT/SIGTERM), or None."""


class _StopFlag:
    """Set by the first SIGINT/SIGTERM; `signum` says which (the CLI exits 128 + signum after the checkpoint), and
    `notify` is told at once, so the user sees the request acknowledged before the step ends."""

    def __init__(self, notify: Callable[[int], None] | None = None) -> None:
        self.requested = False
        self.signum: int | None = None
        self.notify = notify

    def __call__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def _graceful_signals(flag: _StopFlag) -> Iterator[None]:
    """SIGINT/SIGTERM -> finish the step, checkpoint, exit. A second SIGINT interrupts immediately."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not flag.requested
        flag.requested, flag.signum = True, flag.signum or signum
        if first and flag.notify is not None:
            flag.notify(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _build_engine(model: RWKV5, cfg: RunConfig) -> Engine:
    if cfg.train.strategy == "deepspeed":
        return load_deepspeed_engine().DeepSpeedEngine(model, cfg)  # the only deepspeed importer, on demand
    return SingleEngine(model, cfg)


def _build_model(cfg: RunConfig) -> tuple[RWKV5, str | None]:
    # the fp32 weights alone, before the optimizer state: a lower bound, checked before anything is allocated
    check_fits_in_memory(4 * arch_of(cfg.model).param_count(cfg.model), f"a model of n_layer={cfg.model.n_layer}, "
                         f"n_embd={cfg.model.n_embd}", "check the model section / --set model.* values")
    # one micro-batch's logits (fp32) alone, also a lower bound: a huge micro_bsz or ctx_len from a file or flag
    batch_tokens = cfg.train.micro_bsz * (cfg.data.ctx_len + 1)
    check_fits_in_memory(4 * batch_tokens * cfg.model.vocab_size, f"a micro-batch of {cfg.train.micro_bsz} x "
                         f"{cfg.data.ctx_len} tokens", "check train.micro_bsz and data.ctx_len")
    model = build_model(cfg.model)
    if cfg.train.init_from:
        state_dict, meta = load_checkpoint_expanded(cfg.train.init_from)
        if meta.model != cfg.model:
            raise CheckpointError(f"{cfg.train.init_from}: its model config {meta.model} differs from the run's "
                                  f"{cfg.model}; fix the `model:` section")
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
        scheme = f"from:{cfg.train.init_from}"
    else:
        initialize(model, cfg.train.init, seed=cfg.train.seed)
        scheme = cfg.train.init
    model.gradient_checkpointing = cfg.train.grad_checkpointing
    return model, scheme


def _create_run_dir(cfg: RunConfig) -> RunDir:
    run = RunDir(cfg.run_dir)
    try:
        run.create()
    except OSError as e:
        raise TrainingError(f"run dir {run} is not writable ({e.strerror}); choose another --run-dir") from None
    return run


def _hold_run_dir(cfg: RunConfig, run: RunDir) -> contextlib.AbstractContextManager[None]:
    """One `train` per run dir at a time. The ranks of one DeepSpeed launch are one writer: rank 0 holds the lock
    for all of them, taken before the process group exists (the rank comes from the launcher's RANK). A refused
    rank 0 exits with the error before the rendezvous; the launcher (deepspeed, torchrun) then stops the ranks
    waiting in it, none of which has written anything yet."""
    if cfg.train.strategy == "deepspeed" and int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return writer_lock(run.path, "rwkvctl train")


def resume_config(run_dir: str | Path, which: str | int = "latest") -> RunConfig | None:
    """The config a resume without --config continues: the run's run_config.yaml; where that is missing (deleted,
    or a run or add-gate of an older version killed before writing it) the resolved config saved in the checkpoint
    resumed from, which is what run_config.yaml would hold. None when the run dir holds neither (a run stopped
    before it started: there is nothing to continue)."""
    run = RunDir(run_dir)
    if run.config_file.is_file():
        return RunConfig.from_yaml(run.config_file)
    ckpt = run.find(which)
    if ckpt is None:
        return None
    saved = read_state(ckpt)
    if not saved.config:
        raise ConfigError(f"{run}: no run_config.yaml, and {ckpt.trainer_state} records no config; resume with "
                          "--config (the run's settings)")
    return RunConfig.from_dict(saved.config, source=str(ckpt.trainer_state))


def _prepare_run_dir(cfg: RunConfig, resume: str | int | None) -> CheckpointDir | None:
    """Checks before anything heavy (with the run dir held); returns the checkpoint to resume from, or None for a
    fresh run."""
    run = RunDir(cfg.run_dir)
    if run.branch_note.is_file() and not run.checkpoints():
        # add-gate commits its checkpoint last: a kill before that leaves the branch's files without it, and a
        # fresh start here would train the gated model from scratch under the branch's name
        raise TrainingError(f"{run}: an add-gate into it stopped before committing its checkpoint (branch.json, no "
                            "checkpoint); run that add-gate again, it replaces what is here")
    if resume is None:
        if run.checkpoints():
            raise TrainingError(f"{run} already holds checkpoints; pass --resume to continue it, "
                                "or choose a new --run-dir")
        return None
    return run.find(resume)


# Settings that decide which tokens each step reads (and how tokens are counted): a resume that changed one
# would silently train on a different data order than the run it continues.
_DATA_SETTINGS = ("data.path", "data.ctx_len", "data.sampling", "train.micro_bsz", "train.accum", "train.seed")


def _check_data_settings(ckpt: CheckpointDir, saved: dict[str, Any], cfg: RunConfig) -> None:
    now = cfg.to_dict()
    for key in _DATA_SETTINGS:
        section, name = key.split(".")
        if name not in saved.get(section, {}):
            continue  # written by a version that did not record it
        old, new = saved[section][name], now[section][name]
        # the same dataset may be named relatively or absolutely
        same = Path(old).resolve() == Path(new).resolve() if key == "data.path" else old == new
        if not same:
            raise CheckpointError(f"{ckpt}: saved with {key}={old!r}, but this run has {key}={new!r}; resuming "
                                  f"would change the data order: use {old!r} (or start a new --run-dir)")


def train(cfg: RunConfig, *, resume: str | int | None = None,
          on_progress: Callable[[TrainProgress], None] | None = None) -> TrainResult:
    """Train (or continue training) the run described by `cfg`; see the module docstring."""
    cfg.validate()
    if cfg.train.strategy == "single":
        resolve_device(cfg.train.device)  # a bad or unavailable device fails before any model is built
    with _hold_run_dir(cfg, _create_run_dir(cfg)):  # held until the last checkpoint and metrics line are written
        if int(os.environ.get("RANK", "0")) == 0:  # before `latest` is chosen: a replace cut between its renames
            CheckpointWriter(RunDir(cfg.run_dir), cfg.train.keep_last).remove_stale_temps()  # and killed saves' temps
        ckpt = _prepare_run_dir(cfg, resume)
        if ckpt is None and int(os.environ.get("RANK", "0")) == 0:
            # a fresh start records its config before anything heavy: killed before the first checkpoint, the run
            # dir then says what it was, and `--resume` restarts it with the same settings
            _write_config(cfg, RunDir(cfg.run_dir))
        if resume is not None and ckpt is None and on_progress is not None:  # e.g. a requeued job's first start
            on_progress(TrainProgress("message", 0, 0, 0, message=f"--resume: {RunDir(cfg.run_dir)} holds no "
                                      "checkpoint yet, so this is a fresh start"))
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        configure_determinism(cfg)
        try:
            model, scheme = _build_model(cfg)
            engine = _build_engine(model, cfg)
            try:
                return _run(cfg, engine, ckpt, scheme, on_progress)
            finally:
                engine.close()
        finally:  # a process-wide switch: give the caller back what it had
            torch.use_deterministic_algorithms(was_deterministic)


def end_distributed() -> None:
    """For a process that owns its distributed run (the CLI): tear the process group down after a successful run.
    Left to interpreter exit, gloo's worker threads can abort the process ("terminate called without an active
    exception") after all the work is done. Not after a failure: other ranks may still be inside a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _check_ranks_agree(engine: Engine, ckpt: CheckpointDir | None) -> None:
    """Every rank chose its checkpoint on its own, while rank 0 may have been finishing a replace a killed run cut
    (`remove_stale_temps`): refuse, on every rank alike, unless they all chose the same one (n * sum(s^2) equals
    sum(s)^2 only when every s is equal)."""
    if engine.world_size <= 1:
        return
    step = -1.0 if ckpt is None else float(ckpt.step)
    total, squares, ranks = engine.all_reduce_sum([step, step * step, 1.0])
    if abs(ranks * squares - total * total) > 0.5:
        raise TrainingError(f"the {int(ranks)} ranks chose different checkpoints to resume from (this rank: "
                            f"{'none' if ckpt is None else ckpt.step}); a killed save was being finished while they "
                            "looked: run the same command again")


def _run(cfg: RunConfig, engine: Engine, ckpt: CheckpointDir | None, scheme: str | None,
         on_progress: Callable[[TrainProgress], None] | None) -> TrainResult:
    run = RunDir(cfg.run_dir)
    windows, val = _open_data(cfg)
    world = engine.world_size
    total_steps = planned_steps(max_steps=cfg.train.max_steps, max_tokens=cfg.train.max_tokens,
                                tokens_per_step=cfg.tokens_per_step(world),
                                pass_steps=windows.windows_per_pass // cfg.samples_per_step(world))
    writer = CheckpointWriter(run, cfg.train.keep_last)
    _check_ranks_agree(engine, ckpt)
    state, resumed_from = _start_state(cfg, engine, ckpt, writer)
    engine.barrier()
    metrics, wandb = _open_sinks(cfg, engine, run)
    def acknowledge(signum: int) -> None:
        if on_progress is not None and engine.is_main:
            on_progress(TrainProgress("message", state.step, total_steps, state.position.tokens,
                                      message=f"{signal.Signals(signum).name}: stopping after this step, with a "
                                      "checkpoint (Ctrl-C again to abort without one)"))

    if state.step >= total_steps and cfg.train.start_step:
        raise TrainingError(f"train.start_step={cfg.train.start_step} is not before the planned {total_steps} steps; "
                            "raise --max-steps/--max-tokens")
    stop = _StopFlag(acknowledge)
    ctx = LoopContext(engine=engine, cfg=cfg, windows=windows, val=val, writer=writer, total_steps=total_steps,
                      metrics=metrics, wandb=wandb, on_progress=on_progress, stop_requested=stop,
                      init_scheme=scheme, tokenizer=dataset_tokenizer(cfg.data.path))
    if on_progress is not None and engine.is_main:
        where = f"resuming from step {resumed_from}" if resumed_from is not None else "fresh run"
        if ckpt is None and cfg.train.start_step:
            where = (f"taking over {cfg.train.init_from} at step {state.step} ({state.position.tokens:,} tokens): "
                     "schedule and data position placed there, AdamW moments start fresh")
        on_progress(TrainProgress("message", state.step, total_steps, state.position.tokens,
                                  message=f"{where}; {engine.name} x{world} on {engine.device}; "
                                  f"{windows.windows_per_pass} windows per pass; {total_steps} steps planned"))
    t0 = time.perf_counter()
    try:
        with _graceful_signals(stop):
            out = fit(ctx, state, resumed=ckpt is not None)
    finally:
        for sink in (metrics, wandb):
            if sink is not None:
                sink.close()
    result = _result(cfg, engine, run, out, total_steps, resumed_from, time.perf_counter() - t0)
    result.stop_signal = stop.signum if out.interrupted else None
    return result


def _open_data(cfg: RunConfig) -> tuple[TrainWindows, ValWindows | None]:
    windows = open_train(cfg.data.path, cfg.data.ctx_len, mode=cfg.data.sampling, seed=cfg.train.seed,
                         vocab_size=cfg.model.vocab_size)
    val = None
    if cfg.data.val_every:
        val = open_val(cfg.data.path, cfg.data.val_path, cfg.data.ctx_len,
                       max_windows=cfg.data.val_batches * cfg.train.micro_bsz, vocab_size=cfg.model.vocab_size)
    return windows, val


def _start_state(cfg: RunConfig, engine: Engine, ckpt: CheckpointDir | None,
                 writer: CheckpointWriter) -> tuple[TrainerState, int | None]:
    """The state the loop starts from: fresh, or restored from `ckpt` (engine, RNG, position) after checking that
    it belongs to this run. Also moves aside what a resume abandons. -> (state, step resumed from or None)."""
    world = engine.world_size
    if ckpt is None:
        if engine.is_main:
            # A fresh start (e.g. after a run killed before its first checkpoint) must not append to old records:
            # they would repeat step numbers. They are moved to the superseded metrics file, not deleted.
            truncate_after(writer.run, 0)
        samples = cfg.train.start_step * cfg.samples_per_step(world)  # 0 unless taking a run over at a step
        return TrainerState(step=cfg.train.start_step, position=DataPosition.at(samples, cfg.data.ctx_len),
                            world_size=world, engine=engine.name, config=cfg.to_dict()), None
    saved = read_state(ckpt)
    _check_resumable(ckpt, saved, cfg, engine)
    engine.load(ckpt)
    load_rng(ckpt, engine.rank)
    state = TrainerState(step=saved.step, position=saved.position,
                         elapsed_s=saved.elapsed_s, nan_skips=saved.nan_skips, world_size=world,
                         engine=engine.name, config=cfg.to_dict())
    if engine.is_main:
        writer.supersede_after(saved.step)
        truncate_after(writer.run, saved.step)
    return state, saved.step


def _check_resumable(ckpt: CheckpointDir, saved: TrainerState, cfg: RunConfig, engine: Engine) -> None:
    """Refuse a resume that would not continue the saved run: another model, data order or ZeRO sharding."""
    saved_model = saved.config.get("model")
    if saved_model is not None and {"architecture": DEFAULT_ARCH, **saved_model} != cfg.model.to_dict():
        raise CheckpointError(f"{ckpt}: saved with model {saved_model}, but the run config says "
                              f"{cfg.model.to_dict()}; resume with the run's own run_config.yaml")
    _check_data_settings(ckpt, saved.config, cfg)
    if "ctx_len" in saved.config.get("data", {}):  # the saved run's ctx_len (the same as this one's, checked above)
        saved.position.check(cfg.data.ctx_len, str(ckpt.trainer_state), CheckpointError)
    world = engine.world_size
    if saved.engine.startswith("deepspeed") and engine.name.startswith("deepspeed") and saved.world_size != world:
        raise CheckpointError(f"{ckpt}: written by {saved.world_size} DeepSpeed processes, resumed with {world}; "
                              "ZeRO optimizer state is sharded per rank, so resume with the same process count")


def _open_sinks(cfg: RunConfig, engine: Engine, run: RunDir) -> tuple[MetricsLog | None, WandbSink | None]:
    """Rank 0: record the resolved config, open the metrics log and the optional W&B mirror."""
    if not engine.is_main:
        return None, None
    _write_config(cfg, run)
    metrics = MetricsLog(run)
    wandb = WandbSink(cfg.train.wandb, run, cfg.to_dict()) if cfg.train.wandb else None
    return metrics, wandb


def _write_config(cfg: RunConfig, run: RunDir) -> None:
    try:
        # --stop-after-steps belongs to this invocation: a later --resume must not stop early again
        write_run_config(run, cfg.with_overrides({"train.stop_after_steps": 0}).to_yaml())
    except OSError as e:
        raise TrainingError(f"cannot write {run.config_file} ({e.strerror})") from None


def _result(cfg: RunConfig, engine: Engine, run: RunDir, out: FitOutcome, total_steps: int,
            resumed_from: int | None, wall: float) -> TrainResult:
    world = engine.world_size
    # Throughput over this invocation's steps, excluding the first (warm-up, lazy kernel builds) when we can.
    times = out.step_times[1:] if len(out.step_times) > 2 else out.step_times
    tps = (len(times) * cfg.tokens_per_step(world) / sum(times)) if times and sum(times) > 0 else 0.0
    device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    return TrainResult(
        run_dir=run.path, step=out.state.step, total_steps=total_steps, tokens=out.state.position.tokens,
        steps_this_run=out.steps_this_run, final_loss=out.last_loss, val_loss=out.last_val_loss,
        last_checkpoint=out.last_checkpoint, export_path=out.export_path, resumed_from=resumed_from,
        interrupted=out.interrupted, elapsed_s=wall, tokens_per_s=tps,
        mfu=mfu(tps, cfg.model, peak_flops(device_name, cfg.train.peak_tflops), world),
        peak_memory_bytes=engine.peak_memory(), engine=engine.name, world_size=world,
        nan_skips=out.state.nan_skips, device=device_name,
    )
