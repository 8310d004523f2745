"""check_finite: the one place non-finite weights are refused on load, for every float dtype."""

from pathlib import Path

import pytest
import torch

from rwkvctl.errors import CheckpointError
from rwkvctl.io.checkpoint import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_single_non_finite_value_is_named(dtype: torch.dtype, bad: float) -> None:
    for where in (0, 777, -1):  # first, middle, last: a reduction must not miss an edge
        t = torch.randn(40, 50).to(dtype)
        t.view(-1)[where] = bad
        with pytest.raises(CheckpointError, match=r"m\.pth: tensor w holds 1 NaN/Inf value\(s\) of 2000"):
            check_finite({"ok": torch.ones(3), "w": t}, Path("m.pth"))


def test_finite_empty_and_integer_tensors_pass() -> None:
    check_finite({"a": torch.randn(8, 8), "empty": torch.empty(0, 4), "ids": torch.arange(5),
                  "big": torch.full((3,), 3.0e38), "tiny": torch.full((2,), 1e-45)}, Path("m.pth"))  # fmt: skip
