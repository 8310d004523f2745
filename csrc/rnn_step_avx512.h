// AVX-512 gemv, included by rnn_step_cpu.cpp on x86 only (outside any target pragma: each function carries its
// target). Explicit intrinsics, because the auto-vectorised bf16 loop of rnn_step_kernel.h ran at under half the
// memory bandwidth here. Four weight rows share each load of x (eight rows, software prefetch 1-3 KB ahead, or
// widening by unpacking with zeros against a permuted x measured no faster on the development machine).
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 avx512_load_w(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 avx512_load_w(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 avx512_load_w(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 avx512_load_w(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <typename W>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void gemv_rows_avx512(const W* w, const float* x, float* y, int64_t B,
                                                                    int64_t K, int64_t n0, int64_t n1, int64_t ldy) {
  const int64_t K16 = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const W* w0 = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t k = 0; k < K16; k += 16) {
        const __m512 xv = _mm512_loadu_ps(xb + k);
        a0 = _mm512_fmadd_ps(avx512_load_w(w0 + k), xv, a0);
        a1 = _mm512_fmadd_ps(avx512_load_w(w0 + K + k), xv, a1);
        a2 = _mm512_fmadd_ps(avx512_load_w(w0 + 2 * K + k), xv, a2);
        a3 = _mm512_fmadd_ps(avx512_load_w(w0 + 3 * K + k), xv, a3);
      }
      if (tail) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, xb + K16);
        a0 = _mm512_fmadd_ps(avx512_load_w(w0 + K16, tail), xv, a0);
        a1 = _mm512_fmadd_ps(avx512_load_w(w0 + K + K16, tail), xv, a1);
        a2 = _mm512_fmadd_ps(avx512_load_w(w0 + 2 * K + K16, tail), xv, a2);
        a3 = _mm512_fmadd_ps(avx512_load_w(w0 + 3 * K + K16, tail), xv, a3);
      }
      float* yb = y + b * ldy + n;
      yb[0] = _mm512_reduce_add_ps(a0);
      yb[1] = _mm512_reduce_add_ps(a1);
      yb[2] = _mm512_reduce_add_ps(a2);
      yb[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; n < n1; ++n) {
    const W* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < K16; k += 16) a = _mm512_fmadd_ps(avx512_load_w(wn + k), _mm512_loadu_ps(xb + k), a);
      if (tail) a = _mm512_fmadd_ps(avx512_load_w(wn + K16, tail), _mm512_maskz_loadu_ps(tail, xb + K16), a);
      y[b * ldy + n] = _mm512_reduce_add_ps(a);
    }
  }
}

// One weight row at a time, front to back, ACC independent sums: the weights are read as one sequential stream,
// which the hardware prefetcher follows better than the four interleaved streams of gemv_rows_avx512 (measured on
// the 2-core AMD EPYC CI box, cold weights, 1 thread: (768, 768) fp32 13.5 -> 18 GB/s, bf16 8.5 -> 15 GB/s; rows of
// 3072 and more: bf16 13 -> 19 GB/s with ACC = 8, fp32 no better, so fp32 keeps the four-row loop there). With
// B > 1 the row stays in L1 for the other B - 1 dot products.
template <typename W, int ACC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void gemv_seq_avx512(const W* w, const float* x, float* y,
                                                                   int64_t B, int64_t K, int64_t n0, int64_t n1,
                                                                   int64_t ldy) {
  constexpr int64_t kStep = 16 * ACC;
  const int64_t K_step = K - K % kStep, K16 = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const W* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      __m512 a[ACC];
      for (int i = 0; i < ACC; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K_step; k += kStep) {
#pragma GCC unroll 8
        for (int i = 0; i < ACC; ++i)
          a[i] = _mm512_fmadd_ps(avx512_load_w(wn + k + 16 * i), _mm512_loadu_ps(xb + k + 16 * i), a[i]);
      }
      for (int64_t k = K_step; k < K16; k += 16)
        a[0] = _mm512_fmadd_ps(avx512_load_w(wn + k), _mm512_loadu_ps(xb + k), a[0]);
      if (tail) a[0] = _mm512_fmadd_ps(avx512_load_w(wn + K16, tail), _mm512_maskz_loadu_ps(tail, xb + K16), a[0]);
      for (int i = 1; i < ACC; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
      y[b * ldy + n] = _mm512_reduce_add_ps(a[0]);
    }
  }
}
