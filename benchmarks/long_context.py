"""Benchmark long-window training: peak memory and speed of one forward+backward vs the window length, segmented
(`train.segment_len`, exact full BPTT) against the whole window at once (the baseline: RWKV-LM's trainer).

    python benchmarks/long_context.py            # CPU: 4k, 16k and 128k tokens in segments of 4096
    python benchmarks/long_context.py --lengths 4096 16384 131072 --segment 4096 --layers 4 --width 256
    python benchmarks/long_context.py --device cuda --precision bf16 --lengths 4096 32768 131072 --segment 4096 \
        --layers 24 --width 1024 --vocab 65536   # on a GPU: the 0.4B at 128k, peak CUDA memory

Goal (issue 11): with segments of 4096, peak memory at 131,072 tokens <= 1.25x that at 4,096, and tokens/s at
131,072 >= 0.8x that at 4,096; the whole window is shown for comparison up to --whole-max tokens (beyond, it does not
fit in a small machine's memory). Each measurement runs in a fresh process (peak resident memory only grows within
a process; on CUDA: peak allocated memory), after a 256-token warm-up that loads the kernel. The window is handed
over in host memory, as the trainer does. "peak MB" is the process's peak (CPU: resident set, Python and torch
included); "growth MB" is what the step added to it. The gradients of both modes agree
(tests/lifecycle/test_segmented_training.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(length: int, segment: int, args: argparse.Namespace) -> dict:
    import contextlib

    import torch

    from rwkvctl.config import ModelConfig
    from rwkvctl.model.registry import build_model, initialize
    from rwkvctl.train.loss import lm_loss
    from rwkvctl.train.segmented import segmented_backward

    device = torch.device(args.device)
    cfg = ModelConfig(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab)
    model = initialize(build_model(cfg), "rwkv-lm-2024", seed=0).to(device)
    x = torch.randint(0, args.vocab, (1, length + 1), generator=torch.Generator().manual_seed(0))
    x, y = x[:, :-1], x[:, 1:]  # host memory, like the loader's batches
    cuda = device.type == "cuda"

    def autocast() -> contextlib.AbstractContextManager:
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(xs: torch.Tensor, ys: torch.Tensor, seg: int) -> None:
        if seg:
            segmented_backward(model, xs, ys, seg, autocast=autocast, device=device)
        else:
            with autocast():
                loss = lm_loss(model(xs.to(device))[0], ys.to(device), use_l2wrap=True)
            loss.backward()
        model.zero_grad(set_to_none=True)

    step(x[:, :256], y[:, :256], 0)  # warm-up: kernel load, first-call allocations
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    step(x, y, segment)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - t
    return {"length": length, "segment": segment, "seconds": round(seconds, 2),
            "tokens_per_s": round(length / seconds, 1), "peak_mb": round(peak),
            "growth_mb": round(peak - before)}


def _run(length: int, segment: int, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--one", str(length), str(segment), "--device", args.device,
            "--precision", args.precision, "--layers", str(args.layers), "--width", str(args.width),
            "--vocab", str(args.vocab)]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:  # e.g. the whole window does not fit: report it as such
        why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1][:200]
        return {"length": length, "segment": segment, "failed": why}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if "failed" in r:
        return "failed (out of memory?)"
    return f"{r['seconds']} s, {r['tokens_per_s']:,.0f} tok/s, {r['peak_mb']:,} / +{r['growth_mb']:,} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 131072])
    ap.add_argument("--segment", type=int, default=4096)
    ap.add_argument("--whole-max", type=int, default=16384, help="longest window also run whole (the baseline)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args)))
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    seg_rows, whole_rows = {}, {}
    for length in args.lengths:
        seg_rows[length] = _run(length, args.segment, args)
        print(seg_rows[length], flush=True)
        if length <= args.whole_max:
            whole_rows[length] = _run(length, 0, args)
            print(whole_rows[length], flush=True)
    print(f"load average at end: {os.getloadavg()}")
    base = seg_rows[args.lengths[0]]
    print(f"\nL{args.layers} D{args.width} vocab {args.vocab}, {args.device} {args.precision}, batch 1; "
          "cells: seconds, tokens/s, peak / growth of the process's peak memory")
    print(f"\n| window | whole window | segments of {args.segment} | peak vs {args.lengths[0]} | tok/s vs "
          f"{args.lengths[0]} |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        s = seg_rows[length]
        ok = "failed" not in s and "failed" not in base
        mem = f"{s['peak_mb'] / base['peak_mb']:.2f}x" if ok else "-"
        speed = f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x" if ok else "-"
        print(f"| {length:,} | {_cell(whole_rows.get(length))} | {_cell(s)} | {mem} | {speed} |")
    last = seg_rows[args.lengths[-1]]
    if "failed" not in last and "failed" not in base and len(args.lengths) > 1:
        mem, speed = last["peak_mb"] / base["peak_mb"], last["tokens_per_s"] / base["tokens_per_s"]
        print(f"\ngoal at {args.lengths[-1]:,} vs {args.lengths[0]:,}: peak {mem:.2f}x (<= 1.25: "
              f"{'met' if mem <= 1.25 else 'NOT met'}), tokens/s {speed:.2f}x (>= 0.8: "
              f"{'met' if speed >= 0.8 else 'NOT met'})")


if __name__ == "__main__":
    main()
