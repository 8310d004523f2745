"""Benchmark `rwkvctl add-gate`: how much the loss moves when the gate is added mid-run, per init, against
continuing without the gate and against RWKV-LM's way (`--load_partial`: missing weights from PyTorch's default
init, optimizer restarted).

    python benchmarks/add_gate.py [--steps 240] [--branch 160]

A gate-less tiny model (L2 D128, World vocabulary) trains on the bundled sample corpus (prepared with the World
tokenizer); at `--branch` each variant continues to `--steps` with the same data order. Reported: validation loss
at the branch point right after surgery, the worst training loss of the first 20 steps after it, and the final
validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--branch", type=int, default=160)
    args = ap.parse_args()
    from rwkvctl.data.sample_corpus import write_sample_corpus
    from rwkvctl.lifecycle.add_gate import add_gate_to_run
    from rwkvctl.lifecycle.prepare import PrepareOptions, prepare
    from rwkvctl.lifecycle.train import train
    from rwkvctl.train.config import RunConfig
    from rwkvctl.train.metrics import read_metrics
    from rwkvctl.train.run_dir import RunDir

    scratch = tempfile.TemporaryDirectory(prefix="rwkvctl-bench-gate-")  # removed when the run ends
    work = Path(scratch.name)
    write_sample_corpus(work / "corpus")
    prepare(PrepareOptions(inputs=[str(work / "corpus" / "train")], val_inputs=[str(work / "corpus" / "validation")],
                           out_dir=work / "data"))  # fmt: skip
    base = RunConfig.from_dict({
        "run_dir": str(work / "base"),
        "model": {"n_layer": 2, "n_embd": 128, "gate": False},
        "data": {"path": str(work / "data"), "ctx_len": 64, "val_every": args.steps // 8, "val_batches": 8},
        "optim": {"lr_init": 2e-3, "lr_final": 2e-4, "warmup_steps": 10},
        "train": {"micro_bsz": 8, "max_steps": args.steps, "save_every": args.branch, "keep_last": 10,
                  "device": "cpu", "precision": "fp32"},
    })  # fmt: skip
    t0 = time.time()
    train(base)

    def summary(run: Path) -> dict:
        recs = read_metrics(run)
        losses = [r["loss"] for r in recs if "loss" in r and args.branch < r["step"] <= args.branch + 20]
        vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r and r["step"] > args.branch]
        return {"worst_loss_20_steps_after": round(max(losses), 4), "final_val_loss": round(vals[-1][1], 4)}

    rows = {"no gate (continue the base run)": summary(work / "base")}
    for name, init, rwkv_lm_style in (("ours, init rwkv-lm-2024 (gain 0.1), AdamW kept", "rwkv-lm-2024", False),
                                      ("ours, init v5.2-2023 (gain 1.0), AdamW kept", "v5.2-2023", False),
                                      ("RWKV-LM load_partial: default Linear init, optimizer restarted", "rwkv-lm-2024", True)):  # noqa: E501
        out = work / f"gate-{len(rows)}"
        res = add_gate_to_run(work / "base", out, step=args.branch, init=init)
        if rwkv_lm_style:
            path = RunDir(out).checkpoints()[args.branch].engine_state
            state = torch.load(path, weights_only=True)
            for i in range(2):
                w = state["model"][f"blocks.{i}.att.gate.weight"]
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default
            state["optimizer"]["state"] = {}
            torch.save(state, path)
        train(res.config, resume="latest")
        rows[name] = summary(out)
    print(json.dumps({"torch": torch.__version__, "seconds": round(time.time() - t0, 1), "branch": args.branch,
                      "steps": args.steps, "rows": rows}, indent=1))  # fmt: skip
    print("\n| variant | worst train loss, 20 steps after the branch | final val loss |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['worst_loss_20_steps_after']} | {r['final_val_loss']} |")


if __name__ == "__main__":
    main()
