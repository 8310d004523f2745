// CPU ops of the RNN decode step (RWKV-5.2, one token per sequence), beside the module path they replace in
// rwkvctl/model/rwkv5.py (the reference and test oracle; Python side: rwkvctl/model/cpu_fast.py):
//
//   linear_f32acc(x (B, K), w (N, K) fp32|bf16) -> (B, N) fp32
//       y = x @ w.T with fp32 accumulation; bf16 weights are widened in registers (own AVX-512 / AVX2 / plain
//       kernels), or on CPUs with AVX512-BF16 multiplied by `vdpbf16ps` against x rounded to bf16 (as torch's bf16
//       Linear rounds it; RWKVCTL_BF16_INPUT=split keeps 16 significant bits), so a bf16 model streams half the
//       bytes of fp32; fp32 weights take own AVX-512 kernels for up to 16 rows, torch's BLAS otherwise.
//   linear_bf16_kernel() -> str
//       which of those kernels bf16 weights take here and now (tests, diagnostics)
//   rnn_step_layer(x (B, C) fp32, att_shift (B, C), ffn_shift (B, C), wkv (B, H, N, N) fp32, params, hsd,
//                  has_ln0, has_gate, q_bits, q_group, q_aux) -> (x, att_shift, ffn_shift, wkv)
//       one whole Block.step (ln0?, ln1, time mix, WKV step, GroupNorm, gate, ln2, channel mix) in fp32, one call
//       per layer instead of ~40 PyTorch ops; new tensors are returned, the inputs are left untouched (callers
//       keep snapshots of states). Shifts come back in the dtype they came in. Each projection is a plain fp32/bf16
//       weight or a packed 4/8-bit group-affine one (q_bits[i] != 0: its params slot holds the codes in the tiles
//       of qmm_cpu.cpp, q_aux the scale and min tiles, two per packed projection in order), so a quantized model
//       also takes one call per layer. q_bits, q_group: one entry per projection in the order r, k, v, output,
//       ffn key, ffn receptance, ffn value (, gate).
//
// `params` order (kept in sync with rwkvctl/model/cpu_fast.py:layer_params):
//   0 ln1.w  1 ln1.b  2 ln2.w  3 ln2.b  4 att.time_mix_k  5 att.time_mix_v  6 att.time_mix_r  7 att.time_decay
//   8 att.time_faaaa  9 att.receptance  10 att.key  11 att.value  12 att.output  13 att.ln_x.w  14 att.ln_x.b
//   15 ffn.time_mix_k  16 ffn.time_mix_r  17 ffn.key  18 ffn.receptance  19 ffn.value
//   then att.time_mix_g, att.gate (has_gate), then ln0.w, ln0.b (has_ln0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "qmm.h"
#include "rnn_step_layer.h"
#include "rnn_step_parts.h"

namespace rwkvctl::step_default {
#include "rnn_step_kernel.h"
}  // namespace rwkvctl::step_default

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RNN_STEP_X86_VARIANTS 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace rwkvctl::step_avx2 {
#include "rnn_step_kernel.h"
}  // namespace rwkvctl::step_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
#endif
namespace rwkvctl::step_avx512 {
#include "rnn_step_kernel.h"
}  // namespace rwkvctl::step_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#include <immintrin.h>
namespace rwkvctl::step_avx512 {
#include "rnn_step_avx512.h"
}  // namespace rwkvctl::step_avx512
#endif

