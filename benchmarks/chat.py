"""Benchmark chat in RNN mode: decode speed, prompt ingestion and memory, ours vs the official `rwkv` package.

    python benchmarks/chat.py [--preset 0.1b] [--decode 256] [--prompt 1024] [--long 4096]

Same weights in both (a randomly initialised preset written as an RWKV-LM .pth, loaded by both), fp32 on CPU, the
same thread count. Decode: one token per call with the state carried (`model.step` vs `RWKV.forward([tok], state)`),
head included. Prompt ingestion: a `--prompt`-token prompt in one call (ours: sequence form with the compiled WKV5
op, 256-token chunks; theirs: `forward(tokens, None)`, whose CPU v5.2 WKV is a per-token Python loop). Memory: the
process's resident set before and after `--long` more RNN steps (constant memory means no growth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.1b")
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--long", type=int, default=4096)
    args = ap.parse_args()
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    import rwkv
    from rwkv.model import RWKV

    from rwkvctl.config import preset
    from rwkvctl.generate import ingest
    from rwkvctl.lifecycle.models import create_checkpoint, load_model

    scratch = tempfile.TemporaryDirectory(prefix="rwkvctl-bench-chat-")  # removed when the run ends
    work = Path(scratch.name)
    path = create_checkpoint(work / "m.pth", preset(args.preset), scheme="rwkv-lm-2024", seed=0).path
    ours, _ = load_model(path)
    theirs = RWKV(model=str(path.with_suffix("")), strategy="cpu fp32")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 65530, (max(args.prompt, args.decode),), generator=gen).tolist()

    def decode_ours(n: int) -> float:
        state, t = None, time.perf_counter()
        with torch.no_grad():
            for tok in tokens[:n]:
                _, state = ours.step(torch.tensor([tok]), state)
        return n / (time.perf_counter() - t)

    def decode_theirs(n: int) -> float:
        state, t = None, time.perf_counter()
        for tok in tokens[:n]:
            _, state = theirs.forward([tok], state)
        return n / (time.perf_counter() - t)

    decode_ours(8), decode_theirs(8)  # warm-up
    d_ours = max(decode_ours(args.decode) for _ in range(2))
    d_theirs = max(decode_theirs(args.decode) for _ in range(2))
    with torch.no_grad():
        t = time.perf_counter()
        ingest(ours, tokens[: args.prompt])
        p_ours = args.prompt / (time.perf_counter() - t)
    t = time.perf_counter()
    theirs.forward(tokens[: args.prompt], None)
    p_theirs = args.prompt / (time.perf_counter() - t)
    # constant memory: RSS before/after many more RNN steps
    with torch.no_grad():
        _, state = ingest(ours, tokens[:64])
        before = rss_mb()
        for i in range(args.long):
            _, state = ours.step(torch.tensor([tokens[i % len(tokens)]]), state)
        after = rss_mb()
    state_bytes = sum(x.numel() * x.element_size() for x in (state.att_shift, state.ffn_shift, state.wkv))
    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "rwkv": getattr(rwkv, "__version__", "0.8.x"),
        "preset": args.preset,
        "decode_tok_s": {"ours": round(d_ours, 1), "rwkv_pip": round(d_theirs, 1),
                         "ratio": round(d_ours / d_theirs, 2)},
        "prompt_tok_s": {"ours": round(p_ours, 1), "rwkv_pip": round(p_theirs, 1),
                         "ratio": round(p_ours / p_theirs, 2)},
        "memory": {"state_kb": round(state_bytes / 1e3, 1), "rss_before_mb": round(before, 1),
                   "rss_after_mb": round(after, 1), "steps": args.long},
    }  # fmt: skip
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
