"""The fast CPU paths (rwkvctl/model/cpu_fast.py, csrc/rnn_step_cpu.cpp, csrc/rnn_step_model_cpu.cpp) against the
module path they replace.

Tolerances: fp32 differs from the reference only in summation order (1e-5 of the largest logit); bf16 computes in
fp32 with bf16 weights where the reference computes in bf16 (on CPUs with AVX512-BF16 the matmul inputs are rounded
to bf16 as the reference rounds them, or keep 16 significant bits with RWKVCTL_BF16_INPUT=split), so it is compared
with an fp32 run on the same (bf16-rounded) weights, the bf16 rounding of the logits being the error left (2^-8
relative).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from rwkvctl.config import ModelConfig
from rwkvctl.errors import ConfigError, KernelUnavailable
from rwkvctl.model import cpu_fast, step_args
from rwkvctl.model.state import RecurrentState

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the extension")

CONFIGS = {
    "gate": ModelConfig(n_layer=2, n_embd=128, vocab_size=300),
    "no-gate": ModelConfig(n_layer=2, n_embd=128, vocab_size=300, gate=False),
    "head32": ModelConfig(n_layer=3, n_embd=96, vocab_size=77, head_size=32, dim_ffn=224),
    "head24-odd": ModelConfig(n_layer=2, n_embd=96, vocab_size=101, head_size=24, dim_att=96, dim_ffn=160),
}


def _steps(model, tokens: torch.Tensor, state: RecurrentState | None = None):
    """Logits of every step (B, T, V) and the final state, one token per call."""
    outs = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            outs.append(logits)
    return torch.stack(outs, 1), state


def _both(model, tokens, monkeypatch, state=None):
    """(fast, reference) results of the same steps."""
    monkeypatch.setenv("RWKVCTL_STEP", "fused")
    fast = _steps(model, tokens, None if state is None else state.clone())
    monkeypatch.setenv("RWKVCTL_STEP", "reference")
    ref = _steps(model, tokens, None if state is None else state.clone())
    monkeypatch.delenv("RWKVCTL_STEP")
    return fast, ref


def _assert_state_close(a: RecurrentState, b: RecurrentState, rtol: float, atol: float) -> None:
    for name in ("att_shift", "ffn_shift", "wkv"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("batch", [1, 3, 9])  # 9: the fp32 head runs as head @ x.T from 8 rows on
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_equals_reference_fp32(random_model, monkeypatch, name, batch):
    cfg = CONFIGS[name]
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(batch))
    (fast, fast_state), (ref, ref_state) = _both(model, tokens, monkeypatch)
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 1e-5 * scale
    # fp32 rounding differs between BLAS's gemv and its gemm blockings: bounded relative to the state's magnitude
    _assert_state_close(fast_state, ref_state, rtol=1e-5, atol=max(1e-5, 1e-6 * float(ref_state.wkv.abs().max())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_batch_rows_equal_single_rows(random_model, dtype):
    """bf16 (own kernel, rows independent of the batch) bitwise; fp32 goes through torch's BLAS, whose gemv and
    gemm round differently (as on the module path): logits within 4e-6 of the scale, states within 1e-6 of theirs."""
    model = random_model(CONFIGS["gate"]).to(dtype)
    tokens = torch.randint(0, 300, (9, 4), generator=torch.Generator().manual_seed(5))  # 9 rows: see _head
    batched, state = _steps(model, tokens)
    for row in range(9):
        single, single_state = _steps(model, tokens[row : row + 1])
        if dtype == torch.bfloat16:
            assert torch.equal(batched[row], single[0])
            assert torch.equal(state.wkv[:, row], single_state.wkv[:, 0])
        else:
            assert (batched[row] - single[0]).abs().max() <= 4e-6 * single.abs().max()
            atol = max(1e-5, 1e-6 * float(single_state.wkv.abs().max()))  # as above: roundoff of the magnitude
            torch.testing.assert_close(state.wkv[:, row], single_state.wkv[:, 0], rtol=1e-5, atol=atol)


def test_fused_step_leaves_the_input_state_alone(random_model):
    model = random_model(CONFIGS["gate"])
    _, state = _steps(model, torch.tensor([[1, 2, 3]]))
    before = state.clone()
    with torch.no_grad():
        model.step(torch.tensor([4]), state)
    _assert_state_close(state, before, rtol=0, atol=0)


def _bf16_kernel() -> str:
    """The kernel bf16 weights take under the current RWKVCTL_CPU_ISA / RWKVCTL_BF16_INPUT, as the extension says."""
    from rwkvctl.kernels.build import load_extension

    load_extension()
    return torch.ops.rwkvctl.linear_bf16_kernel()


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bf16_input", ["", "split"])
def test_fused_step_bf16(random_model, monkeypatch, gate, batch, bf16_input):
    """Split inputs (16 significant bits) are at least as close to the fp32 run as the module path; inputs rounded to
    bf16 (the default on AVX512-BF16 CPUs, the module path's own rounding) no more than a quarter further."""
    monkeypatch.setenv("RWKVCTL_BF16_INPUT", bf16_input)
    cfg = ModelConfig(n_layer=2, n_embd=128, vocab_size=300, gate=gate)
    bf16 = random_model(cfg).to(torch.bfloat16)
    rounded = random_model(cfg)
    rounded.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # same weights in fp32
    tokens = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("RWKVCTL_STEP", "fused")
    fast, fast_state = _steps(bf16, tokens)
    monkeypatch.setenv("RWKVCTL_STEP", "reference")
    exact, exact_state = _steps(rounded, tokens)
    ref, ref_state = _steps(bf16, tokens)
    assert fast.dtype == torch.bfloat16 and fast_state.att_shift.dtype == torch.bfloat16
    slack = 1.25 if _bf16_kernel() == "dot-rounded" else 1.0
    _assert_closer_than_module_path((fast, fast_state), (ref, ref_state), (exact, exact_state), slack=slack)


def _assert_closer_than_module_path(fast, ref, exact, tol: float = 2e-2, slack: float = 1.0) -> None:
    """bf16 results (logits, state) vs the fp32 run on the same weights: within `tol` of each tensor's largest
    magnitude (fp32 arithmetic on bf16 weights: only the rounding of logits and stored shifts remains), and at
    least as close as the bf16 module path (`slack` times its error, plus 0.1% of the scale)."""
    for name, f, r, e in [("logits", fast[0], ref[0], exact[0])] + [
        (n, getattr(fast[1], n), getattr(ref[1], n), getattr(exact[1], n)) for n in ("att_shift", "ffn_shift", "wkv")
    ]:
        assert f.dtype == r.dtype and f.shape == e.shape, name
        scale = e.abs().max().item()
        err, ref_err = (f.float() - e).abs().max().item(), (r.float() - e).abs().max().item()
        assert err <= tol * scale, (name, err, scale)
        assert err <= slack * ref_err + 1e-3 * scale, (name, err, ref_err)


def test_fused_step_with_a_quantized_block(random_model, monkeypatch):
    """A block whose projections are QuantLinear runs in the whole-layer op too (the compiled packed matmul called
    from C++) beside plain blocks; with the reference matmul (RWKVCTL_QMM=reference) it takes the split step."""
    from rwkvctl.quant.linear import use_packed_weights
    from rwkvctl.quant.schemes import encode_with

    model = random_model(CONFIGS["gate"])
    packed = {
        name: encode_with("group-affine", p.detach(), bits=8)[0]
        for name, p in model.named_parameters()
        if name.startswith("blocks.1.") and p.dim() == 2 and "time_" not in name
    }
    assert use_packed_weights(model, packed)
    assert cpu_fast.layer_params(model.blocks[0], torch.float32).q_bits == [0] * 8
    packed_args = cpu_fast.layer_params(model.blocks[1], torch.float32)
    assert packed_args.q_bits == [8] * 8 and len(packed_args.q_aux) == 16
    assert cpu_fast.layer_params(model.blocks[1], torch.float32, rows=17) is None  # past the kernel's rows: split
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(7))
    (fast, fast_state), (ref, ref_state) = _both(model, tokens, monkeypatch)
    # QuantLinear's compiled matmul rounds its activations to int16 (~2e-5 relative per matmul, tests/quant), so
    # the fused block's fp32-order differences before it can move a code by one step
    assert (fast - ref).abs().max() <= 2e-4 * ref.abs().max()
    for name in ("att_shift", "ffn_shift", "wkv"):
        f, r = getattr(fast_state, name), getattr(ref_state, name)
        assert (f - r).abs().max() <= 1e-3 * r.abs().max(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["", "avx512bw", "avx2", "default"])  # avx512bw: widening bf16, not vdpbf16ps
