"""Run configuration for `rwkvctl train`: plain dataclasses, YAML is only their serialized form.

Precedence: dataclass defaults < `--config run.yaml` < explicit overrides (CLI flags / `--set a.b=v`).
The resolved config is written into the run directory and into every checkpoint, so a resume (or a
reader months later) knows exactly what was run. stdlib + yaml only, like rwkvctl.config.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rwkvctl.arch import DEFAULT_ARCH, arch_of, get_arch
from rwkvctl.config import ModelConfig, preset
from rwkvctl.errors import ConfigError

SAMPLING_MODES = ("magic_prime", "random")
STRATEGIES = ("single", "deepspeed")
PRECISIONS = ("fp32", "bf16")
EXPORT_DTYPES = ("auto", "fp32", "bf16")
NAN_POLICIES = ("skip", "stop")
MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class DataConfig:
    """Where the tokens come from and how windows are drawn."""

    path: str = ""
    """prepare's output: a manifest.json, a directory holding one, or a binidx prefix (RWKV-LM make_data.py)."""
    ctx_len: int = 512
    """Tokens per training window (each window reads ctx_len+1 tokens: inputs and shifted targets)."""
    sampling: str = "magic_prime"
    """magic_prime: RWKV-LM's scrambled order, every window exactly once per pass; random: uniform offsets."""
    val_path: str = ""
    """Validation data (default: the manifest's val split, if it has one)."""
    val_every: int = 0
    """Evaluate the validation loss every N optimizer steps (0: never)."""
    val_batches: int = 4
    """Micro-batches per validation evaluation (always the same windows, so evaluations compare)."""


@dataclass
class OptimConfig:
    """AdamW and its schedule; defaults are the published RWKV-5 7B run's."""

    lr_init: float = 2e-4
    """Peak learning rate (reached after warm-up)."""
    lr_final: float = 1.47e-4
    """Learning rate at the end of the planned run (cosine decay from lr_init)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up (0.01 -> 1.0 of lr_init), counted from the run's first step, not the resume."""
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay, applied only to 2-D `.weight` matrices (RWKV-LM's decay group)."""
    layerwise_lr: bool = True
    """RWKV-LM's per-parameter lr scales: time_decay 2x, time_faaaa 1x, everything else 1x."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""


@dataclass
class TrainConfig:
    """How long, how big, on what, and what to write."""

    micro_bsz: int = 8
    """Sequences per micro-batch per process."""
    accum: int = 1
    """Gradient accumulation: micro-batches per optimizer step."""
    max_steps: int = 0
    """Planned optimizer steps (0: derived from max_tokens, else one pass over the data)."""
    max_tokens: int = 0
    """Planned training tokens, counted as steps*micro_bsz*ctx_len*accum*world_size."""
    stop_after_steps: int = 0
    """Stop (with a checkpoint) after this many steps of *this* invocation, without changing the plan (0: off)."""
    seed: int = 0
    """Seeds the initialisation, the data order and every RNG."""
    strategy: str = "single"
    """single: one plain PyTorch process; deepspeed: ZeRO data parallel (launch with `deepspeed`/`torchrun`)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    offload: bool = False
    """DeepSpeed: keep optimizer state on the CPU (ZeRO-Offload)."""
    ds_bucket_mb: int = 200
    """DeepSpeed all-gather / reduce bucket size in MB (RWKV-LM --ds_bucket_mb)."""
    precision: str = "fp32"
    """fp32 or bf16 (deepspeed: bf16 weights with fp32 master copy; single: bf16 autocast)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    init: str = "v5.2-2023"
    """Initialisation scheme for a fresh model."""
    init_from: str = ""
    """Start from these weights (.pth/.safetensors) instead of a fresh init (finetuning)."""
    start_step: int = 0
    """With init_from: continue at this optimizer step, taking a run over from its weights alone (e.g. an RWKV-LM
    checkpoint): the lr schedule and the data position are placed there, AdamW's moments start fresh (0: start at
    step 0)."""
    export_dtype: str = "auto"
    """dtype of the exported rwkv-N.pth: auto (the training precision; bf16 runs export bf16 as RWKV-LM does, half
    the size), fp32 or bf16."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (less memory, ~30% more compute)."""
    segment_len: int = 0
    """Long windows: backpropagate through data.ctx_len in segments of this many tokens (a divisor of ctx_len),
    exactly (full BPTT), with the memory of one segment (0: the whole window at once). Any strategy."""
    l2wrap: bool = True
    """RWKV-LM's L2Wrap: a tiny penalty on the largest logit that keeps logits from drifting."""
    compile: bool = False
    """torch.compile the model."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms (bit-exact resume on CPU fp32)."""
    nan_policy: str = "skip"
    """On a NaN/Inf loss: skip the step (no update) or stop with an error."""
    max_nan_skips: int = 10
    """With nan_policy=skip: stop after this many consecutive skipped steps."""
    save_every: int = 200
    """Checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (older ones are deleted after a new one is complete)."""
    log_every: int = 1
    """Write a metrics.jsonl record every N steps."""
    wandb: str = ""
    """Weights & Biases project (empty: off). WANDB_MODE=offline works without network."""
    peak_tflops: float = 0.0
    """Accelerator peak TFLOP/s for the MFU estimate (0: guess from the GPU name; none on CPU)."""


