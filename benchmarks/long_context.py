"""Benchmark segmented long-window training: peak memory and time of one forward+backward vs the window length,
whole window at once (the baseline: RWKV-LM's trainer) vs `train.segment_len` (exact, full BPTT).

    python benchmarks/long_context.py [--lengths 1024 4096 16384] [--segment 1024]
    python benchmarks/long_context.py --device cuda --precision bf16 --lengths 8192 32768 131072 --segment 4096 \
        --layers 24 --width 2048      # on a GPU: the 128k-token case, peak CUDA memory

Each measurement runs in a fresh process (peak resident memory only grows within a process; on CUDA the peak
allocated memory). Default model: L6 D512, vocab 4096, batch 1, fp32 on CPU; the gradients of both modes agree
(tests/lifecycle/test_segmented_training.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(length: int, segment: int, device: str, precision: str, layers: int, width: int) -> dict:
    import contextlib

    import torch

    from rwkvctl.config import ModelConfig
    from rwkvctl.model.registry import build_model, initialize
    from rwkvctl.train.loss import lm_loss
    from rwkvctl.train.segmented import segmented_backward

    cfg = ModelConfig(n_layer=layers, n_embd=width, vocab_size=4096)
    model = initialize(build_model(cfg), "rwkv-lm-2024", seed=0).to(device)
    x = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.startswith("cuda")

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "bf16":
            return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if segment:
        segmented_backward(model, x, x, segment, autocast=autocast)
    else:
        with autocast():
            loss = lm_loss(model(x)[0], x, use_l2wrap=True)
        loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - t
    return {"length": length, "segment": segment, "seconds": round(seconds, 2), "peak_mb": round(peak),
            "growth_mb": round(peak - before), "device": device, "precision": precision}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--segment", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.device, args.precision, args.layers, args.width)))
        return
    rows = []
    for length in args.lengths:
        for segment in (0, args.segment):
            argv = [sys.executable, __file__, "--one", str(length), str(segment), "--device", args.device,
                    "--precision", args.precision, "--layers", str(args.layers), "--width", str(args.width)]
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode:  # e.g. the whole window does not fit: report it as such
                print({"length": length, "segment": segment, "failed": res.stderr.strip().splitlines()[-1][:200]})
                rows.append({"length": length, "segment": segment, "seconds": "-", "growth_mb": "out of memory"})
                continue
            out = res.stdout  # fmt: skip
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\n| window | whole window: s / peak MB | segments of {args.segment}: s / peak MB | memory ratio |")
    print("|---|---|---|---|")
    for length in args.lengths:
        w = next(r for r in rows if r["length"] == length and r["segment"] == 0)
        s = next(r for r in rows if r["length"] == length and r["segment"])
        numeric = all(isinstance(r["growth_mb"], int) for r in (w, s))
        ratio = f"{w['growth_mb'] / max(s['growth_mb'], 1):.1f}x" if numeric else "-"
        print(f"| {length} | {w['seconds']} / {w['growth_mb']} | {s['seconds']} / {s['growth_mb']} | {ratio} |")


if __name__ == "__main__":
    main()