@pytest.mark.parametrize("bf16_input", ["", "split"])
def test_linear_f32acc_odd_shapes(monkeypatch, dtype, isa, bf16_input):
    from rwkvctl.kernels.build import load_extension

    if bf16_input and (dtype != torch.bfloat16 or isa):
        pytest.skip("RWKVCTL_BF16_INPUT only matters to the AVX512-BF16 kernel")
    load_extension()
    monkeypatch.setenv("RWKVCTL_CPU_ISA", isa)
    monkeypatch.setenv("RWKVCTL_BF16_INPUT", bf16_input)
    kernel = _bf16_kernel()
    assert kernel in ("dot-rounded", "dot-split", "avx512", "avx2", "portable")
    if kernel.startswith("dot"):
        assert kernel == ("dot-split" if bf16_input else "dot-rounded") and isa in ("", "avx512")
    rounds_input = dtype == torch.bfloat16 and kernel == "dot-rounded"
    gen = torch.Generator().manual_seed(0)
    # K 300 and 2000: the sequential kernels' unrolled body, 16-wide steps and masked tail; 6 rows: torch's GEMM (fp32)
    for rows, n, k in ((1, 7, 77), (3, 130, 16), (5, 1, 1), (2, 64, 768), (4, 5, 300), (1, 9, 2000), (6, 3, 200)):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(k, rows, generator=gen).T  # non-contiguous (rows, k)
        got = torch.ops.rwkvctl.linear_f32acc(x, w)
        want = x.double() @ w.double().T
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        if rounds_input:
            # x rounded to bf16, as torch's bf16 Linear rounds it: equal to that product up to fp32 summation
            want = x.bfloat16().double() @ w.double().T
            bound = 1e-4 + 2.0**-20 * (x.double().abs() @ w.double().abs().T)
            assert ((got.double() - want).abs() <= bound).all()
        elif dtype == torch.bfloat16:
            # fp32 x widened weights, or (split) x as two bf16 parts (16 significant bits): <= 2^-16 of each product
            bound = 1e-4 + 2.0**-15 * (x.double().abs() @ w.double().abs().T)
            assert ((got.double() - want).abs() <= bound).all()
        else:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_a_bad_bf16_input_setting_is_refused_on_any_cpu(monkeypatch):
    """RWKVCTL_BF16_INPUT is checked by every step op, whichever kernel bf16 weights take on this CPU."""
    from rwkvctl.kernels.build import load_extension

    load_extension()
    monkeypatch.setenv("RWKVCTL_BF16_INPUT", "Split")
    with pytest.raises(RuntimeError, match="RWKVCTL_BF16_INPUT must be round or split, got 'Split'"):
        torch.ops.rwkvctl.linear_f32acc(torch.randn(1, 8), torch.randn(4, 8))


