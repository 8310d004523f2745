"""GPU training throughput and peak memory: RWKV-5.2 0.4B (L24 D1024, World vocab), bf16, DeepSpeed ZeRO-2.

Ready to run on one CUDA GPU (no launcher needed; DeepSpeed runs as a world of one):

    python benchmarks/train_gpu.py                         # ctx 4096, micro-batch 8, 12 steps
    python benchmarks/train_gpu.py --ctx-len 1024 --micro-bsz 16 --grad-cp

It trains on random tokens (throughput does not depend on the text), through the real `rwkvctl train`
code path (lifecycle.train: loader, engine, loop, checkpoint at the end), and prints tokens/s (steady
state: the first steps, which build kernels, are excluded), the MFU estimate and peak GPU memory. It
also runs the same steps with RWKVCTL_WKV=reference unless --no-reference, for the kernel's end-to-end
speed-up. Results are appended as JSON lines to $OUT/train_gpu.jsonl when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.lifecycle.train import train
from rwkvctl.train.config import RunConfig


def run(args: argparse.Namespace, data: Path, backend: str, root: Path) -> dict:
    os.environ["RWKVCTL_WKV"] = backend
    cfg = RunConfig().with_overrides({
        "run_dir": str(root / f"run-{backend}"), "model.preset": args.preset, "data.path": str(data),
        "data.ctx_len": args.ctx_len, "data.sampling": "random", "train.micro_bsz": args.micro_bsz,
        "train.max_steps": args.steps, "train.save_every": 10**6, "train.strategy": "deepspeed",
        "train.zero_stage": 2, "train.precision": "bf16", "train.grad_checkpointing": args.grad_cp,
        "train.deterministic": False, "train.keep_last": 1,
    })
    torch.cuda.reset_peak_memory_stats()
    result = train(cfg)
    return {"backend": backend, "preset": args.preset, "ctx_len": args.ctx_len, "micro_bsz": args.micro_bsz,
            "world_size": result.world_size, "grad_cp": args.grad_cp, "tokens_per_s": result.tokens_per_s,
            "mfu": result.mfu, "peak_memory_gib": result.peak_memory_bytes / 2**30, "device": result.device,
            "final_loss": result.final_loss, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="0.4b")
    parser.add_argument("--ctx-len", type=int, default=4096)
    parser.add_argument("--micro-bsz", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--grad-cp", action="store_true", help="gradient checkpointing (less memory)")
    parser.add_argument("--no-reference", action="store_true", help="skip the RWKVCTL_WKV=reference run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    root = Path(tempfile.mkdtemp(prefix="rwkvctl-train-gpu-"))
    data = root / "random"
    if int(os.environ.get("RANK", "0")) == 0:
        with BinIdxWriter(data) as w:  # 64M random World tokens: plenty of distinct windows
            rng = np.random.default_rng(0)
            for _ in range(64):
                w.add_document(rng.integers(1, 65536, size=1 << 20, dtype=np.int64).astype(np.uint16))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("multi-GPU: put the data on a shared path first; this script's temp dir is per process")
    backends = ["compiled"] + ([] if args.no_reference else ["reference"])
    rows = [run(args, data, b, root) for b in backends]
    for row in rows:
        print(json.dumps(row))
    if len(rows) == 2:
        print(f"compiled / reference tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "train_gpu.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
