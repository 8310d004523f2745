// The RNN decode step of a block whose projections the whole-layer op cannot read (packed QuantLinear weights,
// any other module): its elementwise work in five fp32 ops around the block's own matmuls, which Python calls in
// between (rwkvctl/model/cpu_fast.py:_split_step), instead of ~40 PyTorch ops. Same arithmetic and order as
// rnn_step_layer (the shared pieces are in rnn_step_parts.h). New tensors are returned, inputs left untouched.
//
//   rnn_step_att_in(x (B, C), att_shift (B, C), vecs, has_ln0, has_gate) -> (x, att_shift, mixed (n, B, C))
//       x = ln0(x) on layer 0 (else x as fp32); att_shift = ln1(x), the next token's shift; mixed = the token-shift
//       mixes of ln1(x) with the old shift, in the order r, k, v (, g): the inputs of receptance/key/value(/gate).
//       vecs: ln1.w, ln1.b, time_mix_r, time_mix_k, time_mix_v (, time_mix_g) (, ln0.w, ln0.b).
//   rnn_step_att_out(r, k, v (B, A), g (B, A)?, wkv (B, H, N, N), vecs, head_size_divisor) -> (y (B, A), wkv)
//       the WKV step, GroupNorm(ln_x) and the silu gate: y is the output projection's input.
//       vecs: time_decay (H, N), time_faaaa, ln_x.w, ln_x.b.
//   rnn_step_ffn_in(x (B, C), att (B, C), ffn_shift (B, C), vecs) -> (x, ffn_shift, mixed (2, B, C))
//       x = x + att; ffn_shift = ln2(x); mixed = the mixes k, r: the inputs of ffn key/receptance.
//       vecs: ln2.w, ln2.b, ffn.time_mix_k, ffn.time_mix_r.
//   rnn_step_relu_square(k (B, F)) -> relu(k)^2, the value projection's input
//   rnn_step_ffn_residual(x (B, C), r (B, C), v (B, C)) -> x + sigmoid(r) * v
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "rnn_step_parts.h"