namespace rwkvctl {

int step_isa_level() {
  (void)bf16_input_parts();  // RWKVCTL_BF16_INPUT checked on every CPU, not only where the bf16 dot product runs
  int level = cpu_isa_level();
#ifdef RNN_STEP_X86_VARIANTS
  if (level >= 2 && !__builtin_cpu_supports("avx512bw")) level = 1;
#endif
  return level;
}

namespace {

#ifdef RNN_STEP_X86_VARIANTS
#define STEP_PICK_PLAIN(fn, level) \
  ((level) >= 2 ? &step_avx512::fn : (level) == 1 ? &step_avx2::fn : &step_default::fn)
#else
#define STEP_PICK_PLAIN(fn, level) (&step_default::fn)
#endif

constexpr int64_t kRowsPerTask = 64;  // output rows per parallel task: ~100 KB of fp32 weights at K = 768
constexpr int64_t kOwnGemvRowsMax = 16;  // fp32: more rows than this go to torch's GEMM (it blocks over rows)
constexpr int64_t kHeadsPerTask = 4;     // WKV heads per parallel task (each reads and writes a 16 KB state at N = 64)

void check_weight(const char* op, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(w.device().is_cpu(), op, ": weights must be on the CPU, got ", w.device());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == K, op, ": weight must be (N, ", K, "), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, op,
              ": weights must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), op, ": weight must be contiguous");
}

template <typename W, typename X = float>
using GemvFn = void (*)(const W*, const X*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);

template <typename W, typename X>
void gemv_parallel(GemvFn<W, X> fn, const W* w, const X* x, float* y, int64_t B, int64_t N, int64_t K) {
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t a, int64_t b) {
    fn(w, x, y, B, K, a * kRowsPerTask, std::min(N, b * kRowsPerTask), N);
  });
}

// The kernel that multiplies bf16 weights at an ISA level (linear_into), named by the linear_bf16_kernel op.
enum class Bf16Gemv { DotRounded, DotSplit, Avx512, Avx2, Portable };

Bf16Gemv bf16_gemv(int level) {
#ifdef RWKVCTL_HAVE_AVX512BF16
  if (level >= 2 && cpu_isa_allows_bf16_dot())
    return bf16_input_parts() == 2 ? Bf16Gemv::DotSplit : Bf16Gemv::DotRounded;
#endif
#ifdef RNN_STEP_X86_VARIANTS
  if (level >= 2) return Bf16Gemv::Avx512;
  if (level == 1) return Bf16Gemv::Avx2;
#endif
  return Bf16Gemv::Portable;
}

// y (B, N) = x (B, K) @ w.T, x and y fp32 row-major; w checked by check_weight. With AVX-512, few rows (decode)
// run own gemv kernels (rnn_step_avx512.h), one weight row at a time: they stream the weights faster than torch's
// BLAS gemv did for these shapes (fp32, cold (768, 768) weights: 18 vs 12 GB/s on the CI box). Two fp32 sums per row
// beat four and eight, at every K (0.1b preset decode, 1 thread: 32 -> 38 tokens/s, and 35 -> 41 with the weights in
// 2 MB pages); bf16 weights take the AVX512-BF16 dot product where the CPU has it (gemv_seq_dpbf16). Otherwise
// fp32 weights go to torch's BLAS and bf16 weights to the portable/AVX2 kernels, which widen them in registers.
void linear_into(const at::Tensor& w, const float* x, float* y, int64_t B, int level) {
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == at::kFloat) {
#ifdef RNN_STEP_X86_VARIANTS
    if (level >= 2 && B <= kOwnGemvRowsMax) {
      gemv_parallel<float, float>(&step_avx512::gemv_seq_avx512<float, 2>, w.data_ptr<float>(), x, y, B, N, K);
      return;
    }
#endif
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor yt = at::from_blob(y, {B, N}, opts);
    at::mm_out(yt, at::from_blob(const_cast<float*>(x), {B, K}, opts), w.t());
    return;
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const Bf16Gemv kind = bf16_gemv(level);
#ifdef RWKVCTL_HAVE_AVX512BF16
  if (kind == Bf16Gemv::DotSplit) {
    std::vector<uint16_t> xs(static_cast<size_t>(2 * B * K));  // (B, 2, K): x as bf16 hi and lo parts
    step_avx512::split_bf16<2>(x, xs.data(), B, K);
    return gemv_parallel<uint16_t, uint16_t>(&step_avx512::gemv_seq_dpbf16<2, 1>, wp, xs.data(), y, B, N, K);
  }
  if (kind == Bf16Gemv::DotRounded) {
    std::vector<uint16_t> xs(static_cast<size_t>(B * K));  // (B, K): x rounded to bf16
    step_avx512::split_bf16<1>(x, xs.data(), B, K);
    return gemv_parallel<uint16_t, uint16_t>(&step_avx512::gemv_seq_dpbf16<1, 2>, wp, xs.data(), y, B, N, K);
  }
#endif
#ifdef RNN_STEP_X86_VARIANTS
  if (kind == Bf16Gemv::Avx512)
    return gemv_parallel<uint16_t, float>(&step_avx512::gemv_seq_avx512<uint16_t, 8>, wp, x, y, B, N, K);
  if (kind == Bf16Gemv::Avx2) return gemv_parallel<uint16_t, float>(&step_avx2::gemv_rows<uint16_t>, wp, x, y, B, N, K);
#endif
  gemv_parallel<uint16_t, float>(&step_default::gemv_rows<uint16_t>, wp, x, y, B, N, K);
}

}  // namespace

