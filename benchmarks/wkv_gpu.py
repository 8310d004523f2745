"""WKV5 on a CUDA GPU: correctness of the CUDA kernel on the issue-3 grid, then fwd+bwd speed vs the chunked
PyTorch reference at B=8 T=4096 C=4096 (H=64, N=64) bf16. Ready to run in a session that has a GPU:

    python benchmarks/wkv_gpu.py            # a few minutes at most; prints a block for benchmarks/RESULTS.md

Correctness: forward, final state and every gradient (r, k, v, w, u, s_in) against the float64 reference
(exact loop for T <= 64, chunked form beyond, both on the GPU in float64), T in {1,2,15,16,17,64,129,1000},
B in {1,3}, H in {1,4}, N=64, fp32 (relative max error, tolerance 1e-4) and bf16 (relative RMS, 1e-2).
Exit status 1 if any case is above tolerance. Last, prompt ingestion (B=1, forward only): the automatic
state-passing chunked CUDA forward vs a forced single pass (RWKVCTL_CUDA_CHUNK).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from rwkvctl.kernels.build import load_extension
from rwkvctl.kernels.check import errors_vs_reference, fwd_bwd_seconds, random_inputs
from rwkvctl.kernels.ops import wkv5_compiled
from rwkvctl.kernels.reference import wkv5_chunked

GRID_T = (1, 2, 15, 16, 17, 64, 129, 1000)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def correctness(device: str) -> int:
    failures = 0
    print(f"{'dtype':>9} {'B':>2} {'T':>5} {'H':>2}  {'metric':>7} {'fwd err':>9} {'bwd err':>9} worst  ok")
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 3):
            for H in (1, 4):
                for T in GRID_T:
                    x = random_inputs(B, T, H, 64, device=device, seed=T)
                    if dtype != torch.float32:
                        x.update({n: x[n].to(dtype).double() for n in ("r", "k", "v")})
                    metric, fwd, bwd, worst = errors_vs_reference(wkv5_compiled, x, dtype)
                    ok = fwd < TOLERANCE[dtype] and bwd < TOLERANCE[dtype]
                    failures += not ok
                    name = str(dtype).removeprefix("torch.")
                    print(
                        f"{name:>9} {B:>2} {T:>5} {H:>2}  {metric:>7} {fwd:9.1e} {bwd:9.1e} {worst:>5}  "
                        f"{'yes' if ok else 'NO'}",
                        flush=True,
                    )
    return failures


def speed(B: int, T: int, C: int, N: int, reps: int, device: str) -> list[str]:
    """fwd+bwd: ours (automatic chunking, and a forced single pass for bf16) vs the chunked PyTorch reference."""
    import os

    rows = []
    H = C // N
    for dtype, setting in ((torch.bfloat16, "0"), (torch.bfloat16, str(T + 1)), (torch.float32, "0")):
        os.environ["RWKVCTL_CUDA_CHUNK"] = setting
        x = random_inputs(B, T, H, N, device=device)
        ours = fwd_bwd_seconds(wkv5_compiled, x, dtype, reps=reps)
        ref = fwd_bwd_seconds(wkv5_chunked, x, dtype, reps=reps)
        name = str(dtype).removeprefix("torch.") + (" (single pass)" if setting != "0" else "")
        rows.append(f"| {B}x{T}x{H}x{N} | {name} | {ours * 1e3:.1f} | {ref * 1e3:.1f} | {ref / ours:.1f}x |")
        print(rows[-1], flush=True)
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    os.environ.pop("RWKVCTL_CUDA_CHUNK")
    return rows


def prefill(T: int, C: int, N: int, reps: int, device: str) -> list[str]:
    """Forward only at B=1 (prompt ingestion): automatic chunked forward vs a forced single pass."""
    import os
    import time

    H = C // N
    x = random_inputs(1, T, H, N, device=device)
    r, k, v = (x[n].to(torch.bfloat16) for n in ("r", "k", "v"))
    w, u, s = x["w"].float(), x["u"].float(), x["s_in"].float()
    rows = []
    for label, setting in (("single pass", str(T + 1)), ("automatic chunks", "0")):
        os.environ["RWKVCTL_CUDA_CHUNK"] = setting
        times = []
        with torch.no_grad():
            for i in range(reps + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                wkv5_compiled(r, k, v, w, u, s)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
        rows.append(f"| 1x{T}x{H}x{N} forward | bfloat16 | {label} | {sorted(times)[len(times) // 2] * 1e3:.2f} |")
        print(rows[-1], flush=True)
    os.environ.pop("RWKVCTL_CUDA_CHUNK")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script without a GPU")
    parser.add_argument("--speed-shape", type=int, nargs=3, default=(8, 4096, 4096), metavar=("B", "T", "C"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch: run this where there is one")
    info = load_extension()
    if args.device == "cuda" and not info.with_cuda:
        sys.exit("the extension was built without CUDA (is nvcc on PATH / CUDA_HOME set?)")
    failures = 0 if args.skip_grid else correctness(args.device)
    print("\n| B x T x H x N | dtype | ours fwd+bwd ms | chunked reference ms | speed-up |")
    print("|---|---|---|---|---|")
    rows = speed(*args.speed_shape, 64, args.reps, args.device)
    print("\n| prefill | dtype | CUDA forward | ms |\n|---|---|---|---|")
    prefill_rows = prefill(args.speed_shape[1], args.speed_shape[2], 64, args.reps, args.device)
    print(f"\n### WKV5 on GPU ({datetime.date.today()})\n")
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU dry run"
    print(
        f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"grid correctness: {'all within tolerance' if not failures else f'{failures} case(s) FAILED'}\n"
    )
    print("| B x T x H x N | dtype | ours fwd+bwd ms | chunked reference ms | speed-up |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| prefill | dtype | CUDA forward | ms |\n|---|---|---|---|")
    print("\n".join(prefill_rows))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