@pytest.mark.parametrize(("var", "value"), [("RWKVCTL_BF16_INPUT", "Split"), ("RWKVCTL_CPU_ISA", "avx-512")])
def test_bad_cpu_settings_are_a_config_error_before_any_op(random_model, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"{var} must be one of .*, got '{value}'"):
        _steps(random_model(CONFIGS["gate"]), torch.tensor([[1, 2]]))


def test_linear_f32acc_refuses_bad_weights():
    from rwkvctl.kernels.build import load_extension

    load_extension()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.rwkvctl.linear_f32acc(torch.randn(1, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.rwkvctl.linear_f32acc(torch.randn(1, 4), torch.randn(4, 3).T)


def test_reference_env_forces_the_module_path(random_model, monkeypatch):
    model = random_model(CONFIGS["gate"])

    def boom(*args):
        raise AssertionError("fused path taken")

    monkeypatch.setattr(cpu_fast, "fused_step", boom)
    monkeypatch.setenv("RWKVCTL_STEP", "reference")
    _steps(model, torch.tensor([[1, 2]]))
    monkeypatch.setenv("RWKVCTL_STEP", "auto")
    with pytest.raises(AssertionError, match="fused path taken"):
        _steps(model, torch.tensor([[1, 2]]))


def test_bad_mode_is_refused(monkeypatch, random_model):
    monkeypatch.setenv("RWKVCTL_STEP", "fast")
    with pytest.raises(KernelUnavailable, match="RWKVCTL_STEP must be one of"):
        _steps(random_model(CONFIGS["gate"]), torch.tensor([[1]]))


def test_autograd_keeps_the_module_path(random_model, monkeypatch):
    model = random_model(CONFIGS["gate"])
    monkeypatch.setenv("RWKVCTL_STEP", "fused")
    logits, _ = model.step(torch.tensor([1]))
    assert logits.requires_grad  # the module path, which has a backward


def test_one_notice_when_unavailable(random_model, monkeypatch, caplog):
    model = random_model(CONFIGS["gate"]).double()
    monkeypatch.setattr(cpu_fast.SWITCH, "warned", set())
    with caplog.at_level(logging.WARNING, logger="rwkvctl.model"):
        fast, _ = _steps(model, torch.tensor([[1, 2, 3]]))
    notices = [r for r in caplog.records if "module path" in r.getMessage()]
    assert len(notices) == 1 and "torch.float64" in notices[0].getMessage()
    assert fast.dtype == torch.float64
    monkeypatch.setenv("RWKVCTL_STEP", "fused")
    with pytest.raises(KernelUnavailable, match="RWKVCTL_STEP=fused but the model dtype"):
        _steps(model, torch.tensor([[1]]))


def test_notice_when_the_extension_cannot_load(random_model, monkeypatch, caplog):
    model = random_model(CONFIGS["gate"])
    monkeypatch.setattr(cpu_fast.SWITCH, "warned", set())
    monkeypatch.setattr(cpu_fast, "_extension_ready", lambda: "no C++ compiler")
    with caplog.at_level(logging.WARNING, logger="rwkvctl.model"):
        (fast, _), (ref, _) = _both_auto(model, monkeypatch)
    assert torch.equal(fast, ref)
    assert sum("no C++ compiler" in r.getMessage() for r in caplog.records) == 1


def _both_auto(model, monkeypatch):
    tokens = torch.tensor([[1, 2, 3]])
    fast = _steps(model, tokens)
    monkeypatch.setenv("RWKVCTL_STEP", "reference")
    ref = _steps(model, tokens)
    monkeypatch.delenv("RWKVCTL_STEP")
    return fast, ref


@pytest.mark.parametrize("last_only", [True, False])
@pytest.mark.parametrize("gate", [True, False])
def test_bf16_sequence_form_runs_in_fp32_blocks(random_model, monkeypatch, last_only, gate):
    cfg = ModelConfig(n_layer=2, n_embd=128, vocab_size=300, gate=gate)
    bf16 = random_model(cfg).to(torch.bfloat16)
    rounded = random_model(cfg)
    rounded.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 300, (2, 33), generator=gen)
    _, start = bf16(torch.randint(0, 300, (2, 5), generator=gen))  # an incoming state, in the model dtype
    monkeypatch.setattr(cpu_fast, "_HEAD_ROWS", 64)  # several head blocks
    monkeypatch.setattr(cpu_fast, "cpu_has_bf16_math", lambda: False)  # the upcast path, on any CPU
    with torch.no_grad():
        monkeypatch.setenv("RWKVCTL_STEP", "auto")
        assert cpu_fast.upcast_applies(bf16)
        fast, fast_state = bf16(idx, start.clone(), last_only=last_only)
        monkeypatch.setenv("RWKVCTL_STEP", "reference")
        ref, ref_state = bf16(idx, start.clone(), last_only=last_only)
        exact = rounded(idx, RecurrentState(*(t.float() for t in vars(start).values())), last_only=last_only)
    assert fast.shape == ref.shape and fast.dtype == torch.bfloat16
    _assert_closer_than_module_path((fast, fast_state), (ref, ref_state), exact)


def _packed_model(random_model, cfg: ModelConfig, bits: int, blocks: str = "blocks.", with_head: bool = False):
    """A random model whose block projections (under `blocks`, and the head `with_head`) are packed QuantLinear
    layers of `bits` bits."""
    from rwkvctl.quant.linear import use_packed_weights
    from rwkvctl.quant.schemes import encode_with

    model = random_model(cfg)
    packed = {
        name: encode_with("group-affine", p.detach(), bits=bits)[0]
        for name, p in model.named_parameters()
        if (name.startswith(blocks) or (with_head and name == "head.weight")) and p.dim() == 2 and "time_" not in name
    }
    assert use_packed_weights(model, packed)
    return model


def _split_and_module_steps(model, tokens, monkeypatch):
    """((fast logits, state), (module-path logits, state)) of 3 steps after a 2-token start; asserts that the fast
    path never ran Block.step and the reference did."""
    from rwkvctl.model.rwkv5 import Block

    _, start = _steps(model, tokens[:, :2])  # a non-zero incoming state
    calls = []
    real_step = Block.step
    monkeypatch.setattr(Block, "step", lambda *a: calls.append(1) or real_step(*a))
    monkeypatch.setenv("RWKVCTL_STEP", "fused")
    fast = _steps(model, tokens[:, 2:], start.clone())
    assert not calls  # the split path, not the module path
    monkeypatch.setenv("RWKVCTL_STEP", "reference")
    ref = _steps(model, tokens[:, 2:], start.clone())
    assert calls
    monkeypatch.delenv("RWKVCTL_STEP")
    return fast, ref


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_blocks_take_the_split_step(random_model, monkeypatch, bits, gate, batch):
    """Every block packed: the fused elementwise ops around the block's own projections (never Block.step).
    With the packed weights' reference matmul (RWKVCTL_QMM=reference) both paths compute the same products, so the
    split step equals the module path to fp32 summation order, like the fused step."""
    monkeypatch.setenv("RWKVCTL_QMM", "reference")  # read by each QuantLinear's first prepare()
    cfg = ModelConfig(n_layer=3, n_embd=128, vocab_size=300, gate=gate)
    model = _packed_model(random_model, cfg, bits)
    assert all(cpu_fast.layer_params(b, torch.float32) is None for b in model.blocks)
    tokens = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(batch + bits))
    (fast, fast_state), (ref, ref_state) = _split_and_module_steps(model, tokens, monkeypatch)
    assert fast.dtype == ref.dtype and fast.shape == ref.shape == (batch, 3, 300)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    _assert_state_within(fast_state, ref_state, 1e-5)  # 3 packed layers: wkv entries up to ~20


