"""Benchmark CPU inference: decode against the weight-streaming bound, bf16 against fp32, prompt ingestion against the
official `rwkv` package (JIT on, its default). The goals of issue 15, recorded in one run.

    python benchmarks/infer.py [--preset 0.1b] [--threads 1 2] [--decode 24] [--prompt 512] [--rounds 2]
    python benchmarks/infer.py --device cuda     # decode on the GPU only: fp32, bf16, packed int8/int4

Same weights everywhere (a randomly initialised preset written as an RWKV-LM .pth, loaded by both). Measurements
alternate within each round (the machine is shared), and every ratio is taken within one round, then the median
over rounds is printed; the load average at the start and end says how quiet the machine was.

- streaming bound: bytes of weights one decode step reads (every Linear of the blocks and the head, the per-layer
  vectors, one embedding row) / the bandwidth of a large fp32 gemv (256 MB matrix) measured in the round, the
  fastest of torch's in ordinary 4 KB pages, torch's in 2 MB pages and our decode kernel's in 2 MB pages;
- our models keep their streamed weights in 2 MB pages, as `open_engine` (chat, generate, serve) places them;
- decode: tokens/s of `model.step` one token at a time with the state carried, head included; the module path
  (RWKVCTL_STEP=reference, what decode was before the fused step) is measured beside it;
- ingestion: a `--prompt`-token prompt, ours through `rwkvctl.generate.ingest`, the package through
  `RWKV.forward(tokens, None)` with strategy "cpu fp32" / "cpu bf16";
- packed decode: the same checkpoint quantized (`quantize_checkpoint`, default settings: 4 or 8-bit blocks, 8-bit
  head) and loaded with `keep_quantized=True` (the compiled packed matmul), plus int4 with a 4-bit head
  (`--embed-bits 4`); the max |logit difference| to the expanded model of the same file is printed once.
- ingestion ceiling: a prompt multiplies every block weight by every token (2 FLOP per weight per token, the head
  only for the last token), so no ingestion beats (torch's GEMM FLOP/s at the model's largest block shape, the
  better of 256 rows (our chunks) and the whole prompt's rows) / (2 x block weights); printed with the FLOP/s that
  3x the package would need.
Goals (issue 15): fp32 decode >= 0.9x the bound; bf16 >= 1.8x fp32; int8 >= 3x; int4 >= 4x; ingestion >= 3x the
package in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def gemv_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5, large_pages: bool = False, ours: bool = False) -> float:
    """Bytes/s of a large fp32 gemv (matrix well beyond the caches), best of `repeats`: torch's, or with `ours` the
    decode step's own kernel (`linear_f32acc`, faster than torch's at these shapes); `large_pages`: the matrix in
    2 MB pages, where our models keep their weights (rwkvctl.model.large_pages)."""
    from rwkvctl.model.large_pages import place_in_large_pages

    lin = torch.nn.Linear(4096, n_bytes // 4 // 4096, bias=False)
    if large_pages:
        place_in_large_pages(lin)
    x = torch.randn(1, 4096)
    if ours:
        from rwkvctl.kernels.build import load_extension

        load_extension()
    gemv = torch.ops.rwkvctl.linear_f32acc if ours else F.linear
    with torch.no_grad():
        gemv(x, lin.weight)
        best = min(_timed(lambda: gemv(x, lin.weight)) for _ in range(repeats))
    return lin.weight.numel() * 4 / best


def gemm_gflop_s(rows: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of torch's (rows, k) @ (k, n) in `dtype`, best of `repeats` (the ingestion GEMMs' shape)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    F.linear(x, w)
    return 2 * rows * k * n / min(_timed(lambda: F.linear(x, w)) for _ in range(repeats)) / 1e9


def block_weights(model: torch.nn.Module) -> tuple[int, tuple[int, int]]:
    """Weights of the blocks' Linear layers (what every prompt token multiplies) and the largest one's shape."""
    shapes = [m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    return sum(a * b for a, b in shapes), max(shapes, key=lambda s: s[0] * s[1])


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table, plus one row of it."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "emb.weight")
    emb = model.emb.weight
    return total + emb.shape[1] * emb.element_size()


def quantized_models(path: Path, work: Path) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """int8, int4 (8-bit head) and int4 with a 4-bit head, packed; and each one's max |logit - expanded model's|."""
    from rwkvctl.lifecycle.models import load_model
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    models, errors = {}, {}
    for name, spec in (("int8", QuantSpec(bits=8)), ("int4", QuantSpec(bits=4)),
                       ("int4_head4", QuantSpec(bits=4, embed_bits=4))):
        out = quantize_checkpoint(path, work / f"{name}.safetensors", spec).path
        models[name] = load_model(out, keep_quantized=True)[0]
        expanded = load_model(out)[0]
        with torch.no_grad():
            idx = torch.tensor([[1, 2, 3, 4]])
            errors[name] = float((models[name](idx)[0] - expanded(idx)[0]).abs().max())
            _, a = models[name](idx)
            _, b = expanded(idx)
            errors[name] = max(errors[name], float((models[name].step(torch.tensor([5]), a)[0]
                                                    - expanded.step(torch.tensor([5]), b)[0]).abs().max()))
    return models, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--decode", type=int, default=24, help="tokens per decode measurement")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-package", action="store_true", help="skip the rwkv package (ingestion ratios)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: only the decode benchmark on the GPU (fp32, bf16, packed int8/int4)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here")
    os.environ["RWKV_JIT_ON"] = os.environ.get("RWKV_JIT_ON", "1")  # the package's default
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    load_start = os.getloadavg()

    from rwkvctl.config import preset
    from rwkvctl.generate import ingest
    from rwkvctl.lifecycle.models import create_checkpoint, load_model
    from rwkvctl.model.large_pages import place_in_large_pages

    scratch = tempfile.TemporaryDirectory(prefix="rwkvctl-bench-infer-")  # removed when the run ends
    work = Path(scratch.name)
    path = create_checkpoint(work / "m.pth", preset(args.preset), scheme="rwkv-lm-2024", seed=0).path
    ours = {"fp32": load_model(path)[0], "bf16": load_model(path, dtype=torch.bfloat16)[0]}
    packed, packed_error = quantized_models(path, work)
    if args.device == "cuda":
        return cuda_decode(path, work, args)
    placed = {name: place_in_large_pages(m) for name, m in {**ours, **packed}.items()}  # as open_engine does
    print(f"weights in 2 MB pages: {', '.join(f'{k} {p.moved_bytes / 1e6:.0f} MB' for k, p in placed.items())}"
          f"{'' if not placed['fp32'].skipped else ' (' + placed['fp32'].skipped + ')'}", file=sys.stderr)
    theirs = {}
    if not args.no_package:
        from rwkv.model import RWKV

        with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it loads
            theirs = {k: RWKV(model=str(path.with_suffix("")), strategy=f"cpu {k}") for k in ("fp32", "bf16")}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 65530, (max(args.prompt, args.decode) + 1,), generator=gen).tolist()
    bytes_fp32 = step_bytes(ours["fp32"])
    n_block_weights, widest = block_weights(ours["fp32"])

    def decode(model, mode: str) -> float:
        os.environ["RWKVCTL_STEP"] = mode
        with torch.no_grad():
            _, state = model.step(torch.tensor([tokens[0]]))  # warm: builds/loads the op, first allocations
            t = time.perf_counter()
            for tok in tokens[1 : args.decode + 1]:
                _, state = model.step(torch.tensor([tok]), state)
        os.environ.pop("RWKVCTL_STEP")
        return args.decode / (time.perf_counter() - t)

    def ingest_ours(model) -> float:
        with torch.no_grad():
            return args.prompt / _timed(lambda: ingest(model, tokens[: args.prompt]))

    def ingest_theirs(model) -> float:
        return args.prompt / _timed(lambda: model.forward(tokens[: args.prompt], None))

    for model in ours.values():  # warm-up: op build/load, first-call allocations
        decode(model, "auto")
        ingest_ours(model)
    for model in theirs.values():
        model.forward(tokens[:16], None)

    def measure(r: dict[str, float], key: str, fn, *fn_args) -> None:
        r[key] = fn(*fn_args)
        print(f"  [{torch.get_num_threads()} thr] {key}: {r[key]:.1f}", file=sys.stderr, flush=True)

    rows: dict[int, list[dict[str, float]]] = {n: [] for n in args.threads}
    for _ in range(args.rounds):
        for n in args.threads:
            torch.set_num_threads(n)
            r: dict[str, float] = {}
            measure(r, "bandwidth_4k_gb_s", lambda: gemv_bandwidth() / 1e9)
            measure(r, "bandwidth_2m_gb_s", lambda: gemv_bandwidth(large_pages=True) / 1e9)
            measure(r, "bandwidth_ours_2m_gb_s", lambda: gemv_bandwidth(large_pages=True, ours=True) / 1e9)
            r["bandwidth_gb_s"] = max(r["bandwidth_4k_gb_s"], r["bandwidth_2m_gb_s"], r["bandwidth_ours_2m_gb_s"])
            r["bound_tok_s"] = r["bandwidth_gb_s"] * 1e9 / bytes_fp32
            for name in ("fp32", "bf16"):
                measure(r, f"decode_{name}", decode, ours[name], "auto")
                measure(r, f"decode_{name}_module", decode, ours[name], "reference")
            for name, model in packed.items():
                measure(r, f"decode_{name}", decode, model, "auto")
                r[f"{name}_vs_fp32"] = r[f"decode_{name}"] / r["decode_fp32"]
            for name in ("fp32", "bf16"):
                measure(r, f"ingest_{name}", ingest_ours, ours[name])
                if theirs:
                    measure(r, f"ingest_{name}_rwkv", ingest_theirs, theirs[name])
                dtype = torch.float32 if name == "fp32" else torch.bfloat16
                # the better of our chunks' shape (`ingest` takes 256 tokens at a time) and the whole prompt's
                measure(r, f"gemm_{name}_gflop_s", lambda d=dtype: max(
                    gemm_gflop_s(rows, widest[1], widest[0], d) for rows in {min(args.prompt, 256), args.prompt}))
                r[f"ingest_{name}_ceiling"] = r[f"gemm_{name}_gflop_s"] * 1e9 / (2 * n_block_weights)
            r["decode_fp32_vs_bound"] = r["decode_fp32"] / r["bound_tok_s"]
            r["bf16_vs_fp32"] = r["decode_bf16"] / r["decode_fp32"]
            r["decode_fp32_vs_module"] = r["decode_fp32"] / r["decode_fp32_module"]
            r["decode_bf16_vs_module"] = r["decode_bf16"] / r["decode_bf16_module"]
            if theirs:
                r["ingest_fp32_vs_rwkv"] = r["ingest_fp32"] / r["ingest_fp32_rwkv"]
                r["ingest_bf16_vs_rwkv"] = r["ingest_bf16"] / r["ingest_bf16_rwkv"]
            rows[n].append(r)

    summary = {n: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for n, rs in rows.items()}
    for n, s in summary.items():
        print(f"--- {n} thread(s), median of {args.rounds} round(s) ---")
        print(f"  fp32 decode {s['decode_fp32']:.1f} tok/s = {s['decode_fp32_vs_bound']:.2f}x the streaming bound "
              f"({s['bound_tok_s']:.1f} tok/s at {s['bandwidth_gb_s']:.1f} GB/s, the fastest large gemv: torch's "
              f"in 4 KB pages {s['bandwidth_4k_gb_s']:.1f}, in 2 MB pages {s['bandwidth_2m_gb_s']:.1f}, ours in "
              f"2 MB pages {s['bandwidth_ours_2m_gb_s']:.1f}; goal >= 0.9); module path "
              f"{s['decode_fp32_module']:.1f} tok/s")
        print(f"  bf16 decode {s['decode_bf16']:.1f} tok/s = {s['bf16_vs_fp32']:.2f}x fp32 (goal >= 1.8); module path "
              f"{s['decode_bf16_module']:.1f} tok/s")
        for name, goal in (("int8", 3), ("int4", 4), ("int4_head4", 4)):
            print(f"  {name} decode (packed) {s[f'decode_{name}']:.1f} tok/s = {s[f'{name}_vs_fp32']:.2f}x fp32 "
                  f"(goal >= {goal}; max |logit - expanded| {packed_error[name]:.1e})")
        for name in ("fp32", "bf16"):
            line = f"  ingestion {args.prompt} tokens {name}: {s[f'ingest_{name}']:.0f} tok/s"
            if theirs:
                line += (f" vs rwkv {s[f'ingest_{name}_rwkv']:.0f} tok/s = {s[f'ingest_{name}_vs_rwkv']:.2f}x"
                         " (goal >= 3)")
            ceiling, gflop = s[f"ingest_{name}_ceiling"], s[f"gemm_{name}_gflop_s"]
            line += (f"; GEMM ceiling {ceiling:.0f} tok/s ({gflop:.0f} GFLOP/s x {n_block_weights / 1e6:.0f}M block "
                     f"weights; ours at {s[f'ingest_{name}'] / ceiling:.2f}x it")
            if theirs:
                need = 3 * s[f"ingest_{name}_rwkv"] / ceiling
                line += f", 3x the package would take {need:.2f}x it"
            print(line + ")")
    result = {
        "bench": "infer",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "preset": args.preset,
        "prompt": args.prompt,
        "decode_tokens": args.decode,
        "rounds": args.rounds,
        "step_mb_fp32": round(bytes_fp32 / 1e6, 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "packed_logit_error": packed_error,
        "threads": summary,
    }  # fmt: skip
    print(json.dumps(result))


def cuda_decode(path: Path, work: Path, args: argparse.Namespace) -> None:
    """Decode tokens/s of every format on the GPU (the module path; packed layers through the CUDA packed matmul
    for their decode rows), medians of `--rounds`, each against fp32 and bf16 of the same run. The models are loaded
    straight onto the GPU from the files `main` wrote."""
    from rwkvctl.lifecycle.models import load_model

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 65530, (args.decode + 1,), generator=gen).tolist()
    on_gpu = {"fp32": load_model(path)[0].cuda(), "bf16": load_model(path, dtype=torch.bfloat16)[0].cuda()}
    for name in ("int8", "int4", "int4_head4"):
        on_gpu[name] = load_model(work / f"{name}.safetensors", keep_quantized=True)[0].cuda()

    def decode(model) -> float:
        with torch.no_grad():
            _, state = model.step(torch.tensor([tokens[0]], device="cuda"))
            torch.cuda.synchronize()
            t = time.perf_counter()
            for tok in tokens[1:]:
                _, state = model.step(torch.tensor([tok], device="cuda"), state)
            torch.cuda.synchronize()
        return args.decode / (time.perf_counter() - t)

    for model in on_gpu.values():
        decode(model)  # warm-up: kernels, allocations
    rounds: dict[str, list[float]] = {name: [] for name in on_gpu}
    for _ in range(args.rounds):
        for name, model in on_gpu.items():
            rounds[name].append(decode(model))
    tok_s = {name: round(statistics.median(r), 1) for name, r in rounds.items()}
    print(f"--- {torch.cuda.get_device_name()}, decode, median of {args.rounds} round(s) ---")
    for name, value in tok_s.items():
        print(f"  {name}: {value:.1f} tok/s = {value / tok_s['fp32']:.2f}x fp32, {value / tok_s['bf16']:.2f}x bf16")
    print(json.dumps({"bench": "infer", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "preset": args.preset, "decode_tokens": args.decode, "rounds": args.rounds,
                      "decode_tok_s": tok_s}))  # fmt: skip


if __name__ == "__main__":
    main()
