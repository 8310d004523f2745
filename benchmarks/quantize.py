"""Benchmark `rwkvctl quantize`: speed and memory (0.1b preset), file sizes (7B by --estimate), and quality of the
schemes on a trained model.

    python benchmarks/quantize.py [--model CKPT] [--steps 300] [--eval-tokens 4096] [--skip-speed | --speed-only]

Quality: without --model, a small model is trained first on the bundled sample corpus (sample-corpus -> prepare ->
train, the real commands), the validation split is the evaluation text and the train split the calibration text.
It must be able to tell schemes apart: per-row 4-bit rounding has to cost >= 5% perplexity (printed as a gate).
Rows: ours (4-bit g64, searched ranges, emb/head 8-bit: 4.5 bits per block weight) vs plain group-wise min/max at
the same bits, ours calibrated (--calib), the 7B-in-4-GB setting (g128, emb/head 4-bit) plain and ours, rwkv.cpp's
Q4_1 weights (g32 min/max, emb/head kept), per-row 4-bit min/max and ours at 8 bits.
Speed goals (issue 15): quantize wall time <= 3x (load + save unquantized), peak RSS <= source size + 1 GB, each
measured in its own subprocess on a freshly initialised 0.1b fp32 checkpoint. The box is shared: load average is
printed with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import resource, sys, time
from pathlib import Path
src, out, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
if what == "copy":
    from rwkvctl.io.checkpoint import load_checkpoint, save_checkpoint
    sd, meta = load_checkpoint(src)
    save_checkpoint(out, sd, meta)
else:
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec
    quantize_checkpoint(src, out, QuantSpec())
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def drop_page_cache_of(path: Path) -> None:
    """Evict the file from the page cache (both runs then read it from disk alike)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def speed(work: Path) -> dict:
    """Quantize vs load + save of a fresh 0.1b fp32 checkpoint, each in its own process (time, peak RSS)."""
    from rwkvctl.config import preset
    from rwkvctl.lifecycle.models import create_checkpoint

    src = create_checkpoint(work / "m01.pth", preset("0.1b")).path
    runs = {}
    for what, out in (("copy", work / "copy.pth"), ("quantize", work / "q01.safetensors")):
        drop_page_cache_of(src)
        load = os.getloadavg()[0]
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), what], capture_output=True, text=True,
                             check=True)  # fmt: skip
        seconds, rss = res.stdout.split()
        runs[what] = {"seconds": round(float(seconds), 2), "peak_rss_mb": round(int(rss) / 2**20), "load1": load}
    size = src.stat().st_size
    return {
        "source_mb": round(size / 2**20), "runs": runs,
        "time_ratio": round(runs["quantize"]["seconds"] / runs["copy"]["seconds"], 2),
        "rss_over_source_mb": runs["quantize"]["peak_rss_mb"] - round(size / 2**20),
        "goals": "time_ratio <= 3, rss_over_source_mb <= 1024",
    }  # fmt: skip


def sizes() -> dict:
    from rwkvctl.lifecycle.quantize import estimate_quantized_size
    from rwkvctl.quant.policy import QuantSpec

    out = {}
    for label, spec in (("default g64, emb/head 8-bit", QuantSpec()),
                        ("compact g128, emb/head 4-bit", QuantSpec(group=128, embed_bits=4))):  # fmt: skip
        est = estimate_quantized_size(spec, preset_name="7b", dtype="bf16")
        out[label] = {"bytes": est.bytes, "GB": round(est.bytes / 1e9, 3), "bpw": round(est.bits_per_param, 3)}
    return out


def train_model(work: Path, steps: int) -> tuple[Path, str]:
    """A small model trained with the real commands: a 1024-piece SentencePiece tokenizer on the sample corpus (a
    World-vocabulary head is 65536 x D and trains at ~75 tokens/s on the shared 2-core box; this one at ~1000), then
    prepare and train (tiny preset, vocab 1024). -> (checkpoint, tokenizer spec)."""
    from rwkvctl.cli import app

    corpus, data, run, tok = work / "corpus", work / "data", work / "run", work / "tok.model"
    for argv in (
        ["sample-corpus", str(corpus)],
        ["tokenizer", "train", str(corpus / "train"), "-o", str(tok), "--vocab-size", "1024"],
        ["prepare", str(corpus / "train"), "--val-input", str(corpus / "validation"), "-o", str(data),
         "--tokenizer", f"spm:{tok}"],
        ["train", "--preset", "tiny", "--set", "model.vocab_size=1024", "--data", str(data), "--run-dir", str(run),
         "--ctx-len", "128", "--micro-bsz", "8", "--max-steps", str(steps), "--lr-init", "3e-3", "--lr-final", "3e-4",
         "--warmup-steps", "10", "--val-every", str(steps), "--save-every", str(steps), "--device", "cpu",
         "--precision", "fp32"],
    ):  # fmt: skip
        code = app(argv, standalone_mode=False)
        if code:
            raise SystemExit(f"rwkvctl {argv[0]} failed ({code})")
    return sorted(run.glob("checkpoints/step-*/rwkv-*.pth"))[-1], f"spm:{tok}"


