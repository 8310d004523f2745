// AVX-512 gemv, included by rnn_step_cpu.cpp on x86 only (outside any target pragma: each function carries its
// target). Explicit intrinsics, because the auto-vectorised bf16 loop of rnn_step_kernel.h ran at under half the
// memory bandwidth here. Tried and dropped: four or eight weight rows sharing each load of x (their interleaved
// streams prefetched worse), software prefetch 1-3 KB ahead, widening by unpacking with zeros against a permuted x.
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

// One weight row at a time, front to back, ACC independent sums: the weights are read as one sequential stream,
// which the hardware prefetcher follows better than four interleaved row streams did (measured on
// the 2-core AMD EPYC CI box, cold weights, 1 thread: (768, 768) fp32 13.5 -> 18 GB/s, bf16 8.5 -> 15 GB/s). With
// B > 1 the row stays in L1 for the other B - 1 dot products. linear_into (rnn_step_cpu.cpp) says which ACC it uses.
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

// wkv_step_head (rnn_step_kernel.h) for N a multiple of 16 with s_out 64-byte aligned and apart from s_in: the same
// arithmetic lane by lane (fused multiply-adds in the same order), the new state written with non-temporal stores.
// The state (12 layers x 196 KB on the 0.1b preset) is evicted by the weights streamed between two tokens, so caching
// it on write buys nothing, while an ordinary store first reads each line it writes: 2.4 MB less read a token. Each
// store fills a whole line. The caller issues _mm_sfence() before the state is read. For the usual head sizes the
// N / 16 sums stay in registers and the state is read row by row, front to back, one sequential stream (0.1b preset,
// packed int4, 1 thread: 0.39 -> 0.16 ms a token, where column blocks of 16 made N / 16 passes down the rows with
// 256-byte strides); other multiples of 16 still take column blocks.
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline void wkv_step_rows_stream(
    const float* r, const float* k, const float* v, const float* decay, const float* u, const float* s_in,
    float* s_out, float* y) {
  constexpr int64_t N = 16 * NB;
  __m512 kv[NB], acc[NB];
  for (int c = 0; c < NB; ++c) {
    kv[c] = _mm512_loadu_ps(v + 16 * c);
    acc[c] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < N; ++j) {
    const __m512 uk = _mm512_set1_ps(u[j] * k[j]), rj = _mm512_set1_ps(r[j]);
    const __m512 kj = _mm512_set1_ps(k[j]), dj = _mm512_set1_ps(decay[j]);
    for (int c = 0; c < NB; ++c) {
      const __m512 sv = _mm512_loadu_ps(s_in + j * N + 16 * c);
      acc[c] = _mm512_fmadd_ps(rj, _mm512_fmadd_ps(uk, kv[c], sv), acc[c]);
      _mm512_stream_ps(s_out + j * N + 16 * c, _mm512_fmadd_ps(kj, kv[c], _mm512_mul_ps(dj, sv)));
    }
  }
  for (int c = 0; c < NB; ++c) _mm512_storeu_ps(y + 16 * c, acc[c]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline void wkv_step_head_stream(
    const float* r, const float* k, const float* v, const float* decay, const float* u, const float* s_in,
    float* s_out, float* y, int64_t N) {
  switch (N) {
    case 16: return wkv_step_rows_stream<1>(r, k, v, decay, u, s_in, s_out, y);
    case 32: return wkv_step_rows_stream<2>(r, k, v, decay, u, s_in, s_out, y);
    case 48: return wkv_step_rows_stream<3>(r, k, v, decay, u, s_in, s_out, y);
    case 64: return wkv_step_rows_stream<4>(r, k, v, decay, u, s_in, s_out, y);
    case 128: return wkv_step_rows_stream<8>(r, k, v, decay, u, s_in, s_out, y);
    default: break;
  }
  for (int64_t i = 0; i < N; i += 16) {
    const __m512 kv = _mm512_loadu_ps(v + i);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < N; ++j) {
      const __m512 sv = _mm512_loadu_ps(s_in + j * N + i);
      const __m512 uk = _mm512_set1_ps(u[j] * k[j]);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(r[j]), _mm512_fmadd_ps(uk, kv, sv), acc);
      _mm512_stream_ps(s_out + j * N + i,
                       _mm512_fmadd_ps(_mm512_set1_ps(k[j]), kv, _mm512_mul_ps(_mm512_set1_ps(decay[j]), sv)));
    }
    _mm512_storeu_ps(y + i, acc);
  }
}