@pytest.mark.parametrize("path", ["layer", "split"])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_decode_with_the_compiled_matmul(random_model, monkeypatch, path, gate, batch):
    """The decode configuration (compiled packed matmul, int16 activations), in the whole-layer op and in the split
    step (taken for more rows than the kernel is for; forced here): every path is then within QuantLinear's
    tolerance of the exact products (RWKVCTL_QMM=reference on the same codes) and fp32-order differences can move
    an activation's int16 rounding, so the fast path is held to the module path's own error, plus 2e-4 of the
    scale (the tolerance of test_fused_step_with_a_quantized_block); states within 1e-3."""
    cfg = ModelConfig(n_layer=2, n_embd=128, vocab_size=300, gate=gate)
    tokens = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(11 + batch))
    monkeypatch.setenv("RWKVCTL_QMM", "reference")
    (_, _), (exact, exact_state) = _split_and_module_steps(_packed_model(random_model, cfg, 4), tokens, monkeypatch)
    monkeypatch.setenv("RWKVCTL_QMM", "compiled")
    model = _packed_model(random_model, cfg, 4)  # same seed, same codes; prepared for the compiled kernel
    layer_calls = []
    real_params = cpu_fast.layer_params

    def params(block, dtype, rows=1):
        found = real_params(block, dtype, rows) if path == "layer" else None
        layer_calls.append(found is not None)
        return found

    monkeypatch.setattr(cpu_fast, "layer_params", params)  # the step layer by layer
    monkeypatch.setattr(step_args, "layer_params", params)  # the whole-model plan
    (fast, fast_state), (ref, ref_state) = _split_and_module_steps(model, tokens, monkeypatch)
    assert layer_calls and (all(layer_calls) if path == "layer" else not any(layer_calls))
    scale = exact.abs().max()
    assert (fast - exact).abs().max() <= (ref - exact).abs().max() + 2e-4 * scale
    _assert_state_within(fast_state, ref_state, 1e-3)
    _assert_state_within(fast_state, exact_state, 1e-3)


