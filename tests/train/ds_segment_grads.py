"""Run under a 2-process DeepSpeed launch by test_deepspeed_segmented.py: one segmented micro-step of a tiny model
under ZeRO stage argv[1] with segments of argv[2] tokens; rank 0 saves the loss and the full gradients to argv[3].
Every rank gets the same window, so DeepSpeed's average over ranks is that window's gradient."""

import sys

import torch
from deepspeed.utils import safe_get_full_grad

from rwkvctl.data.loader import Batch
from rwkvctl.model.registry import build_model, initialize
from rwkvctl.train.config import RunConfig
from rwkvctl.train.deepspeed_engine import DeepSpeedEngine

MODEL = {"model.n_layer": 2, "model.n_embd": 64, "model.vocab_size": 64, "model.head_size": 32}


def main() -> None:
    stage, segment, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cfg = RunConfig().with_overrides({**MODEL, "data.ctx_len": 64, "train.segment_len": segment,
                                      "train.strategy": "deepspeed", "train.zero_stage": stage,
                                      "train.precision": "fp32", "train.micro_bsz": 2, "train.accum": 1})
    torch.manual_seed(0)
    model = initialize(build_model(cfg.model), "v5.2-2023", seed=0)
    engine = DeepSpeedEngine(model, cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 64), generator=g)
    loss = engine.micro_step(Batch(x, torch.roll(x, -1, 1)), accum=1)
    grads = {n: safe_get_full_grad(p).detach().float().cpu().clone() for n, p in engine.ds.module.named_parameters()}
    if engine.rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    engine.close()


if __name__ == "__main__":
    main()
