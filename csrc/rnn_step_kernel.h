// Weight-streaming kernels of the RNN decode step, included once per instruction set by rnn_step_cpu.cpp (inside
// a namespace, under a target pragma), like wkv5_cpu_kernel.h. Plain loops written for the auto-vectoriser:
// `omp simd` reductions over the contiguous K dimension, bf16 widened to fp32 by a 16-bit shift.
// No includes here: the including file provides <cstdint>/<cstring>.

inline float widen(float v) { return v; }
inline float widen(uint16_t bits) {  // bf16 is the upper half of an fp32
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// y[b * ldy + n] = sum_k w[n * K + k] * x[b * K + k] for rows n in [n0, n1) and every b < B; fp32 accumulation.
// Four weight rows at a time share each load of x; the rows stay in L1 while the batch rows pass over them, so the
// weights are read from memory once whatever B is.
template <typename W>
void gemv_rows(const W* w, const float* x, float* y, int64_t B, int64_t K, int64_t n0, int64_t n1, int64_t ldy) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const W* w0 = w + n * K;
    const W* w1 = w0 + K;
    const W* w2 = w1 + K;
    const W* w3 = w2 + K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xb[k];
        a0 += widen(w0[k]) * xv;
        a1 += widen(w1[k]) * xv;
        a2 += widen(w2[k]) * xv;
        a3 += widen(w3[k]) * xv;
      }
      float* yb = y + b * ldy + n;
      yb[0] = a0;
      yb[1] = a1;
      yb[2] = a2;
      yb[3] = a3;
    }
  }
  for (; n < n1; ++n) {
    const W* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < K; ++k) a += widen(wn[k]) * xb[k];
      y[b * ldy + n] = a;
    }
  }
}

// One WKV5 step for one (batch row, head): y[i] = sum_j r[j] (u[j] k[j] v[i] + s[j, i]); s'[j, i] = k[j] v[i] +
// decay[j] s[j, i], s (N, N) row-major [key j][value i] read from s_in and written to s_out (which may be s_in):
// the new state needs no copy of the old one first.
inline void wkv_step_head(const float* r, const float* k, const float* v, const float* decay, const float* u,
                          const float* s_in, float* s_out, float* y, int64_t N) {
  for (int64_t i = 0; i < N; ++i) y[i] = 0.f;
  for (int64_t j = 0; j < N; ++j) {
    const float* sj = s_in + j * N;
    float* oj = s_out + j * N;
    const float rj = r[j], kj = k[j], uk = u[j] * k[j], dj = decay[j];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
      const float kv = v[i], sv = sj[i];
      y[i] += rj * (uk * kv + sv);
      oj[i] = kj * kv + dj * sv;
    }
  }
}
