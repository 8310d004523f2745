"""Benchmark packed-weight decode: tokens/s of `model.step` for fp32 (expanded) vs int8 and int4 kept packed.

    python benchmarks/infer_quant.py [--preset 0.1b] [--tokens 32] [--rounds 3] [--threads 1 2]

A random-init checkpoint of the preset is written (rwkvctl.lifecycle.models.create_checkpoint) and quantized at 8
and 4 bits (rwkvctl.lifecycle.quantize.quantize_checkpoint; the head at `embed_bits`, 8 by default); each is loaded
with `load_model(..., keep_quantized=True)`. The variants are timed alternately, round after round, in the same
process, so a shared machine's load hits them alike; the best round of each is kept and ratios to fp32 printed.
Also printed: the max |logit difference| to the expanded model of the same file (the packed kernels' error) and
the load average. Goals (issue 15): int8 >= 3x fp32, int4 >= 4x fp32, 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def decode_rate(model, tokens: int) -> float:
    """Tokens/s of one-token steps from a short prompt's state (batch 1)."""
    idx = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        _, state = model(idx.view(1, -1))
        token = idx[-1:]
        logits, state = model.step(token, state)  # warm-up
        start = time.perf_counter()
        for _ in range(tokens):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
    return tokens / (time.perf_counter() - start)


def first_logits(model) -> torch.Tensor:
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3, 4]]))
        return model.step(torch.tensor([4]), state)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    from rwkvctl.config import preset
    from rwkvctl.kernels import qmm
    from rwkvctl.lifecycle.models import create_checkpoint, load_model
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        create_checkpoint(work / "m.pth", cfg)
        models, diffs = {"fp32": load_model(work / "m.pth")[0]}, {}
        for bits in (8, 4):
            path = quantize_checkpoint(work / "m.pth", work / f"q{bits}.safetensors", QuantSpec(bits=bits)).path
            packed = load_model(path, keep_quantized=True)[0]
            expanded = load_model(path)[0]
            diffs[f"int{bits}"] = float((first_logits(packed) - first_logits(expanded)).abs().max())
            models[f"int{bits}"] = packed
            del expanded
        print(f"preset {args.preset} (L{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size}), kernel level {qmm.level()}, "
              f"RWKVCTL_QMM={os.environ.get('RWKVCTL_QMM', 'auto')}")
        for name, d in diffs.items():
            print(f"  {name}: max |logit - expanded model's| = {d:.2e}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            best = dict.fromkeys(models, 0.0)
            for _ in range(args.rounds):
                for name, model in models.items():
                    best[name] = max(best[name], decode_rate(model, args.tokens))
            line = ", ".join(f"{k} {v:.1f} tok/s ({v / best['fp32']:.2f}x)" for k, v in best.items())
            print(f"threads {threads}: {line}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
