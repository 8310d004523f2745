"""DeepSpeed optimizer steps with a non-finite gradient norm: skipped by DeepSpeed, or a clear stop."""

import math

import deepspeed  # noqa: F401  (a runtime dependency: fail, never skip)
import pytest

from rwkvctl.errors import TrainingError
from rwkvctl.train.config import RunConfig
from rwkvctl.train.deepspeed_engine import DeepSpeedEngine, ds_config


class _FakeDS:
    def __init__(self, norm):
        self.norm, self.steps = norm, 0

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return self.norm


class _FakeOptimizer:
    def __init__(self, overflow):
        self.overflow = overflow
        self.param_groups = [{"lr": 1.0, "lr_scale": 1.0}]


def _engine(norm, overflow):
    e = DeepSpeedEngine.__new__(DeepSpeedEngine)  # no process group needed: only the step logic is exercised
    e.ds, e.optimizer, e.name = _FakeDS(norm), _FakeOptimizer(overflow), "deepspeed-zero3"
    return e


def test_finite_norm_is_returned():
    assert _engine(0.5, False).optimizer_step(1e-3) == 0.5


def test_overflow_skipped_by_deepspeed_is_reported_as_non_finite():
    assert math.isinf(_engine(float("inf"), True).optimizer_step(1e-3))


def test_non_finite_norm_applied_by_deepspeed_stops_with_a_clear_error():
    with pytest.raises(TrainingError, match="resume from the last checkpoint"):
        _engine(float("nan"), False).optimizer_step(1e-3)


def test_bf16_config_asks_deepspeed_to_skip_overflowing_steps():
    cfg = RunConfig().with_overrides({"train.precision": "bf16", "train.strategy": "deepspeed"})
    assert ds_config(cfg, 1, False)["bf16"] == {"enabled": True, "check_grad_overflow": True}
