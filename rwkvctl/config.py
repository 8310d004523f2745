"""The RWKV-5.2 ("x052") model configuration, presets and RWKV-LM parameter table.

stdlib + yaml only: the CLI imports this for `--help`-time work (preset names, parameter counts with
`--meta`) without pulling in torch. The shape table below is the single source of truth for RWKV-LM
`.pth` names and shapes. Everything here is registered as the x052 entry of the architecture registry
(`rwkvctl.arch`); code that should work for any architecture reads it through the registry.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, replace
from typing import Any

from rwkvctl.errors import ConfigError
from rwkvctl.names import INIT_SCHEMES as INIT_SCHEMES  # re-exported: the init schemes are model config

X052 = "x052"  # the architecture id ModelConfig describes (RWKV-LM's name for RWKV-5.2)
WORLD_VOCAB_SIZE = 65536
MAX_DIM = 1 << 31  # any one size of a model config (layers, widths, vocabulary); real ones are far below


def default_dim_ffn(n_embd: int) -> int:
    """RWKV-LM's x052 FFN width: 3.5x n_embd floored to a multiple of 32, with or without the gate.

    One rule for both layouts because add-gate keeps the FFN as it is: the 7B's gate-less phase already had its
    final 14336 = 3.5 x 4096, and RWKV-LM picks 3.5x for v5 whatever the gate (4x only under its `-f4` switch;
    give model.dim_ffn explicitly for that).
    """
    return int((n_embd * 3.5) // 32 * 32)


@dataclass
class ModelConfig:
    """Architecture of an RWKV-5.2 (x052) model."""

    n_layer: int
    """Number of blocks."""
    n_embd: int
    """Residual width C."""
    vocab_size: int = WORLD_VOCAB_SIZE
    """Rows of emb/head. 65536 for the RWKV World tokenizer."""
    head_size: int = 64
    """Channels per WKV head N (RWKV-LM `head_size_a`)."""
    head_size_divisor: int = 8
    """ln_x is applied to y / head_size_divisor (eps 1e-5), i.e. eps 1e-5*hsd^2 on y."""
    dim_att: int = 0
    """Attention width A (0: n_embd)."""
    dim_ffn: int = 0
    """FFN hidden width F (0: 3.5x n_embd floored to 32, with or without the gate)."""
    gate: bool = True
    """v5.2 output gate (att.gate + time_mix_g). False is the gate-less v5 layout."""
    architecture: str = X052
    """Architecture id (rwkvctl.arch), recorded in every file; always x052 for this class."""

    def __post_init__(self) -> None:
        if self.architecture != X052:
            # the registry (rwkvctl.arch.config_from_dict) picks the config class by id before building one
            raise ConfigError(f"model config: ModelConfig holds the {X052} fields, got architecture "
                              f"{self.architecture!r}")
        for name in ("n_layer", "n_embd", "vocab_size", "head_size", "head_size_divisor", "dim_att", "dim_ffn"):
            value = getattr(self, name)
            zero_ok = name in ("dim_att", "dim_ffn")  # 0: derived from n_embd below
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
            if value > MAX_DIM:  # sizes come from files and flags: keep the arithmetic on them finite
                raise ConfigError(f"model config: {name}={value} is beyond any model (at most {MAX_DIM})")
        if self.dim_att == 0:
            self.dim_att = self.n_embd
        if self.dim_ffn == 0:
            self.dim_ffn = default_dim_ffn(self.n_embd)
        if not isinstance(self.gate, bool):
            raise ConfigError(f"model config: gate must be true or false, got {self.gate!r}")
        for name in ("n_embd", "dim_att", "dim_ffn"):
            if getattr(self, name) % 32:
                raise ConfigError(
                    f"model config: {name}={getattr(self, name)} must be a multiple of 32 (RWKV-LM asserts it)"
                )
        if self.dim_att % self.head_size:
            raise ConfigError(f"model config: dim_att={self.dim_att} is not a multiple of head_size={self.head_size}")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("n_layer", "n_embd") if k not in data]
        if missing:
            raise ConfigError(f"{source}: model config is missing {missing}")
        try:
            return cls(**data)
        except ConfigError as e:  # the checks in __post_init__ know the field, not the file
            raise ConfigError(f"{source}: {e}") from None


PRESETS: dict[str, dict[str, Any]] = {
    # tiny: for tests and the quick start; World vocab so that real tokenized data fits.
    "tiny": {"n_layer": 2, "n_embd": 128},
    "0.1b": {"n_layer": 12, "n_embd": 768},
    "0.4b": {"n_layer": 24, "n_embd": 1024},
    "1.5b": {"n_layer": 24, "n_embd": 2048},
    "3b": {"n_layer": 32, "n_embd": 2560},
    "7b": {"n_layer": 32, "n_embd": 4096},  # the PygmalionAI / RWKV-5 7B shape
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build the config of a named preset, with field overrides (e.g. gate=False)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an RWKV-LM x052 state dict, in RWKV-LM's registration order."""
    C, A, F, V = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size
    H, N = cfg.n_head, cfg.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2") + (("ln0",) if i == 0 else ()):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        mixes = ("k", "v", "r", "g") if cfg.gate else ("k", "v", "r")
        for m in mixes:
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        shapes[p + "att.time_decay"] = (H, N)
        shapes[p + "att.time_faaaa"] = (H, N)
        for lin in ("receptance", "key", "value"):
            shapes[p + f"att.{lin}.weight"] = (A, C)
        shapes[p + "att.output.weight"] = (C, A)
        if cfg.gate:
            shapes[p + "att.gate.weight"] = (A, C)
        shapes[p + "att.ln_x.weight"] = (A,)
        shapes[p + "att.ln_x.bias"] = (A,)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def _count(cfg: ModelConfig) -> int:
    total = 0
    for shape in param_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def param_count(cfg: ModelConfig) -> int:
    """Exact parameter count, without allocating anything and in time independent of n_layer (every block has
    the same tensors), so a config from an untrusted file or flag can be sized before anything is built."""
    one, two = _count(replace(cfg, n_layer=1)), _count(replace(cfg, n_layer=2))
    return one + (cfg.n_layer - 1) * (two - one)


