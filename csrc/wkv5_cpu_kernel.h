// CPU WKV5 scans for one (batch, head) pair, fp32 throughout.
//
// This file is deliberately include-guard free and includes nothing: wkv5_cpu.cpp includes it once per
// instruction set, each time inside its own namespace and under its own `#pragma GCC target`, so a wheel
// built with plain -O3 still runs AVX2/AVX-512 code where the CPU has it (chosen at run time).
//
// Pointers r,k,v,y,gy,gr,gk,gv address element (t=0, i=0) of this (b, h); consecutive steps are `stride`
// floats apart (stride = H*N for contiguous (B, T, H, N) tensors). S, Q, dS are N*N row-major [key j][value i]
// scratch/state buffers owned by the caller. The i-loops run over contiguous rows, so they vectorise; the
// row dot products use `omp simd reduction` (built with -fopenmp-simd, no OpenMP runtime involved).

template <int N>
void wkv5_fwd_head(const float* __restrict r, const float* __restrict k, const float* __restrict v,
                   const float* __restrict decay, const float* __restrict u, float* __restrict S,
                   float* __restrict y, int64_t T, int64_t stride) {
  float acc[N];
  for (int64_t t = 0; t < T; ++t) {
    const float* __restrict rt = r + t * stride;
    const float* __restrict kt = k + t * stride;
    const float* __restrict vt = v + t * stride;
    float bonus = 0.f;
#pragma omp simd reduction(+ : bonus)
    for (int j = 0; j < N; ++j) bonus += rt[j] * u[j] * kt[j];
#pragma omp simd
    for (int i = 0; i < N; ++i) acc[i] = bonus * vt[i];
    for (int j = 0; j < N; ++j) {
      const float rj = rt[j], kj = kt[j], wj = decay[j];
      float* __restrict Sj = S + j * N;
#pragma omp simd
      for (int i = 0; i < N; ++i) {
        acc[i] += rj * Sj[i];
        Sj[i] = wj * Sj[i] + kj * vt[i];
      }
    }
    float* __restrict yt = y + t * stride;
#pragma omp simd
    for (int i = 0; i < N; ++i) yt[i] = acc[i];
  }
}

// Forward-direction backward scan: gr, and the per-(b,h) partial sums of gdecay and gu.
// S holds s_in on entry (overwritten), Q must be zero on entry. vg receives v_t.gy_t for every t.
template <int N>
void wkv5_bwd_forward_scan(const float* __restrict r, const float* __restrict k, const float* __restrict v,
                           const float* __restrict decay, const float* __restrict u, const float* __restrict gy,
                           const float* __restrict g_s_out, float* __restrict S, float* __restrict Q,
                           float* __restrict gr, float* __restrict gdecay, float* __restrict gu,
                           float* __restrict vg, int64_t T, int64_t stride) {
  for (int64_t t = 0; t < T; ++t) {
    const float* __restrict rt = r + t * stride;
    const float* __restrict kt = k + t * stride;
    const float* __restrict vt = v + t * stride;
    const float* __restrict gyt = gy + t * stride;
    float* __restrict grt = gr + t * stride;
    float vgt = 0.f;
#pragma omp simd reduction(+ : vgt)
    for (int i = 0; i < N; ++i) vgt += vt[i] * gyt[i];
    vg[t] = vgt;
    for (int j = 0; j < N; ++j) {
      const float kj = kt[j], wj = decay[j];
      float* __restrict Sj = S + j * N;
      float* __restrict Qj = Q + j * N;
      float a = 0.f, q = 0.f;
#pragma omp simd reduction(+ : a, q)
      for (int i = 0; i < N; ++i) {
        const float s = Sj[i];
        a += s * gyt[i];
        q += Qj[i] * gyt[i];
        Qj[i] = wj * Qj[i] + s;
        Sj[i] = wj * s + kj * vt[i];
      }
      grt[j] = a + u[j] * kj * vgt;
      gdecay[j] += rt[j] * q;
      gu[j] += rt[j] * kj * vgt;
    }
  }
  if (g_s_out != nullptr) {
    for (int j = 0; j < N; ++j) {
      const float* __restrict Qj = Q + j * N;
      const float* __restrict Gj = g_s_out + j * N;
      float q = 0.f;
#pragma omp simd reduction(+ : q)
      for (int i = 0; i < N; ++i) q += Qj[i] * Gj[i];
      gdecay[j] += q;
    }
  }
}

// Reverse-time backward scan carrying dS: gk, gv; dS holds g_s_out (or zeros) on entry and g_s_in on exit.
template <int N>
void wkv5_bwd_reverse_scan(const float* __restrict r, const float* __restrict k, const float* __restrict v,
                           const float* __restrict decay, const float* __restrict u, const float* __restrict gy,
                           const float* __restrict vg, float* __restrict dS, float* __restrict gk,
                           float* __restrict gv, int64_t T, int64_t stride) {
  float acc[N];
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* __restrict rt = r + t * stride;
    const float* __restrict kt = k + t * stride;
    const float* __restrict vt = v + t * stride;
    const float* __restrict gyt = gy + t * stride;
    float* __restrict gkt = gk + t * stride;
    float ruk = 0.f;
#pragma omp simd reduction(+ : ruk)
    for (int j = 0; j < N; ++j) ruk += rt[j] * u[j] * kt[j];
#pragma omp simd
    for (int i = 0; i < N; ++i) acc[i] = ruk * gyt[i];
    for (int j = 0; j < N; ++j) {
      const float rj = rt[j], kj = kt[j], wj = decay[j];
      float* __restrict dSj = dS + j * N;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int i = 0; i < N; ++i) {
        const float d = dSj[i];
        a += d * vt[i];
        acc[i] += d * kj;
        dSj[i] = wj * d + rj * gyt[i];
      }
      gkt[j] = a + rj * u[j] * vg[t];
    }
    float* __restrict gvt = gv + t * stride;
#pragma omp simd
    for (int i = 0; i < N; ++i) gvt[i] = acc[i];
  }
}