void check_projection(const char* op, const char* what, const Projection& pr) {
  if (pr.bits != 0) {
    // model widths are multiples of 32 (config.py), so the kernel's whole tiles of 16 rows are the projection's rows
    TORCH_CHECK(pr.out % kQmmTile == 0, op, ": ", what, ": packed projections need a multiple of ", kQmmTile,
                " rows, got ", pr.out);
    return check_group_affine(op, what, *pr.weight, *pr.scale, *pr.minimum, pr.out, pr.in, pr.bits, pr.group);
  }
  check_weight(op, *pr.weight, pr.in);
  TORCH_CHECK(pr.weight->size(0) == pr.out, op, ": ", what, " must be (", pr.out, ", ", pr.in, "), got ",
              pr.weight->sizes());
}

void project(const Projection& pr, const float* x, float* y, int64_t B, int level) {
  if (pr.bits == 0) return linear_into(*pr.weight, x, y, B, level);
  const auto* scale = reinterpret_cast<const uint16_t*>(pr.scale->data_ptr());
  const auto* minimum = reinterpret_cast<const uint16_t*>(pr.minimum->data_ptr());
  const uint8_t* q = pr.weight->data_ptr<uint8_t>();
  group_affine_mm_rows(x, B, pr.in, q, scale, minimum, pr.out, pr.bits, pr.group, y);  // whole tiles: checked
}

// As `vec_f32` tensors the vectors cost ~45 us per layer call, a tenth of a cached bf16 layer's time.
const float* LayerVectors::get(const char* op, const char* what, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.numel() == n, op, ": ", what, " must have ", n, " elements, got ", t.sizes());
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  float* out = owned_.emplace_back(static_cast<size_t>(n)).data();  // inner buffers never move
  if (t.scalar_type() == at::kBFloat16 && t.is_contiguous()) {
    const at::BFloat16* src = t.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
  } else {
    const at::Tensor f = as_f32(t);
    std::memcpy(out, f.data_ptr<float>(), static_cast<size_t>(n) * sizeof(float));
  }
  return out;
}

void wkv_groupnorm_gate(const float* r, const float* k, const float* v, const float* g, const float* time_decay,
                        const float* u, const float* lnx_w, const float* lnx_b, const float* wkv_in, float* wkv_out,
                        float* y, int64_t B, int64_t H, int64_t N, double head_size_divisor) {
  const int64_t A = H * N;
  std::vector<float> decay(static_cast<size_t>(A));
  #pragma omp simd
  for (int64_t i = 0; i < A; ++i) decay[i] = exp_f32(-exp_f32(time_decay[i]));
  const int level = step_isa_level();
  auto wkv_fn = STEP_PICK_PLAIN(wkv_step_head, level);
#ifdef RNN_STEP_X86_VARIANTS
  // whole 64-byte lines per state row: every head's rows stay aligned (the allocation is)
  const bool stream = level >= 2 && N % 16 == 0 && wkv_out != wkv_in && reinterpret_cast<uintptr_t>(wkv_out) % 64 == 0;
  if (stream) wkv_fn = &step_avx512::wkv_step_head_stream;
#endif
  const float inv_hsd = static_cast<float>(1.0 / head_size_divisor);
  // (row, head) pairs split over threads, each pair computed whole as before (bitwise the same for any split): the
  // state a token reads and writes (12 layers x 196 KB on the 0.1b preset) and the per-head work were serial
  // while the matmuls around them used every thread.
  at::parallel_for(0, B * H, kHeadsPerTask, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const int64_t o = b * A + h * N;
      float* yh = y + o;
      const int64_t so = (b * H + h) * N * N;
      wkv_fn(r + o, k + o, v + o, decay.data() + h * N, u + h * N, wkv_in + so, wkv_out + so, yh, N);
      // GroupNorm(H groups) of y / head_size_divisor, as the reference does it
      for (int64_t i = 0; i < N; ++i) yh[i] *= inv_hsd;
      double mean = 0.0, var = 0.0;
      for (int64_t i = 0; i < N; ++i) mean += yh[i];
      mean /= N;
      for (int64_t i = 0; i < N; ++i) var += (yh[i] - mean) * (yh[i] - mean);
      const float m = static_cast<float>(mean), inv = static_cast<float>(1.0 / std::sqrt(var / N + 1e-5));
      const float* gw = lnx_w + h * N;
      const float* gb = lnx_b + h * N;
      for (int64_t i = 0; i < N; ++i) yh[i] = (yh[i] - m) * inv * gw[i] + gb[i];
      if (g != nullptr) {
        const float* gh = g + o;
        #pragma omp simd
        for (int64_t i = 0; i < N; ++i) yh[i] *= gh[i] / (1.f + exp_f32(-gh[i]));  // silu
      }
    }
#ifdef RNN_STEP_X86_VARIANTS
    if (stream) _mm_sfence();  // each thread orders its own streamed stores before the join makes them visible
#endif
  });
}