def eval_tokens(work: Path, limit: int, split: str = "validation", tokenizer: str = "world") -> list[int]:
    from rwkvctl.data.corpus import Doc, DocumentStream
    from rwkvctl.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    ids: list[int] = []
    for path in sorted((work / "corpus" / split).rglob("*.jsonl*")):
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
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--tokenizer", default="world", help="with --model: its tokenizer ('world' or spm:PATH)")
    ap.add_argument("--corpus", type=Path, help="with --model: the sample corpus it was trained on (else made anew)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--skip-speed", action="store_true", help="quality and sizes only")
    ap.add_argument("--speed-only", action="store_true", help="speed, memory and sizes only (no training)")
    args = ap.parse_args()

    from rwkvctl.lifecycle.models import load_model
    from rwkvctl.lifecycle.quantize import compare_models, quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    scratch = tempfile.TemporaryDirectory(prefix="rwkvctl-bench-quant-")  # removed when the run ends
    work = Path(scratch.name)
    t0 = time.time()
    speed_row = None if args.skip_speed else speed(work)
    print(json.dumps({"speed_0.1b": speed_row, "sizes_7b": sizes()}, indent=1), flush=True)
    if args.speed_only:
        return
    model_path, tokenizer = (args.model, args.tokenizer) if args.model else train_model(work, args.steps)
    if args.model is not None:
        if args.corpus is not None:
            (work / "corpus").symlink_to(args.corpus.resolve())
        else:
            from rwkvctl.cli import app

            app(["sample-corpus", str(work / "corpus")], standalone_mode=False)
    if args.eval_text is not None:
        from rwkvctl.data.tokenizer import load_tokenizer

        tokens = load_tokenizer(tokenizer).encode(args.eval_text.read_text())[: args.eval_tokens]
    else:
        tokens = eval_tokens(work, args.eval_tokens, tokenizer=tokenizer)
    calib = eval_tokens(work, args.calib_tokens, "train", tokenizer)  # calibration text: never the evaluation text
    original, _ = load_model(model_path)
    variants = {
        "naive: 4-bit per row (no groups) min/max, emb/head kept": (QuantSpec(4, 1 << 30, None, False), False),
        "plain min/max: 4-bit g64, emb/head 8-bit": (QuantSpec(4, 64, 8, False), False),
        "ours: 4-bit g64, range search, emb/head 8-bit": (QuantSpec(4, 64, 8, True), False),
        "ours calibrated (--calib): 4-bit g64, emb/head 8-bit": (QuantSpec(4, 64, 8, True), True),
        "plain min/max compact: 4-bit g128, emb/head 4-bit": (QuantSpec(4, 128, 4, False), False),
        "ours compact (7B in 4 GB): 4-bit g128, emb/head 4-bit": (QuantSpec(4, 128, 4, True), False),
        "ours compact calibrated": (QuantSpec(4, 128, 4, True), True),
        "rwkv.cpp Q4_1 weights: 4-bit g32 min/max, emb/head kept": (QuantSpec(4, 32, None, False), False),
        "ours: 8-bit g64, range search, emb/head 8-bit": (QuantSpec(8, 64, 8, True), False),
    }
    rows = []
    for name, (spec, calibrated) in variants.items():
        out = work / f"q-{len(rows)}.safetensors"
        t = time.perf_counter()
        res = quantize_checkpoint(model_path, out, spec, calib_tokens=calib if calibrated else None)
        seconds = time.perf_counter() - t
        q = compare_models(original, load_model(out)[0], tokens)
        rows.append(
            {
                "variant": name,
                "seconds": round(seconds, 2),
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

    naive, plain, ours, calibrated = rows[:4]
    checks = {
        "gate: per-row 4-bit costs >= 5% ppl": naive["ppl_increase_pct"] >= 5,
        "ours beats plain min/max (ppl)": ours["ppl_quantized"] < plain["ppl_quantized"],
        "ours beats plain min/max (KL)": ours["mean_kl"] < plain["mean_kl"],
        "calibrated beats ours (KL)": calibrated["mean_kl"] < ours["mean_kl"],
        "calibrated beats ours (ppl)": calibrated["ppl_quantized"] < ours["ppl_quantized"],
        "KL ratio ours/plain": round(ours["mean_kl"] / plain["mean_kl"], 3),
        "KL ratio calibrated/ours": round(calibrated["mean_kl"] / ours["mean_kl"], 3),
    }
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__, "load1": os.getloadavg(),
        "model": str(model_path), "eval_tokens": len(tokens), "calib_tokens": len(calib),
        "seconds": round(time.time() - t0, 1), "checks": checks, "rows": rows,
        "peak_rss_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
