"""The single-process engine's helpers: device resolution and gradient-norm clipping on any supported torch."""

import pytest
import torch

from rwkvctl.errors import ConfigError
from rwkvctl.train.engine import clip_grads_to, resolve_device, total_grad_norm


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match="use --device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["bogus", "meta", "cuda:x"])
def test_unknown_devices_are_config_errors(name):
    with pytest.raises(ConfigError, match="train.device"):
        resolve_device(name)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 5), (7,), (3, 3))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_norm_and_clip_fall_back_on_torch_without_the_2_6_helpers(monkeypatch, max_norm):
    """torch < 2.6 has neither get_total_norm nor clip_grads_with_norm_ (pyproject allows torch>=2.4)."""
    new = _params(0)
    norm_new = total_grad_norm(new)
    clip_grads_to(new, max_norm, norm_new)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    monkeypatch.delattr(torch.nn.utils, "clip_grads_with_norm_", raising=False)
    old = _params(0)
    norm_old = total_grad_norm(old)
    assert torch.allclose(norm_old, norm_new)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(_params(0), old, strict=True))  # measuring changes nothing
    clip_grads_to(old, max_norm, norm_old)
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    clipped = total_grad_norm(old)
    assert clipped <= max_norm * (1 + 1e-5) and (max_norm < norm_old or torch.allclose(clipped, norm_old))


def test_deepspeed_runs_without_the_extra_name_what_to_install(monkeypatch):
    import sys

    from rwkvctl.errors import ConfigError
    from rwkvctl.train.engine import load_deepspeed_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError(name="deepspeed")
    monkeypatch.delitem(sys.modules, "rwkvctl.train.deepspeed_engine", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'rwkvctl\[deepspeed\]'"):
        load_deepspeed_engine()