at::Tensor linear_f32acc_cpu(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2, "linear_f32acc: x must be (B, K), got ", x.sizes());
  check_weight("linear_f32acc", w, x.size(1));
  const at::Tensor xf = as_f32(x);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, xf.options());
  if (y.numel() > 0) linear_into(w, xf.data_ptr<float>(), y.data_ptr<float>(), x.size(0), step_isa_level());
  return y;
}

LayerInputs parse_layer(const char* op, at::TensorList p, int64_t C, bool has_ln0, bool has_gate,
                        at::IntArrayRef q_bits, at::IntArrayRef q_group, at::TensorList q_aux) {
  const size_t expected = 20 + (has_gate ? 2 : 0) + (has_ln0 ? 2 : 0);
  TORCH_CHECK(p.size() == expected, op, ": expected ", expected, " parameter tensors, got ", p.size());
  TORCH_CHECK(p[7].dim() == 2, op, ": time_decay must be (H, N), got ", p[7].sizes());
  LayerInputs layer{p, has_ln0, has_gate};
  layer.C = C;
  layer.H = p[7].size(0);
  layer.N = p[7].size(1);
  layer.A = layer.H * layer.N;
  // projections in the order of q_bits / q_group: r, k, v, output, ffn key, ffn receptance, ffn value, gate
  const int n_proj = has_gate ? 8 : 7;
  const int slots[8] = {9, 10, 11, 12, 17, 18, 19, 21};
  TORCH_CHECK(q_bits.size() == static_cast<size_t>(n_proj) && q_group.size() == q_bits.size(), op, ": expected ",
              n_proj, " entries in q_bits and q_group, got ", q_bits.size(), " and ", q_group.size());
  std::vector<Projection>& w = layer.proj;
  w.resize(n_proj);
  size_t aux = 0;
  for (int i = 0; i < n_proj; ++i) {
    w[i] = Projection{&p[slots[i]], q_bits[i], q_group[i]};
    if (q_bits[i] == 0) continue;
    TORCH_CHECK(aux + 2 <= q_aux.size(), op, ": q_aux must hold a scale and a min per packed projection");
    w[i].scale = &q_aux[aux];
    w[i].minimum = &q_aux[aux + 1];
    aux += 2;
  }
  TORCH_CHECK(aux == q_aux.size(), op, ": q_aux has ", q_aux.size(), " tensors, the packed projections use ", aux);
  const int64_t A = layer.A;
  layer.F = w[4].bits == 0 ? p[17].size(0)
                           : (w[6].bits == 0 ? p[19].size(1) : p[19].size(1) * 8 / (kQmmTile * w[6].bits));
  const int64_t F = layer.F;
  const char* names[8] = {"receptance", "key", "value", "output", "ffn.key", "ffn.receptance", "ffn.value", "gate"};
  const int64_t outs[8] = {A, A, A, C, F, C, C, A}, ins[8] = {C, C, C, A, C, C, F, C};
  for (int i = 0; i < n_proj; ++i) {
    w[i].out = outs[i];
    w[i].in = ins[i];
    check_projection(op, names[i], w[i]);
  }
  return layer;
}