#ifdef RWKVCTL_HAVE_AVX512BF16
// bf16 weights with `vdpbf16ps` (AVX512-BF16): 32 weights per instruction, summed in fp32, no widening. The fp32
// input takes PARTS bf16 parts (split_bf16): PARTS = 1 rounds x to bf16 (the rounding torch's bf16 Linear, our
// module path, applies too: each product off by <= 2^-9 of itself); PARTS = 2 adds lo = bf16(x - hi), so products
// keep 16 of x's 24 significant bits (<= 2^-16), 256x below the bf16 weight's own rounding. The second part is a
// third load per 64 bytes of weights and cost ~8% of bf16 decode (0.1b preset, 1 thread: 1.70-1.75x -> 1.81-1.90x
// fp32's speed with one part), hence one part unless RWKVCTL_BF16_INPUT=split. Not for non-finite inputs (an
// infinite x gives lo = NaN) or subnormals (flushed to zero): the inputs are layer-normed activations. From memory
// this beats widening the weights (gemv_seq_avx512<uint16_t>), whose compute and weight stream overlapped poorly (a
// cold bf16 layer ran at ~14 GB/s against fp32's ~21). xs is (B, PARTS, K).
template <int PARTS, int ACC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) void gemv_seq_dpbf16(
    const uint16_t* w, const uint16_t* xs, float* y, int64_t B, int64_t K, int64_t n0, int64_t n1, int64_t ldy) {
  constexpr int64_t kStep = 32 * ACC;
  const int64_t K_step = K - K % kStep, K32 = K & ~int64_t{31};
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (K - K32)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const uint16_t* xb = xs + PARTS * b * K;
      __m512 a[PARTS * ACC];  // a[PARTS * i + p]: chunk i of each step, part p
      for (int i = 0; i < PARTS * ACC; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K_step; k += kStep) {
#pragma GCC unroll 8
        for (int i = 0; i < ACC; ++i) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(wn + k + 32 * i);
          for (int p = 0; p < PARTS; ++p)
            a[PARTS * i + p] = _mm512_dpbf16_ps(a[PARTS * i + p], wv,
                                                (__m512bh)_mm512_loadu_si512(xb + p * K + k + 32 * i));
        }
      }
      for (int64_t k = K_step; k < K32; k += 32) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wn + k);
        for (int p = 0; p < PARTS; ++p) a[p] = _mm512_dpbf16_ps(a[p], wv, (__m512bh)_mm512_loadu_si512(xb + p * K + k));
      }
      if (tail) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, wn + K32);
        for (int p = 0; p < PARTS; ++p)
          a[p] = _mm512_dpbf16_ps(a[p], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, xb + p * K + K32));
      }
      for (int i = 1; i < PARTS * ACC; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
      y[b * ldy + n] = _mm512_reduce_add_ps(a[0]);
    }
  }
}

// x (B, K) fp32 -> xs (B, PARTS, K) bf16 bits: hi = bf16(x) (round to nearest even), then (PARTS = 2) lo = bf16(x - hi)
template <int PARTS>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) inline void split_bf16(const float* x,
                                                                                              uint16_t* xs, int64_t B,
                                                                                              int64_t K) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K;
    uint16_t* hi = xs + PARTS * b * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(m, xb + k);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(hi + k, m, (__m256i)h);
      if (PARTS == 2) {
        const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
        _mm256_mask_storeu_epi16(hi + K + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back)));
      }
    }
  }
}
#endif  // RWKVCTL_HAVE_AVX512BF16
