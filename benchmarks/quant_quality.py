"""Quantization quality (issue 15): do the schemes differ on a model that can tell them apart?

    python benchmarks/quant_quality.py [--layers 4] [--embd 128] [--vocab 512] [--steps 300] [--lr 4e-3]
    python benchmarks/quant_quality.py --model CKPT --tokenizer spm:TOK --corpus DIR   # an existing model
    python benchmarks/quant_quality.py ... --gate-only                                 # just the gate row

A model is trained first with the real commands on the bundled sample corpus (sample-corpus -> tokenizer train ->
prepare -> train; 8-20 min at the defaults on the loaded 2-core box; more with --steps). Its held-out text
is the corpus's validation split (`--eval-tokens` of it); the calibration text is the train split, never the
evaluation text. Every row quantizes the block matrices at 4 bits and keeps emb and head in float, so rows differ
only in how the block matrices are rounded:

- per-row min/max (one range per row, no groups): the gate. The model tells schemes apart only if this costs
  >= 5% perplexity (issue 15); otherwise differences between the other rows are near noise in perplexity (KL still
  separates them: it is measured against the original's own distribution, token by token).
- plain group-wise min/max at groups of 128 and 64 (4.25 and 4.5 bits per weight);
- ours at the same groups: range search (uncalibrated), activation-weighted range search (`--calib`,
  `--calib-method range`) and GPTQ error feedback (`--calib --calib-method gptq`).

Reported per row: bits per block weight (codes + fp16 scale/min), perplexity on the held-out text, its increase over
the original, mean KL(original || quantized) of the next-token distributions (nats/token), top-1 agreement, and the
quantize time. The box is shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantize import eval_tokens  # noqa: E402  (benchmarks/quantize.py: sample-corpus text -> token ids)

PER_ROW = 1 << 30  # a group larger than any row: group_size_for gives one group per row


def train_model(work: Path, args: argparse.Namespace) -> tuple[Path, str, float]:
    """Train a small model with the real commands -> (checkpoint, tokenizer spec, seconds spent training)."""
    from rwkvctl.cli import app

    corpus, data, run, tok = work / "corpus", work / "data", work / "run", work / "tok.model"
    head_size = min(64, args.embd)
    steps = str(args.steps)
    argvs = (
        ["sample-corpus", str(corpus)],
        ["tokenizer", "train", str(corpus / "train"), "-o", str(tok), "--vocab-size", str(args.vocab)],
        ["prepare", str(corpus / "train"), "--val-input", str(corpus / "validation"), "-o", str(data),
         "--tokenizer", f"spm:{tok}"],
        ["train", "--preset", "tiny", "--set", f"model.vocab_size={args.vocab}",
         "--set", f"model.n_layer={args.layers}", "--set", f"model.n_embd={args.embd}",
         "--set", f"model.head_size={head_size}", "--data", str(data),
         "--run-dir", str(run), "--ctx-len", str(args.ctx), "--micro-bsz", str(args.micro_bsz), "--max-steps", steps,
         "--lr-init", str(args.lr), "--lr-final", str(args.lr / 10), "--warmup-steps", "10", "--val-every", steps,
         "--save-every", steps, "--device", "cpu", "--precision", "fp32", "--seed", str(args.seed)],
    )  # fmt: skip
    t = time.perf_counter()
    for argv in argvs:
        code = app(argv, standalone_mode=False)
        if code:
            raise SystemExit(f"rwkvctl {argv[0]} failed ({code})")
    return sorted(run.glob("checkpoints/step-*/rwkv-*.pth"))[-1], f"spm:{tok}", time.perf_counter() - t


def next_token_logp(model, tokens: list[int]):  # noqa: ANN001, ANN201 (torch imported lazily)
    """log-probabilities (T-1, V) of each next token over `tokens` (sequence form, fp32), as compare_models runs."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0][0].float(), -1)


def paired_quality(logp_a, logp_b, tokens: list[int]) -> dict[str, float]:  # noqa: ANN001 (tensors)
    """rwkvctl.lifecycle.quantize.compare_models' measures from cached log-probabilities, plus the standard error
    of the perplexity increase from the per-token NLL differences (paired; neighbouring tokens are correlated, so
    it understates the noise somewhat)."""
    import torch

    target = torch.tensor(tokens[1:])[:, None]
    diff = logp_a.gather(1, target)[:, 0] - logp_b.gather(1, target)[:, 0]  # NLL_b - NLL_a per token
    ratio = float(diff.mean().exp())
    return {
        "ppl_original": float((-logp_a.gather(1, target).mean()).exp()),
        "ppl": float((-logp_b.gather(1, target).mean()).exp()),
        "ppl_increase_pct": 100 * (ratio - 1),
        "ppl_increase_se_pct": 100 * ratio * float(diff.std()) / len(diff) ** 0.5,
        "mean_kl": float((logp_a.exp() * (logp_a - logp_b)).sum(-1).mean()),
        "top1_pct": 100 * float((logp_a.argmax(-1) == logp_b.argmax(-1)).float().mean()),
    }