@dataclass
class RunConfig:
    """One training run: model + data + optimizer + trainer settings, and where it lives."""

    run_dir: str = "runs/run"
    """Run directory: checkpoints, metrics.jsonl, run_config.yaml."""
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        d, o, t = self.data, self.optim, self.train
        positive = {"data.ctx_len": d.ctx_len, "train.micro_bsz": t.micro_bsz, "train.accum": t.accum,
                    "train.save_every": t.save_every, "train.keep_last": t.keep_last, "train.log_every": t.log_every}
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"run config: {key} must be a positive integer, got {value!r}")
        for key, value in {"train.max_steps": t.max_steps, "train.max_tokens": t.max_tokens,
                           "optim.warmup_steps": o.warmup_steps, "data.val_every": d.val_every,
                           "train.stop_after_steps": t.stop_after_steps, "train.start_step": t.start_step}.items():
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"run config: {key} must be a non-negative integer, got {value!r}")
        choices = {"data.sampling": (d.sampling, SAMPLING_MODES), "train.strategy": (t.strategy, STRATEGIES),
                   "train.precision": (t.precision, PRECISIONS), "train.nan_policy": (t.nan_policy, NAN_POLICIES),
                   "train.init": (t.init, arch_of(self.model).init_schemes),
                   "train.export_dtype": (t.export_dtype, EXPORT_DTYPES)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"run config: {key}={value!r}; choose one of {', '.join(allowed)}")
        for section in (d, o, t):  # `nan` and `inf` parse as floats but would poison or stall the run
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"run config: {type(section).__name__.removesuffix('Config').lower()}."
                                      f"{f.name} must be a finite number, got {value!r}")
        if not isinstance(t.device, str) or not DEVICE_PATTERN.match(t.device):
            raise ConfigError(f"run config: train.device={t.device!r}; use cpu, cuda, cuda:N or auto")
        if t.peak_tflops < 0:
            raise ConfigError(f"run config: train.peak_tflops must be >= 0, got {t.peak_tflops}")
        if t.segment_len < 0:
            raise ConfigError(f"run config: train.segment_len must be >= 0, got {t.segment_len}")
        if t.segment_len > d.ctx_len:
            raise ConfigError(f"run config: train.segment_len={t.segment_len} is larger than data.ctx_len={d.ctx_len}; "
                              "use a segment_len that divides ctx_len (0: the whole window at once)")
        if t.segment_len and d.ctx_len % t.segment_len:
            # equal segments: one segment size to plan memory for, and no short tail segment (a slow kernel call)
            raise ConfigError(f"run config: train.segment_len={t.segment_len} does not divide data.ctx_len="
                              f"{d.ctx_len}; use a divisor such as {_divisor_near(d.ctx_len, t.segment_len)}")
        if t.zero_stage not in (1, 2, 3):
            raise ConfigError(f"run config: train.zero_stage must be 1, 2 or 3, got {t.zero_stage!r}")
        if o.lr_init <= 0 or o.lr_final < 0:
            raise ConfigError(f"run config: need optim.lr_init > 0 and optim.lr_final >= 0, "
                              f"got {o.lr_init} and {o.lr_final}")
        if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.adam_eps <= 0:
            raise ConfigError("run config: optim.beta1/beta2 must be in [0, 1) and optim.adam_eps > 0")
        if o.grad_clip < 0 or o.weight_decay < 0:
            raise ConfigError("run config: optim.grad_clip and optim.weight_decay must be >= 0")
        if t.start_step and not t.init_from:
            raise ConfigError("run config: train.start_step places a run taken over from its weights; it needs "
                              "train.init_from (to continue an rwkvctl run, use --resume)")
        if not self.run_dir:
            raise ConfigError("run config: run_dir is empty")

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens consumed by one optimizer step (RWKV-LM forgot the accum factor; we do not)."""
        return self.train.micro_bsz * self.data.ctx_len * self.train.accum * world_size

    def samples_per_step(self, world_size: int = 1) -> int:
        return self.train.micro_bsz * self.train.accum * world_size

    # --- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config must be a mapping, got {type(data).__name__}")
        known = {"run_dir", "model", "data", "optim", "train"}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "run_dir" in data:
            kwargs["run_dir"] = str(data["run_dir"])
        if "model" in data:
            kwargs["model"] = _model_from(data["model"], source)
        for name, klass in (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig)):
            if name in data:
                kwargs[name] = _section(klass, data[name] or {}, f"{source}: {name}")
        try:
            return cls(**kwargs)
        except ConfigError as e:  # validate() knows the key, not where the values came from: name the file
            raise ConfigError(f"{source}: {str(e).removeprefix('run config: ')}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        try:
            with open(p, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"{p}: run config not found") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the run config ({e.strerror or e})") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: over {MAX_CONFIG_BYTES >> 20} MiB, which no run config is; is it the right file?")
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a run config is a UTF-8 YAML file") from None
        except RecursionError:
            raise ConfigError(f"{p}: not a run config (nested too deeply)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        return cls.from_dict(data or {}, source=str(p))

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys replaced: {"optim.lr_init": 1e-3, "model.n_layer": 4, "run_dir": "x"}."""
        data = self.to_dict()
        if "model.preset" in overrides:  # a preset replaces the whole model section; field overrides follow
            overrides = dict(overrides)
            data["model"] = {"preset": overrides.pop("model.preset")}
        for key, value in overrides.items():
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override {key!r}: {part!r} is not a config section")
                node = node[part]
            if parts[-1] not in node and not (parts[0] == "model" and "preset" in node):
                raise ConfigError(f"override {key!r}: unknown key; known here: {sorted(node)}")
            node[parts[-1]] = value
        return RunConfig.from_dict(data, source="overrides")


