"""Benchmark `rwkvctl quantize`: quality and size of 4-bit checkpoints against naive 4-bit schemes, same model.

    python benchmarks/quantize.py [--model CKPT] [--steps 300] [--eval-tokens 4096]

Without --model, a small model is trained first on the bundled sample corpus (sample-corpus -> prepare -> train,
the real commands; a few minutes on 2 CPU cores), and the validation split is the evaluation text.
Rows: ours (4-bit, groups of 64, searched ranges, emb/head 8-bit: 4.5 bits per block weight) vs rwkv.cpp's Q4_1
weight scheme (4-bit min/max in groups of 32, 5 bits per weight, emb/head kept) vs per-row 4-bit min/max (no
groups) and ours at 8 bits. Goal (reference doc, section 6): <= 2% perplexity increase at <= 4.5 bits per weight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def train_model(work: Path, steps: int) -> Path:
    from rwkvctl.cli import app

    corpus, data, run = work / "corpus", work / "data", work / "run"
    for argv in (
        ["sample-corpus", str(corpus)],
        ["prepare", str(corpus / "train"), "--val-input", str(corpus / "validation"), "-o", str(data)],
        ["train", "--preset", "tiny", "--data", str(data), "--run-dir", str(run), "--ctx-len", "128",
         "--micro-bsz", "8", "--max-steps", str(steps), "--lr-init", "2e-3", "--lr-final", "2e-4",
         "--warmup-steps", "10", "--val-every", str(steps), "--save-every", str(steps), "--device", "cpu",
         "--precision", "fp32"],
    ):  # fmt: skip
        code = app(argv, standalone_mode=False)
        if code:
            raise SystemExit(f"rwkvctl {argv[0]} failed ({code})")
    return sorted(run.glob("checkpoints/step-*/rwkv-*.pth"))[-1]


def eval_tokens(work: Path, limit: int) -> list[int]:
    from rwkvctl.data.corpus import Doc, DocumentStream
    from rwkvctl.data.tokenizer import load_tokenizer

    tok = load_tokenizer("world")
    ids: list[int] = []
    for path in sorted((work / "corpus" / "validation").rglob("*.jsonl*")):
        for d in DocumentStream(str(path)):
            if isinstance(d, Doc):
                ids += tok.encode(d.data.decode()) + [0]
                if len(ids) >= limit:
                    return ids[:limit]
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint to quantize (default: train a small one first)")
    ap.add_argument("--eval-text", type=Path, help="UTF-8 evaluation text (default: the sample validation split)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()

    from rwkvctl.lifecycle.models import load_model
    from rwkvctl.lifecycle.quantize import compare_models, quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    work = Path(tempfile.mkdtemp(prefix="rwkvctl-bench-quant-"))
    t0 = time.time()
    model_path = args.model or train_model(work, args.steps)
    if args.eval_text is not None:
        from rwkvctl.data.tokenizer import load_tokenizer

        tokens = load_tokenizer("world").encode(args.eval_text.read_text())[: args.eval_tokens]
    else:
        if args.model is not None:
            from rwkvctl.cli import app

            app(["sample-corpus", str(work / "corpus")], standalone_mode=False)
        tokens = eval_tokens(work, args.eval_tokens)
    original, _ = load_model(model_path)
    variants = {
        "ours: 4-bit g64, range search, emb/head 8-bit": QuantSpec(4, 64, 8, True),
        "rwkv.cpp Q4_1 weights: 4-bit g32 min/max, emb/head kept": QuantSpec(4, 32, None, False),
        "naive: 4-bit per row (no groups) min/max, emb/head kept": QuantSpec(4, 1 << 30, None, False),
        "ours: 8-bit g64, range search, emb/head 8-bit": QuantSpec(8, 64, 8, True),
    }
    rows = []
    for name, spec in variants.items():
        out = work / f"q-{len(rows)}.safetensors"
        res = quantize_checkpoint(model_path, out, spec)
        q = compare_models(original, load_model(out)[0], tokens)
        rows.append(
            {
                "variant": name,
                "bits_per_block_weight": round(res.bits_per_weight(spec.bits), 3),
                "file_ratio": round(res.source_bytes / res.output_bytes, 2),
                "ppl_original": round(q.ppl_original, 4),
                "ppl_quantized": round(q.ppl_quantized, 4),
                "ppl_increase_pct": round(100 * q.ppl_increase, 3),
                "mean_kl": round(q.mean_kl, 5),
                "top1_agreement_pct": round(100 * q.top1_agreement, 2),
            }
        )
    import torch

    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
        "model": str(model_path), "eval_tokens": len(tokens), "seconds": round(time.time() - t0, 1), "rows": rows,
    }, indent=1))  # fmt: skip
    print("\n| variant | bits/weight (blocks) | file smaller | ppl | ppl increase | mean KL | top-1 agree |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['bits_per_block_weight']} | {r['file_ratio']}x | {r['ppl_quantized']} "
            f"| {r['ppl_increase_pct']:+.2f}% | {r['mean_kl']} | {r['top1_agreement_pct']}% |"
        )


if __name__ == "__main__":
    main()
