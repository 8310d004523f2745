// Elementwise pieces of the RNN decode step shared by the whole-layer op (rnn_step_cpu.cpp) and the per-stage ops
// around a block's own matmuls (rnn_step_parts_cpu.cpp), so both compute the same thing in the same order.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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

// exp(x) in plain arithmetic that the compiler vectorizes (std::exp is a libm call per element): x = n ln2 + r with
// |r| <= ln2 / 2, Cephes' degree-6 polynomial for exp(r), times 2^n built in the exponent bits. Within 1.4 ulp of
// exp over [-87, 88] (libm: 0.5 ulp); 0 below, inf above, NaN stays NaN. Loops using it vectorize with
// -fno-trapping-math (build.py), which lets comparisons become selects, and `#pragma omp simd` (GCC sees the selects
// as control flow otherwise).
inline float exp_f32(float x) {
  const float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest: |xc log2 e| < 2^22
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;            // ln2 in two parts: r exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n == n ? n : 0.f) + 127) << 23;  // 2^n, n in [-126, 127]; NaN: any
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x < -87.f ? 0.f : (x > 88.f ? HUGE_VALF : y);
}

// out = relu(h)^2, branch-free (the signs are as good as random); out may be h
inline void relu_square(const float* h, float* out, int64_t n) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float r = h[i] > 0.f ? h[i] : 0.f;
    out[i] = r * r;
  }
}

// out = x + sigmoid(r) * v, the channel mix's residual; out may be x
inline void add_gated_value(const float* x, const float* r, const float* v, float* out, int64_t n) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + v[i] / (1.f + exp_f32(-r[i]));
}

// The time mix after its r, k, v (, g) projections, each (B, A = H * N) fp32 row-major: the WKV step of every
// (row, head) from wkv_in (B, H, N, N) into wkv_out (may be the same buffer), then GroupNorm(H groups) of
// y / head_size_divisor and the silu gate when g is not null -> y (B, A), the output projection's input. time_decay is the raw parameter
// (the decay exp(-exp(.)) is taken here). Defined in rnn_step_cpu.cpp (it picks the WKV kernel's ISA).
void wkv_groupnorm_gate(const float* r, const float* k, const float* v, const float* g, const float* time_decay,
                        const float* u, const float* lnx_w, const float* lnx_b, const float* wkv_in, float* wkv_out,
                        float* y, int64_t B, int64_t H, int64_t N, double head_size_divisor);

}  // namespace rwkvctl
