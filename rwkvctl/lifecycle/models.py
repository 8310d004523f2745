"""Model files as a lifecycle stage: create a fresh checkpoint, load one into a model, describe one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvctl.arch import arch_of
from rwkvctl.config import ModelConfig
from rwkvctl.errors import CheckpointError, ConfigError
from rwkvctl.io.checkpoint import SUFFIXES, CheckpointMeta, detect_version, save_checkpoint, sidecar_path
from rwkvctl.model.registry import build_model, initialize
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.names import DTYPE_NAMES, dtype_name
from rwkvctl.quant.format import load_checkpoint_expanded, load_checkpoint_packed

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass
class InitResult:
    path: Path
    config: ModelConfig
    params: int
    bytes_written: int


def create_checkpoint(
    out: str | Path, cfg: ModelConfig, *, scheme: str = "v5.2-2023", seed: int = 0, dtype: str = "fp32"
) -> InitResult:
    """Initialise a model with an RWKV-LM scheme and write it as an RWKV-LM compatible checkpoint.

    The model is allocated directly in the stored dtype (a 7B model in bf16 needs ~15 GB, not 30 GB), and
    the memory check runs before anything is allocated, so a model that cannot fit fails with a clear
    message instead of being killed by the OS.
    """
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise CheckpointError(f"{out}: unknown checkpoint suffix {out.suffix!r}; use .pth or .safetensors")
    torch_dtype = parse_dtype(dtype)
    need = arch_of(cfg).param_count(cfg) * torch.tensor([], dtype=torch_dtype).element_size()
    check_fits_in_memory(need, "initialising this model", "try --dtype bf16, a smaller preset, or --meta to only "
                         "count parameters")
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(torch_dtype).to_empty(device="cpu")
    initialize(model, scheme, seed=seed)
    meta = CheckpointMeta(model=cfg, step=0, tokens=0, init=scheme, extra={"seed": seed})
    path = save_checkpoint(out, model.state_dict(), meta, dtype=torch_dtype)
    return InitResult(path, cfg, arch_of(cfg).param_count(cfg), path.stat().st_size)


def check_fits_in_memory(need: int, what: str, hint: str) -> None:
    """Refuse, before allocating, what cannot fit in the memory available now (a config from a file or a flag can
    ask for any size; the OS would kill the process instead of saying why)."""
    available = _available_memory()
    if available is not None and need > 0.9 * available:
        raise ConfigError(f"{what} needs ~{need / 2**30:.1f} GiB of RAM and {available / 2**30:.1f} GiB is "
                          f"available; {hint}")


def _available_memory() -> int | None:
    """Bytes this process can still allocate, as far as the machine says (None where unknown): the smallest of
    MemAvailable, the cgroup's memory.max less its usage (a container sees the host's MemAvailable) and the
    address-space limit (`ulimit -v`) less what the process has mapped already."""
    limits = [v for v in (_meminfo_available(), _cgroup_headroom(), _address_space_headroom()) if v is not None]
    return min(limits) if limits else None


def _read_int(path: str, field: str | None = None, unit: int = 1) -> int | None:
    """An integer file (e.g. cgroup memory.max; "max" reads as None), or the number after `field` in a key-value
    file ("Field: N kB" in /proc, "field N" in cgroup memory.stat), times `unit`."""
    try:
        with open(path) as f:
            if field is None:
                text = f.read().strip()
                return int(text) if text.isdigit() else None
            for line in f:
                if line.startswith(field + ":") or line.startswith(field + " "):
                    return int(line.split()[1]) * unit
    except (OSError, ValueError, IndexError):
        return None
    return None


def _meminfo_available() -> int | None:
    return _read_int("/proc/meminfo", "MemAvailable", unit=1024)


def _cgroup_headroom() -> int | None:
    """memory.max less the working set of this process's cgroup v2 (usage less reclaimable inactive page cache, as
    the kernel and kubelet count it: data just written by `prepare` stays cached without being in the way)."""
    base = _own_cgroup_dir()
    limit = _read_int(f"{base}/memory.max")
    used = _read_int(f"{base}/memory.current")
    if limit is None or used is None:
        return None
    cache = _read_int(f"{base}/memory.stat", "inactive_file") or 0
    return max(limit - (used - min(cache, used)), 0)


def _own_cgroup_dir() -> str:
    """/sys/fs/cgroup plus this process's cgroup v2 path ("0::/PATH" in /proc/self/cgroup; "/" in a container's
    own namespace)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return "/sys/fs/cgroup" + line[3:].strip().rstrip("/")
    except OSError:
        pass
    return "/sys/fs/cgroup"


def _address_space_headroom() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    mapped = _read_int("/proc/self/status", "VmSize", unit=1024)
    return None if soft == resource.RLIM_INFINITY or mapped is None else max(soft - mapped, 0)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep_quantized: bool = False,
) -> tuple[RWKV5, CheckpointMeta]:
    """Build an RWKV5 from a checkpoint (rwkvctl's own or a bare RWKV-LM file). `keep_quantized`: a quantized
    file's Linear weights stay packed (QuantLinear, ~4.5 bits per weight in memory instead of 16 or 32); the
    embedding, a lookup table, is expanded either way."""
    if not keep_quantized:
        state_dict, meta = load_checkpoint_expanded(path)
        return model_from_state_dict(state_dict, meta.model, dtype=dtype, device=device), meta
    state_dict, packed, meta = load_checkpoint_packed(path)
    from rwkvctl.quant.linear import prepare_packed, use_packed_weights

    linear = {k: w for k, w in packed.items() if k != "emb.weight"}
    placeholders = {k: torch.empty(w.shape, dtype=w.dtype, device="meta") for k, w in linear.items()}
    if "emb.weight" in packed:
        state_dict["emb.weight"] = packed["emb.weight"].expand().to(packed["emb.weight"].dtype)
    with torch.device("meta"):
        model = build_model(meta.model)
    model.load_state_dict({**state_dict, **placeholders}, assign=True)
    use_packed_weights(model, linear)  # replaces every placeholder before anything touches it
    model = model.to(device=device, dtype=dtype).eval()
    prepare_packed(model)  # repacks for the compiled matmul where it runs, once, before the first token
    return model, meta


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> RWKV5:
    """An RWKV5 (eval mode) around already-loaded weights, without copying them when dtype and device match."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int


@dataclass
class CheckpointInfo:
    path: Path
    version: str
    meta: CheckpointMeta
    has_sidecar: bool
    params: int
    file_bytes: int
    dtypes: dict[str, int]
    tensors: list[TensorInfo] = field(default_factory=list)


def describe_checkpoint(path: str | Path) -> CheckpointInfo:
    """Everything `rwkvctl inspect` shows about a checkpoint; validates it on the way."""
    path = Path(path)
    state_dict, meta = load_checkpoint_expanded(path, verify_values=False)  # shown, not used: no full read
    shapes = {k: tuple(t.shape) for k, t in state_dict.items()}
    tensors = [
        TensorInfo(k, tuple(t.shape), dtype_name(str(t.dtype)), t.numel()) for k, t in state_dict.items()
    ]
    dtypes: dict[str, int] = {}
    for t in tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    return CheckpointInfo(
        path=path,
        version=detect_version(shapes),
        meta=meta,
        has_sidecar=sidecar_path(path).exists(),
        params=sum(t.numel for t in tensors),
        file_bytes=os.path.getsize(path),
        dtypes=dtypes,
        tensors=tensors,
    )