def _divisor_near(n: int, target: int) -> int:
    """The divisor of n closest to target (ties: the smaller), for the error line's suggestion."""
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return min(divisors, key=lambda d: (abs(d - target), d))


def _model_from(data: Any, source: str) -> ModelConfig:
    """A model section: the fields of its architecture's config (`architecture: ID`, default x052), optionally
    `preset: NAME` (one of that architecture's presets) with field overrides on top."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: model must be a mapping")
    try:
        spec = get_arch(data.get("architecture", DEFAULT_ARCH))
    except ConfigError as e:
        raise ConfigError(f"{source}: model.architecture: {e}") from None
    # CLI overrides arrive as strings: coerce each to its field's type (keys the class lacks are reported below)
    kinds = typing.get_type_hints(spec.config_class)
    data = {k: (_coerce(v, kinds[k], f"{source}: model.{k}") if kinds.get(k) in (int, bool, str) else v)
            for k, v in data.items()}
    name = data.pop("preset", None)
    if name is None:
        return spec.config_class.from_dict(data, source=source)
    if name not in spec.presets:
        raise ConfigError(f"{source}: unknown model preset {name!r}; choose one of {', '.join(spec.presets)}")
    base = {**spec.presets[name], **data}
    return spec.config_class.from_dict(base, source=source)


def _section(klass: type, data: Any, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(fields)}")
    out = {}
    for key, value in data.items():
        default = fields[key].default
        out[key] = _coerce(value, type(default), f"{source}.{key}")
    return klass(**out)


def _coerce(value: Any, kind: type, where: str) -> Any:
    """YAML/CLI values into the field's type (YAML reads `1e-4` as a string; CLI overrides are strings)."""
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        if kind is float:
            return float(value)
        if kind is str:
            if isinstance(value, (bool, list, dict)):  # YAML's `yes`, a list or a mapping: never meant as text
                raise TypeError(value)
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    return value


@functools.cache
def field_docs() -> dict[str, str]:
    """Dotted config key -> the docstring under that field ("train.micro_bsz" -> "Sequences per micro-batch ...").

    The attribute docstrings above are the one text about each setting: `rwkvctl train --help` shows them too. Read
    from the source with ast (Python keeps no attribute docstrings at run time), so no import beyond this module's.
    """
    sections = {"": RunConfig, "model.": ModelConfig, "data.": DataConfig, "optim.": OptimConfig,
                "train.": TrainConfig}
    return {prefix + name: doc for prefix, klass in sections.items() for name, doc in _attribute_docs(klass).items()}


def _attribute_docs(klass: type) -> dict[str, str]:
    """field -> docstring of a dataclass defined at the top level of its module (whitespace folded to spaces)."""
    path = sys.modules[klass.__module__].__file__
    assert path is not None
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == klass.__name__)
    docs = {}
    for field_node, after in zip(node.body, node.body[1:], strict=False):  # a field's docstring follows it
        if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field_node.target.id] = " ".join(after.value.value.split())
    return docs