namespace rwkvctl {
namespace {

void check_rows(const char* op, const char* what, const at::Tensor& t, int64_t B, int64_t n) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == n, op, ": ", what, " must be (", B, ", ", n, "), got ",
              t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> att_in_cpu(const at::Tensor& x_in, const at::Tensor& att_shift,
                                                          at::TensorList p, bool has_ln0, bool has_gate) {
  const char* op = "rnn_step_att_in";
  const size_t expected = 5 + (has_gate ? 1 : 0) + (has_ln0 ? 2 : 0);
  TORCH_CHECK(p.size() == expected, op, ": expected ", expected, " vectors, got ", p.size());
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (B, C), got ", x_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1);
  check_rows(op, "att_shift", att_shift, B, C);
  const int64_t n_in = has_gate ? 4 : 3;
  std::vector<at::Tensor> v;
  const char* names[] = {"ln1.weight", "ln1.bias", "time_mix_r", "time_mix_k", "time_mix_v", "time_mix_g"};
  for (int64_t i = 0; i < 2 + n_in; ++i) v.push_back(vec_f32(op, names[i], p[i], C));
  at::Tensor x = as_f32(x_in);
  if (has_ln0) {
    const at::Tensor g0 = vec_f32(op, "ln0.weight", p[expected - 2], C);
    const at::Tensor b0 = vec_f32(op, "ln0.bias", p[expected - 1], C);
    at::Tensor normed = at::empty({B, C}, x.options());
    for (int64_t b = 0; b < B; ++b)
      layer_norm(x.data_ptr<float>() + b * C, g0.data_ptr<float>(), b0.data_ptr<float>(),
                 normed.data_ptr<float>() + b * C, C, 1e-5f);
    x = normed;
  }
  const at::Tensor prev_all = as_f32(att_shift);
  at::Tensor shift = at::empty({B, C}, x.options());
  at::Tensor mixed = at::empty({n_in, B, C}, x.options());  // [r | k | v | g], each (B, C)
  for (int64_t b = 0; b < B; ++b) {
    float* xa = shift.data_ptr<float>() + b * C;  // ln1(x): also the next token's shift
    layer_norm(x.data_ptr<float>() + b * C, v[0].data_ptr<float>(), v[1].data_ptr<float>(), xa, C, 1e-5f);
    const float* prev = prev_all.data_ptr<float>() + b * C;
    for (int64_t j = 0; j < n_in; ++j)
      token_mix(xa, prev, v[2 + j].data_ptr<float>(), mixed.data_ptr<float>() + (j * B + b) * C, C);
  }
  return {x, shift, mixed};
}

std::tuple<at::Tensor, at::Tensor> att_out_cpu(const at::Tensor& r_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, const c10::optional<at::Tensor>& g_in,
                                               const at::Tensor& wkv, at::TensorList p, double head_size_divisor) {
  const char* op = "rnn_step_att_out";
  TORCH_CHECK(p.size() == 4, op, ": expected 4 vectors, got ", p.size());
  TORCH_CHECK(p[0].dim() == 2, op, ": time_decay must be (H, N), got ", p[0].sizes());
  const int64_t H = p[0].size(0), N = p[0].size(1), A = H * N;
  TORCH_CHECK(r_in.dim() == 2, op, ": r must be (B, ", A, "), got ", r_in.sizes());
  const int64_t B = r_in.size(0);
  check_rows(op, "r", r_in, B, A);
  check_rows(op, "k", k_in, B, A);
  check_rows(op, "v", v_in, B, A);
  if (g_in.has_value()) check_rows(op, "g", *g_in, B, A);
  TORCH_CHECK(wkv.dim() == 4 && wkv.size(0) == B && wkv.size(1) == H && wkv.size(2) == N && wkv.size(3) == N &&
                  wkv.scalar_type() == at::kFloat,
              op, ": wkv must be (B, H, N, N) = (", B, ", ", H, ", ", N, ", ", N, ") float32, got ", wkv.sizes(), " ",
              wkv.scalar_type());
  const at::Tensor td = vec_f32(op, "time_decay", p[0], A), u = vec_f32(op, "time_faaaa", p[1], A);
  const at::Tensor lw = vec_f32(op, "ln_x.weight", p[2], A), lb = vec_f32(op, "ln_x.bias", p[3], A);
  const at::Tensor r = as_f32(r_in), k = as_f32(k_in), v = as_f32(v_in);
  at::Tensor g;
  if (g_in.has_value()) g = as_f32(*g_in);
  const at::Tensor state_in = wkv.contiguous();
  at::Tensor state = at::empty_like(state_in);  // (B, H, N, N): the new state
  at::Tensor y = at::empty({B, A}, r.options());
  wkv_groupnorm_gate(r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                     g.defined() ? g.data_ptr<float>() : nullptr, td.data_ptr<float>(), u.data_ptr<float>(),
                     lw.data_ptr<float>(), lb.data_ptr<float>(), state_in.data_ptr<float>(), state.data_ptr<float>(),
                     y.data_ptr<float>(), B, H, N, head_size_divisor);
  return {y, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_in_cpu(const at::Tensor& x_in, const at::Tensor& att,
                                                          const at::Tensor& ffn_shift, at::TensorList p) {
  const char* op = "rnn_step_ffn_in";
  TORCH_CHECK(p.size() == 4, op, ": expected 4 vectors, got ", p.size());
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (B, C), got ", x_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1);
  check_rows(op, "att", att, B, C);
  check_rows(op, "ffn_shift", ffn_shift, B, C);
  const at::Tensor lw = vec_f32(op, "ln2.weight", p[0], C), lb = vec_f32(op, "ln2.bias", p[1], C);
  const at::Tensor mk = vec_f32(op, "ffn.time_mix_k", p[2], C), mr = vec_f32(op, "ffn.time_mix_r", p[3], C);
  const at::Tensor xf = as_f32(x_in), af = as_f32(att), prev_all = as_f32(ffn_shift);
  at::Tensor x = at::empty({B, C}, xf.options()), shift = at::empty({B, C}, xf.options());
  at::Tensor mixed = at::empty({2, B, C}, xf.options());  // [k | r], each (B, C)
  const float* xs = xf.data_ptr<float>();
  const float* as = af.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < B * C; ++i) xp[i] = xs[i] + as[i];
  for (int64_t b = 0; b < B; ++b) {
    float* xn = shift.data_ptr<float>() + b * C;
    layer_norm(xp + b * C, lw.data_ptr<float>(), lb.data_ptr<float>(), xn, C, 1e-5f);
    const float* prev = prev_all.data_ptr<float>() + b * C;
    token_mix(xn, prev, mk.data_ptr<float>(), mixed.data_ptr<float>() + b * C, C);
    token_mix(xn, prev, mr.data_ptr<float>(), mixed.data_ptr<float>() + (B + b) * C, C);
  }
  return {x, shift, mixed};
}

at::Tensor relu_square_cpu(const at::Tensor& h_in) {
  const at::Tensor h = as_f32(h_in);
  at::Tensor out = at::empty_like(h);
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  relu_square(hp, op, h.numel());
  return out;
}

at::Tensor ffn_residual_cpu(const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& v_in) {
  const char* op = "rnn_step_ffn_residual";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (B, C), got ", x_in.sizes());
  check_rows(op, "r", r_in, x_in.size(0), x_in.size(1));
  check_rows(op, "v", v_in, x_in.size(0), x_in.size(1));
  const at::Tensor xf = as_f32(x_in), r = as_f32(r_in), v = as_f32(v_in);
  at::Tensor out = at::empty_like(xf);
  const float* xs = xf.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* o = out.data_ptr<float>();
  add_gated_value(xs, rp, vp, o, xf.numel());
  return out;
}

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_FRAGMENT(rwkvctl, m) {
  m.def("rnn_step_att_in(Tensor x, Tensor att_shift, Tensor[] vecs, bool has_ln0, bool has_gate) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("rnn_step_att_out(Tensor r, Tensor k, Tensor v, Tensor? g, Tensor wkv, Tensor[] vecs, "
        "float head_size_divisor) -> (Tensor, Tensor)");
  m.def("rnn_step_ffn_in(Tensor x, Tensor att, Tensor ffn_shift, Tensor[] vecs) -> (Tensor, Tensor, Tensor)");
  m.def("rnn_step_relu_square(Tensor h) -> Tensor");
  m.def("rnn_step_ffn_residual(Tensor x, Tensor r, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(rwkvctl, CPU, m) {
  m.impl("rnn_step_att_in", &rwkvctl::att_in_cpu);
  m.impl("rnn_step_att_out", &rwkvctl::att_out_cpu);
  m.impl("rnn_step_ffn_in", &rwkvctl::ffn_in_cpu);
  m.impl("rnn_step_relu_square", &rwkvctl::relu_square_cpu);
  m.impl("rnn_step_ffn_residual", &rwkvctl::ffn_residual_cpu);
}