StepScratch::StepScratch(int64_t B, int64_t C, int64_t A, int64_t F)
    : mixed(static_cast<size_t>(4 * B * C)),
      proj(static_cast<size_t>(4 * B * A)),
      y(static_cast<size_t>(B * A)),
      out(static_cast<size_t>(B * C)),
      hidden(static_cast<size_t>(B * F)),
      rec(static_cast<size_t>(B * C)) {}

void run_layer(const char* op, const LayerInputs& layer, double head_size_divisor, float* x, const float* att_prev,
               const float* ffn_prev, const float* wkv_in, float* att_new, float* ffn_new, float* wkv_out, int64_t B,
               int level, StepScratch& scratch) {
  const at::TensorList p = layer.p;
  const int64_t C = layer.C, H = layer.H, N = layer.N, A = layer.A;
  const bool has_gate = layer.has_gate;
  const std::vector<Projection>& w = layer.proj;
  LayerVectors vecs;
  const float* ln1w = vecs.get(op, "ln1.weight", p[0], C), *ln1b = vecs.get(op, "ln1.bias", p[1], C);
  const float* ln2w = vecs.get(op, "ln2.weight", p[2], C), *ln2b = vecs.get(op, "ln2.bias", p[3], C);
  const float* mk = vecs.get(op, "att.time_mix_k", p[4], C), *mv = vecs.get(op, "att.time_mix_v", p[5], C);
  const float* mr = vecs.get(op, "att.time_mix_r", p[6], C);
  const float* td = vecs.get(op, "att.time_decay", p[7], A);
  const float* u = vecs.get(op, "att.time_faaaa", p[8], A);
  const float* lnxw = vecs.get(op, "att.ln_x.weight", p[13], A), *lnxb = vecs.get(op, "att.ln_x.bias", p[14], A);
  const float* fk = vecs.get(op, "ffn.time_mix_k", p[15], C), *fr = vecs.get(op, "ffn.time_mix_r", p[16], C);
  const float* mg = has_gate ? vecs.get(op, "att.time_mix_g", p[20], C) : nullptr;
  float* out = scratch.out.data();  // (B, C): each projection back to the residual stream

  if (layer.has_ln0) {
    const size_t o = p.size() - 2;
    const float* g0 = vecs.get(op, "ln0.weight", p[o], C), *b0 = vecs.get(op, "ln0.bias", p[o + 1], C);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(out, x + b * C, static_cast<size_t>(C) * sizeof(float));
      layer_norm(out, g0, b0, x + b * C, C, 1e-5f);
    }
  }

  // --- time mix ---
  float* xr = scratch.mixed.data();  // [r | k | v | g] inputs, each (B, C)
  float* xk = xr + B * C;
  float* xv = xk + B * C;
  float* xg = has_gate ? xv + B * C : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    float* xa = att_new + b * C;  // ln1(x): also the next token's shift
    layer_norm(x + b * C, ln1w, ln1b, xa, C, 1e-5f);
    const float* prev = att_prev + b * C;
    token_mix(xa, prev, mr, xr + b * C, C);
    token_mix(xa, prev, mk, xk + b * C, C);
    token_mix(xa, prev, mv, xv + b * C, C);
    if (has_gate) token_mix(xa, prev, mg, xg + b * C, C);
  }
  float* r = scratch.proj.data();  // r, k, v, g projections, each (B, A)
  float* k = r + B * A;
  float* v = k + B * A;
  float* g = has_gate ? v + B * A : nullptr;
  project(w[0], xr, r, B, level);
  project(w[1], xk, k, B, level);
  project(w[2], xv, v, B, level);
  if (has_gate) project(w[7], xg, g, B, level);

  float* y = scratch.y.data();
  wkv_groupnorm_gate(r, k, v, g, td, u, lnxw, lnxb, wkv_in, wkv_out, y, B, H, N, head_size_divisor);
  project(w[3], y, out, B, level);
  for (int64_t i = 0; i < B * C; ++i) x[i] += out[i];

  // --- channel mix ---
  float* fxk = scratch.mixed.data();  // [k | r] inputs, each (B, C)
  float* fxr = fxk + B * C;
  for (int64_t b = 0; b < B; ++b) {
    float* xf = ffn_new + b * C;
    layer_norm(x + b * C, ln2w, ln2b, xf, C, 1e-5f);
    const float* prev = ffn_prev + b * C;
    token_mix(xf, prev, fk, fxk + b * C, C);
    token_mix(xf, prev, fr, fxr + b * C, C);
  }
  float* hidden = scratch.hidden.data();
  project(w[4], fxk, hidden, B, level);
  relu_square(hidden, hidden, B * layer.F);
  float* rec = scratch.rec.data();
  project(w[5], fxr, rec, B, level);
  project(w[6], hidden, out, B, level);
  add_gated_value(x, rec, out, x, B * C);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_step_layer_cpu(
    const at::Tensor& x_in, const at::Tensor& att_shift, const at::Tensor& ffn_shift, const at::Tensor& wkv,
    at::TensorList p, double head_size_divisor, bool has_ln0, bool has_gate, at::IntArrayRef q_bits,
    at::IntArrayRef q_group, at::TensorList q_aux) {
  const char* op = "rnn_step_layer";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (B, C), got ", x_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(att_shift.sizes() == x_in.sizes() && ffn_shift.sizes() == x_in.sizes(), op,
              ": shifts must be (B, C) like x, got ", att_shift.sizes(), ", ", ffn_shift.sizes());
  const LayerInputs layer = parse_layer(op, p, C, has_ln0, has_gate, q_bits, q_group, q_aux);
  const int64_t H = layer.H, N = layer.N;
  TORCH_CHECK(wkv.dim() == 4 && wkv.size(0) == B && wkv.size(1) == H && wkv.size(2) == N && wkv.size(3) == N &&
                  wkv.scalar_type() == at::kFloat,
              op, ": wkv must be (B, H, N, N) = (", B, ", ", H, ", ", N, ", ", N, ") float32, got ", wkv.sizes(), " ",
              wkv.scalar_type());
  at::Tensor x = as_f32(x_in).clone();  // (B, C): the residual stream, updated in place
  const at::Tensor sa = as_f32(att_shift), sf = as_f32(ffn_shift);
  at::Tensor new_att = at::empty({B, C}, x.options()), new_ffn = at::empty({B, C}, x.options());
  const at::Tensor wkv_in = wkv.contiguous();
  at::Tensor wkv_out = at::empty_like(wkv_in);  // (B, H, N, N): the step writes the new state here
  StepScratch scratch(B, C, layer.A, layer.F);
  run_layer(op, layer, head_size_divisor, x.data_ptr<float>(), sa.data_ptr<float>(), sf.data_ptr<float>(),
            wkv_in.data_ptr<float>(), new_att.data_ptr<float>(), new_ffn.data_ptr<float>(), wkv_out.data_ptr<float>(),
            B, step_isa_level(), scratch);
  return {x, new_att.to(att_shift.scalar_type()), new_ffn.to(ffn_shift.scalar_type()), wkv_out};
}

