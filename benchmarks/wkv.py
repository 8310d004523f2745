"""WKV5 forward+backward speed on this CPU: the compiled C++ op vs the chunked PyTorch reference vs the exact loop.

    python benchmarks/wkv.py                # B=8 H=8 N=64 fp32, T=1024 and T=4096, 1 and 2 threads
    python benchmarks/wkv.py --loop-long    # also time the exact loop at T=4096 (slow: minutes)

One forward+backward is timed per repetition (median shown); the loss is <y, gy> + <s_out, gs>, so every
gradient, the initial-state one included, is computed. The exact loop is timed at T=1024 only unless
--loop-long is given (it scales linearly in T; at T=4096 it costs minutes per run on a small CPU).
Goal (issue 3): the C++ op at least 3x faster than the chunked reference, with 1 and with 2 threads.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from rwkvctl.kernels.build import load_extension
from rwkvctl.kernels.check import fwd_bwd_seconds, random_inputs
from rwkvctl.kernels.ops import wkv5_compiled
from rwkvctl.kernels.reference import wkv5_chunked, wkv5_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of ours and the chunked reference")
    parser.add_argument("--loop-long", action="store_true", help="time the exact loop beyond T=1024 too")
    args = parser.parse_args()

    info = load_extension()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; extension {info.library.name}"
    )
    B, H, N = args.batch, args.heads, args.head_size
    header = (
        f"{'threads':>7} {'B x T x H x N':>16} {'ours ms':>9} {'chunked ms':>11} {'loop ms':>10} "
        f"{'chunked/ours':>12} {'loop/ours':>10}"
    )
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for T in args.lengths:
            x = random_inputs(B, T, H, N)
            ours = fwd_bwd_seconds(wkv5_compiled, x, torch.float32, reps=args.reps)
            chunked = fwd_bwd_seconds(wkv5_chunked, x, torch.float32, reps=args.reps)
            loop = None
            if T <= 1024 or args.loop_long:
                loop = fwd_bwd_seconds(wkv5_loop, x, torch.float32, reps=1, warmup=0)
            loop_ms = f"{loop * 1e3:10.0f}" if loop else f"{'skipped':>10}"
            loop_ratio = f"{loop / ours:9.1f}x" if loop else f"{'-':>10}"
            print(
                f"{threads:>7} {f'{B}x{T}x{H}x{N}':>16} {ours * 1e3:9.1f} {chunked * 1e3:11.1f} {loop_ms} "
                f"{chunked / ours:11.1f}x {loop_ratio}",
                flush=True,
            )
    print("ours/chunked: median of", args.reps, "fwd+bwd after 1 warm-up; loop: 1 run, no warm-up")


if __name__ == "__main__":
    main()