def test_whole_layer_op_refuses_bad_packed_projections():
    from rwkvctl.kernels.build import load_extension

    load_extension()
    cfg = ModelConfig(n_layer=1, n_embd=64, vocab_size=50, gate=False)
    torch.manual_seed(0)
    from rwkvctl.model.rwkv5 import RWKV5

    block = RWKV5(cfg).blocks[0]
    args = cpu_fast.layer_params(block, torch.float32)
    x = torch.randn(1, 64)
    state = RecurrentState.zeros(cfg, 1)

    def run(params, q_bits, q_group, q_aux):
        return torch.ops.rwkvctl.rnn_step_layer(
            x, state.att_shift[0], state.ffn_shift[0], state.wkv[0], params, 1.0, True, False, q_bits, q_group, q_aux
        )

    run(args.params, args.q_bits, args.q_group, args.q_aux)
    with pytest.raises(RuntimeError, match="expected 7 entries in q_bits"):
        run(args.params, [0] * 8, [0] * 8, [])
    codes = torch.zeros(4, 16 * 64 // 2, dtype=torch.uint8)  # receptance (64, 64) at 4 bits: 4 tiles
    scale = torch.zeros(4, 2, 16, dtype=torch.int16)  # groups of 32
    params = list(args.params)
    params[9] = codes
    run(params, [4] + [0] * 6, [32] + [0] * 6, [scale, scale])  # well-formed: runs
    with pytest.raises(RuntimeError, match="q_aux must hold"):
        run(params, [4] + [0] * 6, [32] + [0] * 6, [])
    with pytest.raises(RuntimeError, match="receptance: scale and min tiles"):
        run(params, [4] + [0] * 6, [32] + [0] * 6, [scale[:, :1], scale])
    with pytest.raises(RuntimeError, match="receptance: codes must be"):
        run(params, [8] + [0] * 6, [32] + [0] * 6, [scale, scale])
    with pytest.raises(RuntimeError, match="receptance: group 12"):
        run(params, [4] + [0] * 6, [12] + [0] * 6, [scale, scale])


def _assert_state_within(a: RecurrentState, b: RecurrentState, rel: float) -> None:
    """Every state tensor of `a` within `rel` of the largest magnitude of the same tensor of `b`."""
    for name in ("att_shift", "ffn_shift", "wkv"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert (x.float() - y.float()).abs().max() <= rel * y.float().abs().max(), name


def test_split_step_leaves_the_input_state_alone(random_model):
    model = _packed_model(random_model, CONFIGS["gate"], 4)
    _, state = _steps(model, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    before = state.clone()
    with torch.no_grad():
        model.step(torch.tensor([4, 7]), state)
    _assert_state_close(state, before, rtol=0, atol=0)


def test_split_step_ops_refuse_bad_shapes():
    from rwkvctl.kernels.build import load_extension

    load_extension()
    C = 8
    vecs = [torch.ones(C), torch.zeros(C), torch.rand(C), torch.rand(C), torch.rand(C)]
    with pytest.raises(RuntimeError, match="att_shift must be"):
        torch.ops.rwkvctl.rnn_step_att_in(torch.randn(2, C), torch.randn(3, C), vecs, False, False)
    with pytest.raises(RuntimeError, match="expected 6 vectors"):
        torch.ops.rwkvctl.rnn_step_att_in(torch.randn(2, C), torch.randn(2, C), vecs, False, True)
    att_vecs = [torch.randn(2, 4), torch.randn(2, 4), torch.ones(C), torch.zeros(C)]
    r = torch.randn(1, C)
    with pytest.raises(RuntimeError, match="wkv must be"):
        torch.ops.rwkvctl.rnn_step_att_out(r, r, r, None, torch.zeros(1, 2, 4, 3), att_vecs, 1.0)
    with pytest.raises(RuntimeError, match="v must be"):
        torch.ops.rwkvctl.rnn_step_ffn_residual(torch.randn(2, C), torch.randn(2, C), torch.randn(2, C + 1))


def test_zero3_partitioned_parameters_keep_the_module_path(random_model):
    """Validation inside a DeepSpeed ZeRO-3 run: its parameters are shards gathered by module hooks, which only the
    module path runs (the fast path read the empty shards)."""
    model = random_model(CONFIGS["gate"]).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert cpu_fast.applies(model)
        model.emb.weight.ds_id = 0  # what ZeRO-3 sets on every parameter it partitions
        assert not cpu_fast.applies(model) and not cpu_fast.upcast_applies(model)


def test_layer_params_follow_module_swaps_and_dtype_changes(random_model):
    """The per-block cache of the op's arguments is reused between tokens, and rebuilt when a projection module is
    swapped (quantizing in place) or the weights change dtype."""
    from rwkvctl.quant.linear import use_packed_weights
    from rwkvctl.quant.schemes import encode_with

    model = random_model(CONFIGS["gate"])
    block = model.blocks[1]
    first = cpu_fast.layer_params(block, torch.float32)
    assert cpu_fast.layer_params(block, torch.float32) is first  # reused
    weight = block.att.key.weight.detach()
    assert use_packed_weights(model, {"blocks.1.att.key.weight": encode_with("group-affine", weight, bits=8)[0]})
    swapped = cpu_fast.layer_params(block, torch.float32)
    assert swapped is not first and swapped.q_bits[1] == 8
    model.to(torch.bfloat16)
    assert cpu_fast.layer_params(block, torch.float32) is None  # bf16 weights are not the fp32 model's
    bf16 = cpu_fast.layer_params(block, torch.bfloat16)
    assert bf16 is not None and bf16.params[9].dtype == torch.bfloat16
    # any tensor or submodule replaced (not updated in place) rebuilds: a parameter, a packed layer's tiles, a norm
    block.att.time_decay = torch.nn.Parameter(block.att.time_decay.detach().clone())
    rebuilt = cpu_fast.layer_params(block, torch.bfloat16)
    assert rebuilt is not bf16 and rebuilt.params[7] is block.att.time_decay
    block.att.key.register_buffer("qtiles", block.att.key.qtiles.clone())
    tiles = cpu_fast.layer_params(block, torch.bfloat16)
    assert tiles is not rebuilt and tiles.params[10] is block.att.key.qtiles
    block.ln1 = torch.nn.LayerNorm(block.ln1.normalized_shape).to(torch.bfloat16)
    assert cpu_fast.layer_params(block, torch.bfloat16).params[0] is block.ln1.weight
    with torch.no_grad():
        block.att.time_decay.add_(1.0)  # in place: the same arguments, which see the new values
    assert cpu_fast.layer_params(block, torch.bfloat16).params[7] is block.att.time_decay


def test_cpus_with_bf16_math_keep_bf16_gemms(random_model, monkeypatch, tmp_path):
    """Upcasting a bf16 model's blocks to fp32 is for CPUs without bf16 arithmetic; with AVX512-BF16 torch's bf16
    GEMM is the faster one (2.3x fp32 on such a CPU), so the sequence form stays in bf16 there."""
    bf16 = random_model(CONFIGS["gate"]).to(torch.bfloat16)
    monkeypatch.setattr(cpu_fast, "cpu_has_bf16_math", lambda: True)
    with torch.no_grad():
        assert not cpu_fast.upcast_applies(bf16)
    monkeypatch.setattr(cpu_fast, "cpu_has_bf16_math", lambda: False)
    with torch.no_grad():
        assert cpu_fast.upcast_applies(bf16)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\nflags\t: fpu\n")
    assert cpu_fast.cpuinfo_has_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    assert not cpu_fast.cpuinfo_has_bf16(str(info))
    assert not cpu_fast.cpuinfo_has_bf16(str(tmp_path / "missing"))


def test_fused_step_gives_the_same_bits_on_one_and_two_threads(random_model):
    """The op splits matmul rows and WKV heads (here 3 rows x 2 heads) over threads; each is computed whole by one
    thread, so no sum changes order."""
    model = random_model(CONFIGS["gate"])
    tokens = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_state = _steps(model, tokens)
        torch.set_num_threads(2)
        two, two_state = _steps(model, tokens)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one_state.wkv, two_state.wkv)


def _layer_by_layer(monkeypatch):
    """Make fused_step go layer by layer (rnn_step_layer per block, the head in Python), as before the whole-model
    op and as it still does when a block takes the split step."""
    monkeypatch.setattr(cpu_fast, "model_plan", lambda *args: None)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "packed4", "packed8"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 17])  # 17: the fp32 head as head @ x.T