def infer_config(shapes: dict[str, tuple[int, ...]], *, source: str = "checkpoint") -> ModelConfig:
    """Recover the architecture of a bare RWKV-LM x052 state dict from its tensor shapes."""
    try:
        V, C = shapes["emb.weight"]
        layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
        H, N = shapes["blocks.0.att.time_decay"]
        A = shapes["blocks.0.att.receptance.weight"][0]
        F = shapes["blocks.0.ffn.key.weight"][0]
    except KeyError as e:
        raise ConfigError(f"{source}: not an RWKV-5.2 state dict (missing key {e.args[0]!r})") from None
    except ValueError:
        raise ConfigError(f"{source}: not an RWKV-5.2 state dict (unexpected tensor rank in emb/time_decay)") from None
    if not layers:
        raise ConfigError(f"{source}: not an RWKV-5.2 state dict (no blocks.* keys)")
    if len(layers) != max(layers) + 1:  # e.g. one stray blocks.999999999.* tensor: never size a model by it
        missing = list(itertools.islice((i for i in itertools.count() if i not in layers), 3))  # never the range
        raise ConfigError(f"{source}: blocks are numbered up to {max(layers)} but only {len(layers)} are present "
                          f"(missing {missing}...); a stray or damaged tensor name?")
    gate = "blocks.0.att.gate.weight" in shapes
    try:
        return ModelConfig(n_layer=max(layers) + 1, n_embd=C, vocab_size=V, head_size=N, dim_att=A, dim_ffn=F,
                           gate=gate)
    except ConfigError as e:  # shapes no RWKV-5.2 model has: say which file they came from
        raise ConfigError(f"{source}: tensor shapes give an invalid {str(e).removeprefix('model config: ')}") from None
