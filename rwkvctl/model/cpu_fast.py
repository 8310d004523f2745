"""Fast CPU paths of RWKV5, beside the module path in rwkv5.py that stays the reference and test oracle.

- `fused_step`: the RNN decode step in one C++ op for the whole model (`rwkvctl::rnn_step_model`,
  csrc/rnn_step_model_cpu.cpp; its arguments gathered once by rwkvctl/model/step_args.py), each layer as the
  per-layer op `rwkvctl::rnn_step_layer` (csrc/rnn_step_cpu.cpp) computes it: all of a block's elementwise work,
  the WKV step and its matmuls in fp32, with fp32 or bf16 weights read directly (bf16: half the bytes of fp32;
  widened in registers, or on CPUs with AVX512-BF16 multiplied by `vdpbf16ps` against the input split into two bf16
  parts, 16 of its significant bits) and packed 4/8-bit weights (QuantLinear) through the compiled packed matmul
  called from C++. A block with any other projection module (or a packed one the kernel cannot take, or more decode
  rows than it is for) makes the step go layer by layer, that block through `_split_step`: its elementwise work in
  five fused ops (csrc/rnn_step_parts_cpu.cpp) around calls of its own projection modules, so any mix works.
- `forward_upcast`: the sequence form for a bf16 model on a CPU without bf16 arithmetic: each block runs in fp32
  with its weights upcast for the duration of that block only (torch's bf16 GEMM there is ~3x slower than fp32).

RWKVCTL_STEP picks the path: `auto` (default: the fast path where it applies, else the module path with one
notice), `fused` (fail with KernelUnavailable instead of falling back), `reference` (always the module path).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from rwkvctl import native_build
from rwkvctl.errors import ConfigError, KernelUnavailable
from rwkvctl.model.state import RecurrentState
from rwkvctl.model.step_args import layer_params, model_plan, plain

log = logging.getLogger("rwkvctl.model")
_FAST_DTYPES = (torch.float32, torch.bfloat16)
_HEAD_ROWS = 8192  # head rows upcast at once when full bf16 logits are asked for (~25 MB fp32 at C=768)
_HEAD_TRANSPOSED_ROWS = 17  # from this many rows the fp32 head is torch's head @ x.T (below: own kernel, faster)
SWITCH = native_build.Switch("STEP", ("auto", "fused", "reference"), KernelUnavailable, log,
                             "RNN step: using the PyTorch module path (slower) because %s")  # fmt: skip


# Read by the compiled step itself (csrc/cpu_isa.h), exactly as spelled. Checked here as well, so that a typo is a
# one-line ConfigError before any op runs rather than a RuntimeError from inside one.
CPU_SETTINGS = {"RWKVCTL_CPU_ISA": ("default", "avx2", "avx512bw", "avx512"), "RWKVCTL_BF16_INPUT": ("round", "split")}


def step_mode() -> str:
    """The RWKVCTL_STEP setting: auto, fused or reference (after checking the settings of CPU_SETTINGS)."""
    for var, allowed in CPU_SETTINGS.items():
        value = os.environ.get(var, "")
        if value and value not in allowed:
            raise ConfigError(f"{var} must be one of {', '.join(allowed)} (or unset), got {value!r}")
    return SWITCH.mode()


def _extension_ready() -> str | None:
    """None once the ops are loaded (building them on first use), else why not."""
    from rwkvctl.kernels import build

    if build.loaded() is not None:
        return None
    try:
        build.load_extension()
    except KernelUnavailable as e:
        return str(e)
    return None


def applies(model: nn.Module) -> bool:
    """Whether the fast CPU paths run for this model now. CUDA and autograd keep the module path without a
    notice (it is the right path there); a CPU model the fast path cannot take gets one notice per reason."""
    mode = step_mode()
    weight = model.emb.weight
    if mode == "reference" or weight.device.type != "cpu" or _partitioned(weight):
        return False
    if torch.is_grad_enabled() and weight.requires_grad:
        return False  # the C++ ops have no backward; training and gradient checks use the module path
    if weight.dtype not in _FAST_DTYPES:
        return SWITCH.fallback(f"the model dtype is {weight.dtype}, not float32 or bfloat16", mode)
    reason = _extension_ready()
    return True if reason is None else SWITCH.fallback(reason, mode)


def _partitioned(weight: torch.Tensor) -> bool:
    """A parameter sharded by DeepSpeed ZeRO-3 (validation inside a ZeRO-3 run): only the module path gathers it,
    through the hooks DeepSpeed puts on every module."""
    return hasattr(weight, "ds_id")


def _head(model: nn.Module, x: Tensor) -> Tensor:
    """ln_out and head of fp32 rows x (B, C) -> fp32 logits (B, V); the head's weights are read as they are."""
    ln = model.ln_out
    x = F.layer_norm(x, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    head = model.head
    if plain(head, model.emb.weight.dtype):
        if head.weight.dtype == torch.float32 and x.shape[0] >= _HEAD_TRANSPOSED_ROWS:
            # many rows: torch's GEMM for (B, C) @ (C, V) re-streams the head every few rows, (V, C) @ (C, B)
            # streams it once; up to 16 rows the op's own kernel is faster still (65536 x 512, B = 16: 16-20 ms
            # against 25 ms)
            return (head.weight @ x.T).T.contiguous()  # (V, B) -> (B, V)
        return torch.ops.rwkvctl.linear_f32acc(x, head.weight)
    return head(x.to(model.emb.weight.dtype)).float()


def fused_step(model: nn.Module, tokens: Tensor, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
    """RWKV5.step on the fast path (call only where `applies(model)`): tokens (B,) -> (logits (B, V), new state).
    The residual stream stays fp32 between layers; logits and state come back in the reference's dtypes."""
    dtype = model.emb.weight.dtype
    x = model.emb(tokens).float()  # (B, C)
    found = model_plan(model, dtype, x.shape[0])
    if found is not None:  # every block in the whole-layer form: the whole step is one op
        out, a, f, s = torch.ops.rwkvctl.rnn_step_model(x, state.att_shift, state.ffn_shift, state.wkv, found.plan)
        logits = out if found.has_head else _head(model, out)
        return logits.to(dtype), RecurrentState(a, f, s)
    hsd = float(model.cfg.head_size_divisor)
    att_shifts, ffn_shifts, wkvs = [], [], []
    for i, block in enumerate(model.blocks):
        args = layer_params(block, dtype, x.shape[0])
        if args is not None:
            x, a, f, s = torch.ops.rwkvctl.rnn_step_layer(
                x, state.att_shift[i], state.ffn_shift[i], state.wkv[i], args.params, hsd, block.layer_id == 0,
                block.att.cfg.gate, args.q_bits, args.q_group, args.q_aux,
            )
        else:  # projections the op cannot read: fused elementwise ops around the block's own modules
            x, a, f, s = _split_step(block, x, state.att_shift[i], state.ffn_shift[i], state.wkv[i], dtype, hsd)
        att_shifts.append(a)
        ffn_shifts.append(f)
        wkvs.append(s)
    new_state = RecurrentState.from_layers(att_shifts, ffn_shifts, wkvs, like=state)
    return _head(model, x).to(dtype), new_state


def _project(linear: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """linear(x) as fp32 (B, out) for fp32 rows x (B, in): a plain Linear through linear_f32acc, any other module
    (QuantLinear: its compiled packed matmul) called on rows in the model dtype, as the module path does."""
    if plain(linear, dtype):
        return torch.ops.rwkvctl.linear_f32acc(x, linear.weight)
    return linear(x if dtype == torch.float32 else x.to(dtype)).float()


def _split_step(
    block: nn.Module, x: Tensor, att_shift: Tensor, ffn_shift: Tensor, wkv: Tensor, dtype: torch.dtype, hsd: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block.step for fp32 rows x (B, C) of a block `rnn_step_layer` cannot take: the elementwise work in five C++
    ops (csrc/rnn_step_parts_cpu.cpp), the projections by the block's own modules in between."""
    att, ffn, ops = block.att, block.ffn, torch.ops.rwkvctl
    gate = att.cfg.gate
    vecs = [block.ln1.weight, block.ln1.bias, att.time_mix_r, att.time_mix_k, att.time_mix_v]
    if gate:
        vecs.append(att.time_mix_g)
    if block.layer_id == 0:
        vecs += [block.ln0.weight, block.ln0.bias]
    x, new_att, mixed = ops.rnn_step_att_in(x, att_shift, vecs, block.layer_id == 0, gate)  # mixed: (3|4, B, C)
    r = _project(att.receptance, mixed[0], dtype)
    k = _project(att.key, mixed[1], dtype)
    v = _project(att.value, mixed[2], dtype)
    g = _project(att.gate, mixed[3], dtype) if gate else None
    y, new_wkv = ops.rnn_step_att_out(
        r, k, v, g, wkv, [att.time_decay, att.time_faaaa, att.ln_x.weight, att.ln_x.bias], hsd
    )
    a = _project(att.output, y, dtype)
    ffn_vecs = [block.ln2.weight, block.ln2.bias, ffn.time_mix_k, ffn.time_mix_r]
    x, new_ffn, mixed = ops.rnn_step_ffn_in(x, a, ffn_shift, ffn_vecs)  # mixed: (2, B, C)
    hidden = ops.rnn_step_relu_square(_project(ffn.key, mixed[0], dtype))
    rec = _project(ffn.receptance, mixed[1], dtype)
    x = ops.rnn_step_ffn_residual(x, rec, _project(ffn.value, hidden, dtype))
    return x, new_att, new_ffn, new_wkv


def upcast_applies(model: nn.Module) -> bool:
    """Whether the sequence form should run in fp32 blocks: a bf16 CPU model, no bf16 arithmetic in the CPU."""
    if model.emb.weight.dtype != torch.bfloat16 or step_mode() == "reference":
        return False
    if model.emb.weight.device.type != "cpu" or (torch.is_grad_enabled() and model.emb.weight.requires_grad):
        return False
    if _partitioned(model.emb.weight):
        return False
    return not cpu_has_bf16_math()


@functools.cache
def cpu_has_bf16_math() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), so torch's bf16 GEMM beats upcasting to
    fp32 (measured on an AMD EPYC with AVX512-BF16: 2.3x faster than fp32 at 512 x 768 x 3072). torch 2.13 no longer
    exposes its own check (torch._C._cpu._is_avx512_bf16_supported, used where it exists); on Linux the kernel's CPU
    flags say it; elsewhere we assume not (the upcast path is never slower than emulated bf16)."""
    probe = getattr(torch._C._cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else cpuinfo_has_bf16("/proc/cpuinfo")


def cpuinfo_has_bf16(path: str) -> bool:
    """Whether the first `flags` line of a Linux /proc/cpuinfo at `path` names AVX512-BF16 or AMX-BF16."""
    try:
        with open(path, encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def forward_upcast(
    model: nn.Module, x: Tensor, state: RecurrentState, last_only: bool
) -> tuple[Tensor, RecurrentState]:
    """The blocks of RWKV5.forward on x (B, T, C) in fp32, one block's weights upcast at a time (memory: one
    block in fp32); logits and state come back in the reference's dtypes."""
    dtype = model.emb.weight.dtype
    x = x.float()
    att_shifts, ffn_shifts, wkvs = [], [], []
    last_block = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        params = {name: p.float() for name, p in block.named_parameters()}
        args = (x, state.att_shift[i], state.ffn_shift[i], state.wkv[i])
        # as in RWKV5._run_blocks: with last_only the last block's outputs are needed for 2 positions only
        kwargs = {"tail": 2} if last_only and i == last_block else {}
        x, a, f, s = functional_call(block, params, args, kwargs)
        att_shifts.append(a)
        ffn_shifts.append(f)
        wkvs.append(s)
    new_state = RecurrentState.from_layers(att_shifts, ffn_shifts, wkvs, like=state)
    if last_only:
        x = x[:, -1:]  # (B, T, C) -> (B, 1, C)
    B, T, C = x.shape
    rows = x.reshape(B * T, C)  # (B, T, C) -> (B*T, C)
    if T == 1 and _extension_ready() is None:
        logits = _head(model, rows)
    else:  # many rows: a GEMM, with the head upcast a block of rows at a time
        ln = model.ln_out
        rows = F.layer_norm(rows, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        head = model.head.weight if isinstance(model.head, nn.Linear) else None
        if head is None:
            logits = model.head(rows)
        else:
            blocks = range(0, head.shape[0], _HEAD_ROWS)
            logits = torch.cat([rows @ head[a : a + _HEAD_ROWS].float().T for a in blocks], dim=1)  # (B*T, V)
    return logits.to(dtype).view(B, T, -1), new_state
