"""place_in_large_pages: the weights decode streams move into one 2 MB-aligned mapping; values, outputs, parameter
objects and shared storage are unchanged; a no-op where it cannot help."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwkvctl.config import ModelConfig
from rwkvctl.model import large_pages
from rwkvctl.model.large_pages import LARGE_PAGE, large_pages_available, place_in_large_pages

CFG = ModelConfig(n_layer=2, n_embd=128, vocab_size=300)
needs_thp = pytest.mark.skipif(large_pages_available() is not None, reason=str(large_pages_available()))


@pytest.fixture
def small_tensors_move(monkeypatch):
    monkeypatch.setattr(large_pages, "MIN_BYTES", 16 << 10)  # the tiny test models' matrices (128 x 128 fp32 = 64 KB)


def _steps(model, tokens):
    state, outs = None, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            outs.append(logits)
    return torch.stack(outs, 1), state


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moves_the_streamed_weights_and_changes_no_result(random_model, small_tensors_move, dtype):
    model = random_model(CFG).to(dtype).eval()
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(0))
    before, before_state = _steps(model, tokens)  # also fills the fast path's per-block argument cache
    with torch.no_grad():
        full_before = model(tokens)[0]
    weight = model.blocks[0].att.key.weight
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    emb_ptr = model.emb.weight.data_ptr()

    placed = place_in_large_pages(model)

    assert placed.skipped is None and placed.tensors > 0
    assert model.blocks[0].att.key.weight is weight  # the same Parameter, new storage
    moved = [p for n, p in model.named_parameters() if p.numel() * p.element_size() >= large_pages.MIN_BYTES
             and n != "emb.weight"]
    assert placed.tensors == len(moved) and placed.moved_bytes == sum(p.numel() * p.element_size() for p in moved)
    assert min(p.data_ptr() for p in moved) % LARGE_PAGE == 0  # the mapping's first tensor starts a 2 MB page
    assert model.emb.weight.data_ptr() == emb_ptr  # lookup tables stay where they are
    assert model.blocks[0].ln1.weight.numel() * 4 < large_pages.MIN_BYTES  # small vectors too
    for n, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, values[n]), n
    after, after_state = _steps(model, tokens)
    assert torch.equal(after, before) and torch.equal(after_state.wkv, before_state.wkv)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], full_before)


@needs_thp
def test_packed_tiles_move_and_decode_the_same(random_model, small_tensors_move):
    from rwkvctl.quant.linear import prepare_packed, use_packed_weights
    from rwkvctl.quant.schemes import encode_with

    model = random_model(CFG).eval()
    packed = {n: encode_with("group-affine", p.detach(), bits=4)[0] for n, p in model.named_parameters()
              if n.startswith("blocks.") and p.dim() == 2 and "time_" not in n}
    assert use_packed_weights(model, packed)
    prepare_packed(model)
    tokens = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(1))
    before, _ = _steps(model, tokens)
    placed = place_in_large_pages(model)
    assert placed.tensors > 0 and any(b.data_ptr() % LARGE_PAGE == 0 for b in model.buffers())
    after, _ = _steps(model, tokens)
    assert torch.equal(after, before)


@needs_thp
def test_tied_and_viewed_tensors_stay_shared(small_tensors_move):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(128, 64, bias=False)
            self.b = nn.Linear(128, 64, bias=False)
            self.b.weight = self.a.weight  # one Parameter in two modules
            self.register_buffer("part", torch.randn(64, 128)[:32])  # a view: does not own its storage

    m = Tied()
    part_ptr = m.part.data_ptr()
    placed = place_in_large_pages(m)
    assert placed.tensors == 2  # one storage, listed under both modules
    assert m.a.weight is m.b.weight and m.a.weight.data_ptr() % LARGE_PAGE == 0
    assert m.part.data_ptr() == part_ptr


@needs_thp
def test_a_storage_shared_with_an_embedding_or_a_view_stays(small_tensors_move):
    """Moving one tensor of a storage that also backs an ineligible one would split them: neither moves."""
    emb, head = nn.Embedding(64, 128), nn.Linear(128, 64, bias=False)
    head.weight = nn.Parameter(emb.weight.detach())  # a different Parameter on the embedding's storage
    with_emb = nn.ModuleDict({"emb": emb, "head": head})
    with_view = nn.Linear(128, 64, bias=False)
    with_view.register_buffer("top", with_view.weight.detach()[:8])  # a view of the weight's storage
    for m in (with_emb, with_view):
        ptrs = [t.data_ptr() for t in (*m.parameters(), *m.buffers())]
        assert place_in_large_pages(m).skipped == "no tensor large enough to move"
        assert [t.data_ptr() for t in (*m.parameters(), *m.buffers())] == ptrs


def test_a_refused_mapping_leaves_the_model_as_loaded(small_tensors_move, monkeypatch):
    if large_pages_available() is not None:
        pytest.skip(str(large_pages_available()))
    lin = nn.Linear(128, 64, bias=False)
    ptr = lin.weight.data_ptr()

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(large_pages.mmap, "mmap", refuse)
    placed = place_in_large_pages(lin)
    assert placed.tensors == 0 and "could not be made" in placed.skipped and lin.weight.data_ptr() == ptr


def test_switched_off_or_unavailable_moves_nothing(random_model, small_tensors_move, monkeypatch, tmp_path):
    model = random_model(CFG)
    ptrs = [p.data_ptr() for p in model.parameters()]
    monkeypatch.setenv("RWKVCTL_LARGE_PAGES", "off")
    placed = place_in_large_pages(model)
    assert placed.tensors == 0 and "RWKVCTL_LARGE_PAGES" in placed.skipped
    monkeypatch.delenv("RWKVCTL_LARGE_PAGES")
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(large_pages, "_THP_SETTING", never)
    assert "disabled" in place_in_large_pages(model).skipped
    monkeypatch.setattr(large_pages, "_THP_SETTING", tmp_path / "missing")
    assert "not readable" in place_in_large_pages(model).skipped
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_nothing_large_enough(random_model):
    placed = place_in_large_pages(random_model(CFG))  # default MIN_BYTES: the tiny model has no such tensor
    assert placed.tensors == 0 and placed.skipped is not None