def variants(gate_only: bool) -> dict[str, tuple[int, bool, str | None]]:
    """label -> (group, range search, calibration method or None); 4-bit block matrices, emb/head kept."""
    rows = {"per-row min/max (gate)": (PER_ROW, False, None)}
    if gate_only:
        return rows
    for g in (128, 64):
        rows |= {
            f"plain min/max g{g}": (g, False, None),
            f"ours g{g} (range search)": (g, True, None),
            f"ours g{g} --calib (range)": (g, True, "range"),
            f"ours g{g} --calib --calib-method gptq": (g, True, "gptq"),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint to quantize (default: train one first)")
    ap.add_argument("--tokenizer", default="world", help="with --model: its tokenizer ('world' or spm:PATH)")
    ap.add_argument("--corpus", type=Path, help="with --model: the sample corpus directory (else made anew)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512, help="SentencePiece vocabulary trained on the corpus")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--micro-bsz", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300, help="training steps (~1-2 s each here at the defaults)")
    ap.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (final: a tenth of it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--gate-only", action="store_true", help="only the per-row row (is this model usable?)")
    ap.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    args = ap.parse_args()

    import torch

    from rwkvctl.lifecycle.models import load_model
    from rwkvctl.lifecycle.quantize import quantize_checkpoint
    from rwkvctl.quant.policy import QuantSpec

    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="rwkvctl-bench-qq-")  # removed at the end
    work = args.work or Path(scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_seconds = 0.0
    if args.model is None:
        model_path, tokenizer, train_seconds = train_model(work, args)
    else:
        model_path, tokenizer = args.model, args.tokenizer
        if args.corpus is not None:
            (work / "corpus").symlink_to(args.corpus.resolve())
        else:
            from rwkvctl.cli import app

            app(["sample-corpus", str(work / "corpus")], standalone_mode=False)
    tokens = eval_tokens(work, args.eval_tokens, "validation", tokenizer)
    calib = eval_tokens(work, args.calib_tokens, "train", tokenizer)  # calibration text: never the evaluation text
    original, meta = load_model(model_path)
    cfg = meta.model
    logp_original = next_token_logp(original, tokens)
    del original
    rows = []
    for label, (group, search, method) in variants(args.gate_only).items():
        spec = QuantSpec(bits=4, group=group, embed_bits=None, search=search)
        out = work / f"q-{len(rows)}.safetensors"
        t = time.perf_counter()
        res = quantize_checkpoint(model_path, out, spec, calib_tokens=calib if method else None,
                                  calib_method=method or "range")  # fmt: skip
        seconds = time.perf_counter() - t
        q = paired_quality(logp_original, next_token_logp(load_model(out)[0], tokens), tokens)
        rows.append({"variant": label, "bits_per_block_weight": round(res.bits_per_weight(4), 3),
                     **{k: round(v, 5) for k, v in q.items()}, "quantize_s": round(seconds, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    by = {r["variant"]: r for r in rows}
    checks: dict[str, object] = {"gate: per-row 4-bit costs >= 5% ppl": rows[0]["ppl_increase_pct"] >= 5}
    if not args.gate_only:
        for g in (128, 64):
            plain, ours = by[f"plain min/max g{g}"], by[f"ours g{g} (range search)"]
            cal, gptq = by[f"ours g{g} --calib (range)"], by[f"ours g{g} --calib --calib-method gptq"]
            best = min((cal, gptq), key=lambda r: r["mean_kl"])
            checks |= {
                f"g{g}: ours beats plain (ppl, KL)": (ours["ppl"] < plain["ppl"], ours["mean_kl"] < plain["mean_kl"]),
                f"g{g}: best calibrated beats plain (ppl, KL)": (best["ppl"] < plain["ppl"],
                                                                 best["mean_kl"] < plain["mean_kl"]),
                f"g{g}: calibrated range beats uncalibrated (ppl, KL)": (cal["ppl"] < ours["ppl"],
                                                                        cal["mean_kl"] < ours["mean_kl"]),
                f"g{g}: gptq beats uncalibrated (ppl, KL)": (gptq["ppl"] < ours["ppl"],
                                                            gptq["mean_kl"] < ours["mean_kl"]),
                f"g{g}: KL ratio gptq / calibrated range": round(gptq["mean_kl"] / max(cal["mean_kl"], 1e-12), 3),
            }  # fmt: skip
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
        "load1_at_end": round(os.getloadavg()[0], 1), "model": str(model_path),
        "config": f"L{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size}", "train_s": round(train_seconds, 1),
        "eval_tokens": len(tokens), "calib_tokens": len(calib), "seconds": round(time.time() - t0, 1),
        "checks": checks,
    }, indent=1))  # fmt: skip
    print(f"\nL{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size}, original perplexity {rows[0]['ppl_original']}")
    print("| variant | bits/weight (blocks) | ppl | ppl increase (± s.e.) | mean KL (nats/token) | top-1 agree "
          "| quantize s |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['variant']} | {r['bits_per_block_weight']} | {r['ppl']:.4f} | {r['ppl_increase_pct']:+.2f}% "
              f"± {r['ppl_increase_se_pct']:.2f} | {r['mean_kl']:.5f} | {r['top1_pct']:.2f}% | {r['quantize_s']} |")


if __name__ == "__main__":
    main()
