"""The vectorised range search (rwkvctl.quant.search): never worse than min/max, activation weighting pays off
where it is measured, chunking and worker threads change nothing."""

from __future__ import annotations

import pytest
import torch

from rwkvctl.quant import search
from rwkvctl.quant.groupwise import dequantize, quantize_weight
from rwkvctl.quant.search import codes_and_residual, search_chunk, stored_scale_min


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    spikes = torch.rand(rows, cols, generator=gen) < 0.01
    return torch.where(spikes, w * 8, w)  # a few outliers per group, as trained matrices have


@pytest.mark.parametrize("bits", [4, 8])
def test_search_is_never_worse_than_min_max_in_any_group(bits: int) -> None:
    x = heavy_tailed(64, 256).view(64, 4, 64)  # (rows, groups, group)
    levels = 2**bits - 1
    _, _, _, err_plain = search_chunk(x, levels, False, None)
    codes, s, m, err = search_chunk(x, levels, True, None)
    assert (err <= err_plain * (1 + 1e-5) + 1e-12).all()
    assert err.sum() < err_plain.sum() * (0.95 if bits == 4 else 0.999)
    # the reported error is the error of what is stored
    decoded = codes.float() * s.half().float().unsqueeze(-1) + m.half().float().unsqueeze(-1)
    assert torch.allclose((decoded - x).square().sum(-1), err, rtol=1e-3, atol=1e-10)


def test_residual_form_of_the_error_matches_the_decoded_error() -> None:
    x = heavy_tailed(8, 64).view(8, 1, 64)
    s, m = stored_scale_min(x.amin(-1), x.amax(-1), 15)
    codes, r = codes_and_residual(x, s, m, 15)
    direct = (codes * s.unsqueeze(-1) + m.unsqueeze(-1) - x).square().sum(-1)
    assert torch.allclose(r.square().sum(-1) * s.square(), direct, rtol=1e-4)


def test_importance_weighting_lowers_the_weighted_error() -> None:
    """With a few input channels carrying most of the activation energy, the weighted search must store those
    columns better than the unweighted one: less output error for the same bits."""
    w = heavy_tailed(128, 256, seed=3)
    gen = torch.Generator().manual_seed(4)
    importance = torch.rand(256, generator=gen) ** 8 * 100 + 0.01  # (in,): a few channels dominate
    plain = quantize_weight(w, 4, 64)
    weighted = quantize_weight(w, 4, 64, importance=importance)

    def output_error(q) -> float:
        restored = dequantize(q.stored["qweight"], q.stored["scale"], q.stored["min"], 4, 64)
        return float(((restored - w).square() * importance).sum())

    assert output_error(weighted) < 0.9 * output_error(plain)


def test_chunks_and_workers_give_the_same_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    w = heavy_tailed(100, 128, seed=5)
    whole = quantize_weight(w, 4, 64)
    monkeypatch.setattr("rwkvctl.quant.search.CHUNK_ELEMENTS", 128 * 7 * 8)  # 7 rows x 8 candidates: a short last one
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chunked = quantize_weight(w, 4, 64)
        assert torch.get_num_threads() == 2  # the search restores the caller's thread count
    finally:
        torch.set_num_threads(threads)
    for name in ("qweight", "scale", "min"):
        assert torch.equal(whole.stored[name], chunked.stored[name])
    assert chunked.rel_error == pytest.approx(whole.rel_error, rel=1e-6)


def test_bf16_weights_and_non_finite_values() -> None:
    w = heavy_tailed(16, 64)
    assert quantize_weight(w.bfloat16(), 4, 64).rel_error < 0.2
    w[3, 5] = float("nan")
    from rwkvctl.errors import ConfigError

    with pytest.raises(ConfigError, match="NaN"):
        quantize_weight(w, 4, 64)


def test_eight_bit_tries_min_max_only() -> None:
    assert search.RANGE_RATIOS_8BIT == (1.0,) and 1.0 in search.RANGE_RATIOS
