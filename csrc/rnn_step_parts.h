// Elementwise pieces of the RNN decode step shared by the whole-layer op (rnn_step_cpu.cpp) and the per-stage ops
// around a block's own matmuls (rnn_step_parts_cpu.cpp), so both compute the same thing in the same order.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace rwkvctl {

inline at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Small per-layer vectors (norm weights, mixes) as contiguous fp32 of n elements, whatever their shape.
inline at::Tensor vec_f32(const char* op, const char* what, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.numel() == n, op, ": ", what, " must have ", n, " elements, got ", t.sizes());
  return as_f32(t).reshape({n});
}

inline void layer_norm(const float* x, const float* g, const float* b, float* out, int64_t n, float eps) {
  double mean = 0.0, var = 0.0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float m = static_cast<float>(mean), inv = static_cast<float>(1.0 / std::sqrt(var / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - m) * inv * g[i] + b[i];
}

// out = x * mix + xx * (1 - mix), row by row (the reference's order of operations)
inline void token_mix(const float* x, const float* xx, const float* mix, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * mix[i] + xx[i] * (1.f - mix[i]);
}

// The time mix after its r, k, v (, g) projections, each (B, A = H * N) fp32 row-major: the WKV step of every
// (row, head) from wkv_in (B, H, N, N) into wkv_out (may be the same buffer), then GroupNorm(H groups) of
// y / head_size_divisor and the silu gate when g is not null -> y (B, A), the output projection's input. time_decay is the raw parameter
// (the decay exp(-exp(.)) is taken here). Defined in rnn_step_cpu.cpp (it picks the WKV kernel's ISA).
void wkv_groupnorm_gate(const float* r, const float* k, const float* v, const float* g, const float* time_decay,
                        const float* u, const float* lnx_w, const float* lnx_b, const float* wkv_in, float* wkv_out,
                        float* y, int64_t B, int64_t H, int64_t N, double head_size_divisor);

}  // namespace rwkvctl