def test_whole_model_op_equals_the_step_layer_by_layer(random_model, monkeypatch, kind, name, batch):
    """One op for every layer and the head computes each layer exactly as rnn_step_layer does (states bitwise equal);
    ln_out is summed in another order than F.layer_norm, and a bf16 model's packed head reads its input in fp32
    where the module rounds it to bf16 first."""
    cfg = CONFIGS[name]
    model = random_model(cfg)
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    elif kind.startswith("packed"):
        if cfg.n_embd % 32 or batch == 17:
            pytest.skip("packed weights need widths in whole tiles and take the kernel up to 16 rows")
        model = _packed_model(random_model, cfg, int(kind[-1]), with_head=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 4), generator=torch.Generator().manual_seed(batch))
    _, start = _steps(model, tokens[:, :2])
    whole, whole_state = _steps(model, tokens[:, 2:], start.clone())
    found = step_args.model_plan(model, model.emb.weight.dtype, batch)
    # a packed head runs in the op in whole tiles of 16 rows
    assert found is not None and found.has_head == (not kind.startswith("packed") or cfg.vocab_size % 16 == 0)
    with monkeypatch.context() as m:
        _layer_by_layer(m)
        layered, layered_state = _steps(model, tokens[:, 2:], start.clone())
    assert whole.dtype == layered.dtype and whole.shape == layered.shape
    assert (whole.float() - layered.float()).abs().max() <= 2e-6 * layered.float().abs().max() + (
        2.0**-8 * layered.float().abs().max() if kind == "bf16" else 0.0  # one bf16 rounding of the logits
    )
    for field in ("att_shift", "ffn_shift", "wkv"):
        assert torch.equal(getattr(whole_state, field), getattr(layered_state, field)), field


