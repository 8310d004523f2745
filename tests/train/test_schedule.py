"""The lr schedule is a pure function of the global step: warm-up, cosine, and nothing run-local."""

import math

import pytest

from rwkvctl.train.schedule import WARMUP_START, lr_at, planned_steps

KW = {"lr_init": 2e-4, "lr_final": 1.47e-4, "warmup_steps": 10, "total_steps": 110}


def test_warmup_starts_at_one_percent_and_reaches_peak():
    assert lr_at(0, **KW) == pytest.approx(2e-4 * WARMUP_START)
    lrs = [lr_at(s, **KW) for s in range(10)]
    assert all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert lr_at(10, **KW) == pytest.approx(2e-4)


def test_cosine_ends_exactly_at_lr_final_and_stays_there():
    assert lr_at(109, **KW) == pytest.approx(1.47e-4)
    assert lr_at(500, **KW) == pytest.approx(1.47e-4)
    mid = lr_at(60, **KW)
    # halfway through the cosine (progress ~0.505) the lr is about the mean of the endpoints
    assert mid == pytest.approx(1.47e-4 + (2e-4 - 1.47e-4) * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    decay = [lr_at(s, **KW) for s in range(10, 110)]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))


def test_pure_function_of_the_step_so_resume_never_rewarms():
    # what a resumed run asks for at step 57 is what the uninterrupted run used at step 57
    first = [lr_at(s, **KW) for s in range(110)]
    resumed = [lr_at(s, **KW) for s in range(57, 110)]
    assert first[57:] == resumed
    assert lr_at(57, **KW) > 1.47e-4 and lr_at(57, **KW) < 2e-4  # no warm-up factor at step 57


def test_constant_lr_and_no_warmup():
    assert lr_at(0, lr_init=1e-3, lr_final=1e-3, warmup_steps=0, total_steps=5) == 1e-3
    assert lr_at(0, lr_init=1e-3, lr_final=0.0, warmup_steps=0, total_steps=3) == 1e-3
    assert lr_at(2, lr_init=1e-3, lr_final=0.0, warmup_steps=0, total_steps=3) == pytest.approx(0.0)


def test_planned_steps_from_steps_tokens_or_one_pass():
    assert planned_steps(max_steps=7, max_tokens=10**9, tokens_per_step=100, pass_steps=3) == 7
    assert planned_steps(max_steps=0, max_tokens=1001, tokens_per_step=100, pass_steps=3) == 11
    assert planned_steps(max_steps=0, max_tokens=0, tokens_per_step=100, pass_steps=3) == 3
    with pytest.raises(ValueError):
        lr_at(-1, **KW)