// Which kernel linear_f32acc and the decode step use for bf16 weights here and now (RWKVCTL_CPU_ISA,
// RWKVCTL_BF16_INPUT and the CPU): "dot-rounded" / "dot-split" (AVX512-BF16, the input rounded to bf16 or split in
// two bf16 parts), "avx512", "avx2" or "portable" (weights widened to fp32 in registers).
std::string linear_bf16_kernel() {
  static const char* names[] = {"dot-rounded", "dot-split", "avx512", "avx2", "portable"};
  return names[static_cast<int>(bf16_gemv(step_isa_level()))];
}

}  // namespace rwkvctl

TORCH_LIBRARY_FRAGMENT(rwkvctl, m) {
  m.def("linear_f32acc(Tensor x, Tensor w) -> Tensor");
  m.def("linear_bf16_kernel() -> str", &rwkvctl::linear_bf16_kernel);
  m.def(
      "rnn_step_layer(Tensor x, Tensor att_shift, Tensor ffn_shift, Tensor wkv, Tensor[] params, "
      "float head_size_divisor, bool has_ln0, bool has_gate, int[] q_bits, int[] q_group, Tensor[] q_aux) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkvctl, CPU, m) {
  m.impl("linear_f32acc", &rwkvctl::linear_f32acc_cpu);
  m.impl("rnn_step_layer", &rwkvctl::rnn_step_layer_cpu);
}