def test_whole_model_plan_is_kept_and_rebuilt(random_model):
    """The plan is reused between tokens and batch sizes of the same rows, rebuilt for another row count, a swapped
    module or a changed dtype, and leaves the head to Python when the final norm is not the LayerNorm it computes."""
    model = random_model(CONFIGS["gate"])
    first = step_args.model_plan(model, torch.float32, 1)
    assert step_args.model_plan(model, torch.float32, 1) is first
    assert step_args.model_plan(model, torch.float32, 2) is not first
    model.blocks[1].ffn.value = torch.nn.Linear(model.blocks[1].ffn.value.in_features, 128, bias=False)
    swapped = step_args.model_plan(model, torch.float32, 2)
    assert swapped is not None and swapped is not first
    key = model.blocks[0].att.key
    key.bias = torch.nn.Parameter(torch.zeros(key.out_features))  # a bias the op would not add: that block splits
    assert step_args.model_plan(model, torch.float32, 2) is None
    key.bias = None
    assert step_args.model_plan(model, torch.float32, 2) is not None
    model.head = torch.nn.Linear(128, 300, bias=True)  # a bias: not what the op reads
    assert not step_args.model_plan(model, torch.float32, 2).has_head
    model.ln_out.eps = 1e-6
    model.head.bias = None
    assert not step_args.model_plan(model, torch.float32, 2).has_head
    model.ln_out.eps = 1e-5
    assert step_args.model_plan(model, torch.float32, 2).has_head
    model.to(torch.bfloat16)
    assert step_args.model_plan(model, torch.bfloat16, 2) is not None
    tokens = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(1))
    logits, _ = _steps(model, tokens)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_whole_model_op_refuses_bad_plans_and_states(random_model):
    from rwkvctl.kernels.build import load_extension

    load_extension()
    model = random_model(CONFIGS["gate"])
    found = step_args.model_plan(model, torch.float32, 1)
    state = RecurrentState.zeros(model.cfg, 1)
    x = torch.randn(1, 128)
    op = torch.ops.rwkvctl.rnn_step_model
    with pytest.raises(RuntimeError, match=r"shifts must be \(L, B, C\)"):
        op(x, state.att_shift[:1], state.ffn_shift, state.wkv, found.plan)
    with pytest.raises(RuntimeError, match=r"wkv must be \(L, B, H, N, N\)"):
        op(x, state.att_shift, state.ffn_shift, state.wkv.double(), found.plan)
    args = step_args.layer_params(model.blocks[0], torch.float32)
    plan_class = torch.classes.rwkvctl.StepPlan
    with pytest.raises(RuntimeError, match="3 entries per layer"):
        plan_class(args.params, [], [len(args.params), 0], args.q_bits, args.q_group, [], 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="layer_sizes count"):
        plan_class(args.params, [], [len(args.params) + 1, 0, 3], args.q_bits, args.q_group, [], 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="head must be empty"):
        plan_class(args.params, [], [len(args.params), 0, 3], args.q_bits, args.q_group, [x], 300, 0, 0, 1.0)
    one_layer = plan_class(args.params, [], [len(args.params), 0, 3], args.q_bits, args.q_group, [], 0, 0, 0, 1.0)
    zero = RecurrentState.zeros(model.cfg, 1)
    out, att, ffn, wkv = op(x, zero.att_shift[:1], zero.ffn_shift[:1], zero.wkv[:1], one_layer)
    assert out.shape == (1, 128) and wkv.shape == (1, 1, *zero.wkv.shape[2:])  # no head: the residual stream
    bad_head = [model.ln_out.weight, model.ln_out.bias, model.head.weight[:, :64].contiguous()]
    with_bad_head = plan_class(args.params, [], [len(args.params), 0, 3], args.q_bits, args.q_group, bad_head, 300, 0,
                               0, 1.0)
    with pytest.raises(RuntimeError, match="rnn_step_model: weight must be"):
        op(x, zero.att_shift[:1], zero.ffn_shift[:1], zero.wkv[:1], with_bad_head)


