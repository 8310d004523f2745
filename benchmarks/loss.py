"""The training loss: rwkvctl's fused chunked cross entropy vs PyTorch's stock one, time and peak memory.

    python benchmarks/loss.py                        # (2, 2048, 65536) bf16 logits, L2Wrap on
    python benchmarks/loss.py --rows 1024 --dtype fp32

Each variant runs in a fresh subprocess (so peak RSS is its own): loss + backward on leaf logits of the given shape,
as in a training step after the head. "stock" is F.cross_entropy on the logits upcast to fp32, plus L2Wrap, which
is what a plain PyTorch trainer does; "ours" is rwkvctl.train.loss.lm_loss. Peak memory is the growth of the
process's max RSS during the first loss + backward, on top of the logits (and their gradient, which both need);
time is the median of 3 runs after it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, statistics, sys, time
import torch
import torch.nn.functional as F
from rwkvctl.train.loss import lm_loss
from rwkvctl.train.optim import L2Wrap

variant, batch, rows, vocab, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
gen = torch.Generator().manual_seed(0)
base = torch.empty(batch, rows, vocab, dtype=dt)
for b in range(batch):  # filled in slices: a whole fp32 temporary would set the RSS peak before we measure
    for r in range(0, rows, 64):
        base[b, r : r + 64] = torch.randn(min(64, rows - r), vocab, generator=gen) * 2
y = torch.randint(0, vocab, (batch, rows), generator=gen)

def stock(logits):
    ce = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
    return L2Wrap.apply(ce, logits)

def ours(logits):
    return lm_loss(logits, y, use_l2wrap=True)

fn = {"stock": stock, "ours": ours}[variant]
times, loss = [], None
for i in range(4):
    logits = base.clone().requires_grad_()
    if i == 0:  # the logits exist: measure what loss + backward add on top (RSS peak is monotonic: first run only)
        start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = fn(logits)
    out.backward()
    times.append(time.perf_counter() - t)
    if i == 0:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss
    loss = float(out)
    del logits, out
print(json.dumps({"variant": variant, "seconds": statistics.median(times[1:]), "peak_mib": peak / 1024, "loss": loss}))
"""


def run(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", CHILD, variant, str(args.batch), str(args.rows), str(args.vocab), args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2048, help="tokens per sample (ctx_len)")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    import torch

    logits_mib = args.batch * args.rows * args.vocab * (2 if args.dtype == "bf16" else 4) / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; "
          f"logits ({args.batch}, {args.rows}, {args.vocab}) {args.dtype} = {logits_mib:.0f} MiB")
    res = {v: run(v, args) for v in ("stock", "ours")}
    for v, r in res.items():
        print(f"  {v:5s}: {r['seconds'] * 1e3:8.1f} ms  peak +{r['peak_mib']:7.0f} MiB  loss {r['loss']:.6f}")
    s, o = res["stock"], res["ours"]
    print(f"ours vs stock: {s['seconds'] / o['seconds']:.2f}x faster, {s['peak_mib'] / max(o['peak_mib'], 1):.2f}x "
          f"less extra memory; losses differ by {abs(s['loss'] - o['loss']):.1e}")


if __name__ == "__main__":
    main()
