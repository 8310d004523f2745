"""Benchmark segmented long-window training: peak memory and time of one forward+backward vs the window length,
whole window at once (the baseline: RWKV-LM's trainer) vs `train.segment_len` (exact, full BPTT).

    python benchmarks/long_context.py [--lengths 1024 4096 16384] [--segment 1024]

Each measurement runs in a fresh process (peak resident memory only grows within a process). Model: L6 D512,
vocab 4096, batch 1, fp32 on CPU; the gradients of both modes agree (tests/lifecycle/test_segmented_training.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(length: int, segment: int) -> dict:
    import torch

    from rwkvctl.config import ModelConfig
    from rwkvctl.model.init import init_weights
    from rwkvctl.model.rwkv5 import RWKV5
    from rwkvctl.train.loss import lm_loss
    from rwkvctl.train.segmented import segmented_backward

    model = init_weights(RWKV5(ModelConfig(n_layer=6, n_embd=512, vocab_size=4096)), "rwkv-lm-2024", seed=0)
    x = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if segment:
        segmented_backward(model, x, x, segment)
    else:
        lm_loss(model(x)[0], x, use_l2wrap=True).backward()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"length": length, "segment": segment, "seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1024),
            "growth_mb": round((peak - before) / 1024)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--segment", type=int, default=1024)
    ap.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    for length in args.lengths:
        for segment in (0, args.segment):
            out = subprocess.run([sys.executable, __file__, "--one", str(length), str(segment)], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\n| window | whole window: s / peak MB | segments of {args.segment}: s / peak MB | memory ratio |")
    print("|---|---|---|---|")
    for length in args.lengths:
        w = next(r for r in rows if r["length"] == length and r["segment"] == 0)
        s = next(r for r in rows if r["length"] == length and r["segment"])
        ratio = w["growth_mb"] / max(s["growth_mb"], 1)
        print(f"| {length} | {w['seconds']} / {w['growth_mb']} | {s['seconds']} / {s['growth_mb']} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