def test_step_exp_matches_torch_over_the_whole_range():
    """The decode ops' exp (plain arithmetic, vectorized) against torch's: sigmoid(r) * v within 2 ulp over the
    float range, saturating to 0 and 1 at the ends, NaN kept NaN."""
    from rwkvctl.kernels.build import load_extension

    load_extension()
    ends = torch.tensor([-88.5, -87.0, 87.0, 88.5, float("inf"), -float("inf")])
    r = torch.cat([torch.linspace(-100, 100, 20001), ends])
    v = torch.ones_like(r)
    got = torch.ops.rwkvctl.rnn_step_ffn_residual(torch.zeros(1, r.numel()), r[None], v[None])[0]
    want = torch.sigmoid(r.double())
    assert ((got.double() - want).abs() <= 2.5e-7 * want + 1e-38).all()
    nan = torch.ops.rwkvctl.rnn_step_ffn_residual(torch.zeros(1, 1), torch.tensor([[float("nan")]]), torch.ones(1, 1))
    assert torch.isnan(nan).all()


# head sizes 64 and 32: streamed state, read row by row; 96: streamed, in column blocks; 24: not streamed
@pytest.mark.parametrize("name", ["gate", "head32", "head96", "head24-odd"])
def test_fused_step_agrees_across_instruction_sets(random_model, monkeypatch, name):
    """The AVX-512 step (the WKV state written with non-temporal stores where a head is whole 64-byte lines) against
    the AVX2 and portable kernels: the same sums, up to the fused multiply-adds the compiler picked."""
    cfg = ModelConfig(n_layer=2, n_embd=192, vocab_size=64, head_size=96, dim_ffn=256) if name == "head96" else (
        CONFIGS[name]
    )
    model = random_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    results = {}
    for isa in ("", "avx2", "default"):
        monkeypatch.setenv("RWKVCTL_CPU_ISA", isa)
        results[isa] = _steps(model, tokens)
    for isa in ("avx2", "default"):
        (logits, state), (want, want_state) = results[isa], results[""]
        assert (logits - want).abs().max() <= 1e-5 * want.abs().max(), isa
        _assert_state_within(state, want_state, 1e-5)


def test_models_with_a_plan_copy_and_move(random_model):
    """After a decode step the model still deep-copies (the plan is kept outside it) and the copy decodes the same;
    a packed model moved (Module._apply puts new buffers in place without a registration) and then loaded with other
    weights decodes with the new weights, not a stale plan's."""
    import copy

    model = random_model(CONFIGS["gate"])
    tokens = torch.tensor([[1, 2, 3]])
    first, _ = _steps(model, tokens)
    twin = copy.deepcopy(model)
    assert torch.equal(_steps(twin, tokens)[0], first)
    packed = _packed_model(random_model, CONFIGS["gate"], 4, with_head=True)
    other = _packed_model(lambda cfg: random_model(cfg, seed=1), CONFIGS["gate"], 4, with_head=True)  # other codes
    want, _ = _steps(other, tokens)  # packs other's tiles (so the state dicts match), registering buffers
    _steps(packed, tokens)  # then builds and caches the plan
    packed._apply(lambda t: t.clone())  # what .to(device) does to buffers
    packed.load_state_dict(other.state_dict())
    got, _ = _steps(packed, tokens)
    assert torch.equal(got, want)


@pytest.mark.parametrize("path", ["whole", "layer", "split"])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "packed4"])
def test_steps_from_strided_states_equal_steps_from_contiguous_ones(random_model, monkeypatch, path, kind):
    """A state of some rows of a batch (RecurrentState.rows: views with the batch's strides, as a server or
    /retry holds them) steps exactly as a contiguous copy of it, on every fast path, and is left as it was."""
    cfg = CONFIGS["gate"]
    model = _packed_model(random_model, cfg, 4) if kind == "packed4" else random_model(cfg)
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    if path == "layer":
        _layer_by_layer(monkeypatch)
    elif path == "split":
        for module in (cpu_fast, step_args):
            monkeypatch.setattr(module, "layer_params", lambda *args: None)
    tokens = torch.randint(0, cfg.vocab_size, (3, 4), generator=torch.Generator().manual_seed(5))
    _, start = _steps(model, tokens[:, :2])
    strided = start.rows(slice(0, 3, 2))  # rows 0 and 2 of the batch: every tensor a non-contiguous view
    assert not any(t.is_contiguous() for t in (strided.att_shift, strided.ffn_shift, strided.wkv))
    before = strided.clone()
    monkeypatch.setenv("RWKVCTL_STEP", "fused")
    calls: list[str] = []
    real_fused, real_split = cpu_fast.fused_step, cpu_fast._split_step
    monkeypatch.setattr(cpu_fast, "fused_step", lambda *args: calls.append("fused") or real_fused(*args))
    monkeypatch.setattr(cpu_fast, "_split_step", lambda *args: calls.append("split") or real_split(*args))
    from_views, views_state = _steps(model, tokens[::2, 2:], strided)
    from_copies, copies_state = _steps(model, tokens[::2, 2:], strided.clone())
    assert "fused" in calls and ("split" in calls) == (path == "split")  # the path named, not another
    assert (cpu_fast.model_plan(model, model.emb.weight.dtype, 2) is not None) == (path == "whole")
    assert torch.equal(from_views, from_copies)
    for field in ("att_shift", "ffn_shift", "wkv"):
        assert torch.equal(getattr(views_state, field), getattr(copies_state, field)), field
        assert torch.equal(getattr(strided, field), getattr(before, field)), field
