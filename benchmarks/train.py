"""End-to-end training throughput: the compiled WKV5 op vs the pure-PyTorch (chunked reference) path.

    python benchmarks/train.py                                  # L6 D512 ctx512, micro-batch 2, World vocab
    python benchmarks/train.py --n-layer 2 --n-embd 256 --ctx-len 256 --vocab 4096   # a quicker look
    python benchmarks/train.py --all      # fp32 and bf16, vocab 4096 and World, one table (RESULTS.md)

Both backends train the same model (same init, same batches) in the same process; one optimizer step
(forward, backward, clip, AdamW) is timed at a time, alternating compiled/reference so that machine load
hits both alike, and the median step time of each is reported. Goal (issue 5): >= 2x tokens/s end to end.
The backend is switched with RWKVCTL_WKV (compiled | reference), exactly as a user would.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.data.loader import TokenStream, TrainWindows
from rwkvctl.model.registry import build_model, initialize
from rwkvctl.train.config import RunConfig
from rwkvctl.train.single import SingleEngine

BACKENDS = ("compiled", "reference")


def build(backend: str, cfg: RunConfig) -> SingleEngine:
    torch.manual_seed(0)
    model = initialize(build_model(cfg.model), cfg.train.init, seed=0)
    return SingleEngine(model, cfg)


def one_step(engine: SingleEngine, windows: TrainWindows, cfg: RunConfig, step: int) -> float:
    t0 = time.perf_counter()
    for a in range(cfg.train.accum):
        engine.micro_step(windows.micro_batch(step * cfg.samples_per_step(), a, cfg.train.micro_bsz), cfg.train.accum)
    engine.optimizer_step(cfg.optim.lr_init)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--ctx-len", type=int, default=512)
    parser.add_argument("--micro-bsz", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per backend (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, as in training")
    parser.add_argument("--all", action="store_true", help="run fp32/bf16 x vocab 4096/65536 and print a table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.all:
        run(args)
        return
    table = []
    for precision in ("bf16", "fp32"):
        for vocab in (4096, 65536):
            args.precision, args.vocab = precision, vocab
            table.append((precision, vocab, *run(args)))
    print("\n| precision | vocab | compiled tokens/s | reference tokens/s | ratio |\n|---|---|---|---|---|")
    for precision, vocab, comp, ref in table:
        print(f"| {precision} | {vocab} | {comp:.1f} | {ref:.1f} | {comp / ref:.2f}x |")


def run(args: argparse.Namespace) -> tuple[float, float]:
    """One configuration: both backends, alternating steps; returns (compiled, reference) tokens/s."""
    cfg = RunConfig(model=ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab))
    cfg = cfg.with_overrides({"data.path": "synthetic", "data.ctx_len": args.ctx_len, "train.device": "cpu",
                              "train.micro_bsz": args.micro_bsz, "optim.lr_init": 1e-3,
                              "train.precision": args.precision})
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=2_000_000, dtype=np.int64)
    windows = TrainWindows(TokenStream([tokens]), args.ctx_len, mode="random", seed=0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
          f"{datetime.date.today().isoformat()}")
    print(f"model L{args.n_layer} D{args.n_embd} V{args.vocab}, ctx {args.ctx_len}, micro-batch {args.micro_bsz}, "
          f"{args.precision}, single process, {args.steps} timed steps per backend")

    engines, times, losses = {}, {b: [] for b in BACKENDS}, {}
    for backend in BACKENDS:
        os.environ["RWKVCTL_WKV"] = backend
        engines[backend] = build(backend, cfg)
        one_step(engines[backend], windows, cfg, 0)  # warm-up: lazy extension load, allocator
    for step in range(1, args.steps + 1):
        for backend in BACKENDS:  # alternate, so load changes hit both
            os.environ["RWKVCTL_WKV"] = backend
            times[backend].append(one_step(engines[backend], windows, cfg, step))
    for backend in BACKENDS:
        os.environ["RWKVCTL_WKV"] = backend
        losses[backend] = engines[backend].eval_loss(windows.micro_batch(10**6, 0, args.micro_bsz))
    tokens_per_step = args.ctx_len * args.micro_bsz
    tps = {b: tokens_per_step / statistics.median(times[b]) for b in BACKENDS}
    for b in BACKENDS:
        print(f"  {b:9s}: median step {statistics.median(times[b]):7.3f} s  ->  {tps[b]:9.1f} tokens/s  "
              f"(loss after {args.steps + 1} steps {losses[b]:.4f})")
    ratio = tps["compiled"] / tps["reference"]
    print(f"compiled / reference: {ratio:.2f}x  (goal >= 2x)  "
          f"{'MET' if ratio >= 2 else 'NOT MET'}; losses agree to {abs(losses['compiled'] - losses['reference']):.1e}")
    return tps["compiled"], tps["reference"]


if __name__ == "__main__":
    main()
