"""The compiled WKV5 op (csrc/) against the float64 reference: forward, every gradient, chained states."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch

from rwkvctl.kernels import reference

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the extension")


@pytest.fixture(scope="module", autouse=True)
def ext():
    from rwkvctl.kernels.build import load_extension

    return load_extension()


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 inputs in the ranges a trained RWKV-5 produces (decays from ~0.07 to ~0.998)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "r": torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        "k": torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * 0.5,
        "v": torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        "w": torch.rand(H, N, generator=g, dtype=torch.float64) * 5 - 4.5,
        "u": torch.randn(H, N, generator=g, dtype=torch.float64) * 0.5,
        "s": torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.5,
        "gy": torch.randn(B, T, H, N, generator=g, dtype=torch.float64),
        "gs": torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.1,
    }


NAMES = ("r", "k", "v", "w", "u", "s")


def run_with_grads(fn, x: dict[str, torch.Tensor], dtype: torch.dtype | None = None, strided: bool = False):
    """y, s_out and the gradients of <y, gy> + <s_out, gs> w.r.t. r, k, v, w, u, s_in.

    dtype: r, k, v are cast to it (w, u, s_in stay as given). strided: r reaches `fn` as a slice of a wider
    tensor and k as a transposed (B, H, T, N) tensor, both non-contiguous views of the gradient leaves.
    """
    leaves = {}
    for name in NAMES:
        t = x[name]
        if dtype is not None and name in ("r", "k", "v"):
            t = t.to(dtype)
        leaves[name] = t.detach().clone().requires_grad_()
    inputs = dict(leaves)
    if strided:
        r = leaves["r"]
        inputs["r"] = torch.stack([torch.zeros_like(r), r], dim=-1).flatten(-2)[..., 1::2]  # (B,T,H,N), stride 2
        inputs["k"] = leaves["k"].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs["r"].is_contiguous()
    y, s_out = fn(*(inputs[n] for n in NAMES))
    loss = (y.double() * x["gy"]).sum() + (s_out.double() * x["gs"]).sum()
    loss.backward()
    return y.detach(), s_out.detach(), {n: leaves[n].grad for n in NAMES}


BMAX, HMAX = 3, 4  # every grid shape is a slice of this one, so one reference run per (T, N) serves them all


@functools.cache
def reference_full(T: int, N: int):
    """float64 reference at (BMAX, T, HMAX, N), run as one batch of BMAX*HMAX heads so gw/gu stay per batch."""
    x = make_inputs(BMAX, T, HMAX, N)
    # r, k, v exactly representable in bf16: the bf16 tests see the very inputs the reference saw
    x.update({n: x[n].to(torch.bfloat16).double() for n in ("r", "k", "v")})

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, H, N) -> (1, T, B*H, N)
        return t.transpose(0, 1).reshape(1, T, BMAX * HMAX, N)

    flat = {n: heads(x[n]) for n in ("r", "k", "v", "gy")}
    flat.update({n: x[n].repeat(BMAX, 1) for n in ("w", "u")})  # row b*H + h
    flat.update({n: x[n].reshape(1, BMAX * HMAX, N, N) for n in ("s", "gs")})
    fn = reference.wkv5_loop if T < 16 else reference.wkv5_chunked  # float64 either way
    y, s_out, grads = run_with_grads(fn, flat)

    def unheads(t: torch.Tensor) -> torch.Tensor:  # (1, T, B*H, N) -> (B, T, H, N)
        return t.reshape(T, BMAX, HMAX, N).transpose(0, 1)

    grads = {n: unheads(grads[n]) for n in ("r", "k", "v")} | {
        "w": grads["w"].view(BMAX, HMAX, N),
        "u": grads["u"].view(BMAX, HMAX, N),
        "s": grads["s"].view(BMAX, HMAX, N, N),
    }
    return x, (unheads(y), s_out.view(BMAX, HMAX, N, N), grads)


def reference_run(B: int, T: int, H: int, N: int):
    """Inputs and float64 reference results (y, s_out, grads) for a (B, T, H, N) slice of `reference_full`."""
    x, (y, s_out, grads) = reference_full(T, N)
    sub = {n: x[n][:B, :, :H] for n in ("r", "k", "v", "gy")} | {n: x[n][:H] for n in ("w", "u")}
    sub |= {n: x[n][:B, :H] for n in ("s", "gs")}
    sub_grads = {n: grads[n][:B, :, :H] for n in ("r", "k", "v")} | {"s": grads["s"][:B, :H]}
    sub_grads |= {n: grads[n][:B, :H].sum(0) for n in ("w", "u")}  # shared parameters: summed over the batch
    return {n: t.contiguous() for n, t in sub.items()}, (y[:B, :, :H], s_out[:B, :H], sub_grads)


def op(r, k, v, w, u, s):
    return torch.ops.rwkvctl.wkv5_fwd(r, k, v, w, u, s)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp(min=1e-30)).item()


def check_against_reference(got, want, dtype: torch.dtype, tag: str) -> None:
    y, s_out, grads = got
    y_ref, s_ref, grads_ref = want
    metric, tol = (rel_max, 2e-5) if dtype == torch.float32 else (rel_rms, 5e-3)
    assert y.dtype == dtype and s_out.dtype == torch.float32
    errors = {"y": metric(y, y_ref), "s_out": metric(s_out, s_ref)}
    errors.update({f"g{n}": metric(grads[n], grads_ref[n]) for n in NAMES})
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"{tag}: errors above {tol}: {bad}"


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 129, 1000])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("H", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grid_against_reference(T, B, H, dtype):
    N = 64
    x, want = reference_run(B, T, H, N)
    got = run_with_grads(op, {n: t.float() for n, t in x.items()}, dtype, strided=True)
    check_against_reference(got, want, dtype, f"B={B} T={T} H={H} {dtype}")


@pytest.mark.parametrize("N", [16, 32, 128])
def test_other_head_sizes(N):
    x, want = reference_run(2, 33, 2, N)
    got = run_with_grads(op, {n: t.float() for n, t in x.items()})
    check_against_reference(got, want, torch.float32, f"N={N}")


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_instruction_set(isa, monkeypatch):
    monkeypatch.setenv("RWKVCTL_CPU_ISA", isa)
    x, want = reference_run(3, 64, 4, 64)
    got = run_with_grads(op, {n: t.float() for n, t in x.items()})
    check_against_reference(got, want, torch.float32, isa)


def two_segments(r, k, v, w, u, s, split: int):
    """The op over [0, split) then [split, T), the state carried from the first segment into the second."""
    y1, s1 = op(r[:, :split], k[:, :split], v[:, :split], w, u, s)
    y2, s2 = op(r[:, split:], k[:, split:], v[:, split:], w, u, s1)
    return torch.cat([y1, y2], dim=1), s2


def test_chained_segments_match_one_long_run():
    """Two segments with the state carried (and back-propagated) through == one run over the whole sequence."""
    x = {n: t.float() for n, t in make_inputs(2, 80, 2, 64, seed=3).items()}
    whole = run_with_grads(op, x)
    chained = run_with_grads(functools.partial(two_segments, split=37), x)
    check_against_reference(chained, whole, torch.float32, "chained vs whole")
    # and both against the float64 reference
    check_against_reference(
        chained,
        run_with_grads(reference.wkv5_loop, {n: t.double() for n, t in x.items()}),
        torch.float32,
        "chained vs reference",
    )


def test_state_only_loss_and_zero_state():
    """Backward works when only s_out is used (gy is None) and when the public wrapper makes the zero state."""
    from rwkvctl.kernels.ops import wkv5_compiled

    x = {n: t.float() for n, t in make_inputs(2, 20, 2, 64, seed=4).items()}
    leaves = [x[n].clone().requires_grad_() for n in NAMES[:5]]
    _, s_out = wkv5_compiled(*leaves, None)
    s_out.pow(2).sum().backward()
    ref_leaves = [x[n].double().requires_grad_() for n in NAMES[:5]]
    _, s_ref = reference.wkv5_loop(*ref_leaves, None)
    s_ref.pow(2).sum().backward()
    for name, a, b in zip(NAMES[:5], leaves, ref_leaves, strict=True):
        if name in ("r", "u"):  # they only reach y: no path to the state
            assert b.grad is None and torch.count_nonzero(a.grad) == 0, name
        else:
            assert rel_max(a.grad, b.grad) < 2e-5, name


@pytest.mark.parametrize("chunk", ["1", "7", "64", "auto"])
def test_time_chunked_cpu_forward(chunk, monkeypatch):
    """The state-passing forward used when B*H is smaller than the thread count (forced, uneven, automatic)."""
    if chunk == "auto":
        monkeypatch.delenv("RWKVCTL_CPU_CHUNK", raising=False)
        before = torch.get_num_threads()
        torch.set_num_threads(4)  # >= 4 threads per (b, h) pair and T >= 128: chunks automatically
    else:
        monkeypatch.setenv("RWKVCTL_CPU_CHUNK", chunk)
    try:
        x, want = reference_run(1, 129, 1, 64)
        got = run_with_grads(op, {n: t.float() for n, t in x.items()})
    finally:
        if chunk == "auto":
            torch.set_num_threads(before)
    check_against_reference(got, want, torch.float32, f"chunk={chunk}")


def test_threads_do_not_change_results():
    x = {n: t.float() for n, t in make_inputs(3, 50, 4, 64, seed=5).items()}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(op, x)
        torch.set_num_threads(2)
        two = run_with_grads(op, x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip([one[0], one[1], *one[2].values()], [two[0], two[1], *two[2].values()], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    x = make_inputs(2, 9, 2, 16, seed=6)
    args = [x[n].to(dtype if n in ("r", "k", "v") else torch.float32).requires_grad_() for n in NAMES]
    torch.library.opcheck(torch.ops.rwkvctl.wkv5_fwd.default, tuple(args))
    bwd_args = (*[a.detach() for a in args], x["gy"].to(dtype), x["gs"].float())
    torch.library.opcheck(torch.ops.rwkvctl.wkv5_bwd.default, bwd_args)
    torch.library.opcheck(torch.ops.rwkvctl.wkv5_bwd.default, (*bwd_args[:-1], None))


def test_torch_compile_fullgraph():
    from rwkvctl.kernels import wkv5

    x = {n: t.float() for n, t in make_inputs(2, 12, 2, 64, seed=7).items()}
    compiled = torch.compile(wkv5, fullgraph=True, backend="aot_eager")
    got = run_with_grads(compiled, x)
    check_against_reference(got, run_with_grads(op, x), torch.float32, "torch.compile")


def test_bad_inputs_give_one_line_errors():
    x = {n: t.float() for n, t in make_inputs(1, 4, 2, 64).items()}
    with pytest.raises(RuntimeError, match=r"w \(time_decay\) must be \(H, N\)"):
        op(x["r"], x["k"], x["v"], x["w"][:1], x["u"], x["s"])
    with pytest.raises(RuntimeError, match="s_in must be float32"):
        op(x["r"], x["k"], x["v"], x["w"], x["u"], x["s"].double())
    small = {n: t[..., :8] if n in "rkvwu" else t for n, t in x.items()}
    with pytest.raises(RuntimeError, match="head size N=8 is not compiled"):
        op(small["r"], small["k"], small["v"], small["w"], small["u"], torch.zeros(1, 2, 8, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 129, 1000])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("H", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_grid_against_reference(T, B, H, dtype, ext):
    if not ext.with_cuda:
        pytest.fail("torch has CUDA but the extension was built without it (CUDA_HOME/nvcc missing?)")
    x, want = reference_run(B, T, H, 64)
    got = run_with_grads(op, {n: t.float().cuda() for n, t in x.items()}, dtype, strided=True)
    got = (got[0].cpu(), got[1].cpu(), {n: g.cpu() for n, g in got[2].items()})
    check_against_reference(got, want, dtype, f"cuda B={B} T={T} H={H} {dtype}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunk", ["0", "7", "1000"], ids=["auto", "chunks-of-7", "single-pass"])
def test_cuda_opcheck_and_chaining(ext, chunk, monkeypatch):
    monkeypatch.setenv("RWKVCTL_CUDA_CHUNK", chunk)  # the CUDA host code reads it on every call
    x = {n: t.float().cuda() for n, t in make_inputs(2, 40, 2, 64, seed=8).items()}
    args = tuple(x[n].requires_grad_() for n in NAMES)
    torch.library.opcheck(torch.ops.rwkvctl.wkv5_fwd.default, args)
    whole = run_with_grads(op, x)
    chained = run_with_grads(functools.partial(two_segments, split=17), x)
    check_against_reference(chained, whole, torch.float32, "cuda chained")
    want = run_with_grads(reference.wkv5_loop, {n: t.double().cpu() for n, t in x.items()})
    check_against_reference(
        (whole[0].cpu(), whole[1].cpu(), {n: g.cpu() for n, g in whole[2].items()}),
        want,
        torch.float32,
        f"cuda chunk={chunk}",
    )
