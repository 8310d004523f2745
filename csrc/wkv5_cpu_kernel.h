// CPU WKV5 scans for one (batch, head) pair, fp32 throughout.
//
// This file is deliberately include-guard free and includes nothing: wkv5_cpu.cpp includes it once per
// instruction set, each time inside its own namespace and under its own `#pragma GCC target`, so a wheel
// built with plain -O3 still runs AVX2/AVX-512 code where the CPU has it (chosen at run time).
//
// Pointers r,k,v,y,gy,gr,gk,gv address element (t=0, i=0) of this (b, h); consecutive steps are `stride`
// floats apart (stride = H*N for contiguous (B, T, H, N) tensors). S, Q, dS are N*N row-major [key j][value i]
// scratch/state buffers owned by the caller. Inner loops run over contiguous rows and vectorise (`omp simd`,
// built with -fopenmp-simd: no OpenMP runtime involved). Without -ffast-math the compiler must keep a float
// reduction in order (16 dependent scalar adds per row), so dot products keep kLanes partial sums and add
// them pairwise instead, and the forward-direction backward scan keeps S and Q transposed so that its
// per-row dot products become vertical accumulations with no reduction at all.

constexpr int kLanes = 16;  // every compiled head size (16..128) is a multiple of it

// Pairwise sum of kLanes partial sums.
inline float sum_lanes(float* p) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int l = 0; l < width; ++l) p[l] += p[l + width];
  }
  return p[0];
}

template <int N>
inline float dot(const float* __restrict a, const float* __restrict b) {
  float p[kLanes] = {};
  for (int i0 = 0; i0 < N; i0 += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) p[l] += a[i0 + l] * b[i0 + l];
  }
  return sum_lanes(p);
}

template <int N>
inline float dot3(const float* __restrict a, const float* __restrict b, const float* __restrict c) {
  float p[kLanes] = {};
  for (int i0 = 0; i0 < N; i0 += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) p[l] += a[i0 + l] * b[i0 + l] * c[i0 + l];
  }
  return sum_lanes(p);
}

template <int N>
void wkv5_fwd_head(const float* __restrict r, const float* __restrict k, const float* __restrict v,
                   const float* __restrict decay, const float* __restrict u, float* __restrict S,
                   float* __restrict y, int64_t T, int64_t stride) {
  float acc[N];
  for (int64_t t = 0; t < T; ++t) {
    const float* __restrict rt = r + t * stride;
    const float* __restrict kt = k + t * stride;
    const float* __restrict vt = v + t * stride;
    const float bonus = dot3<N>(rt, u, kt);
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

// The state one chunk of steps adds, starting from S = 0 (caller zeroes it): sum_s decay^(T-1-s) k_s v_s^T.
// Used by the time-chunked forward (wkv5_cpu.cpp) when B*H alone cannot keep every thread busy.
template <int N>
void wkv5_state_head(const float* __restrict k, const float* __restrict v, const float* __restrict decay,
                     float* __restrict S, int64_t T, int64_t stride) {
  for (int64_t t = 0; t < T; ++t) {
    const float* __restrict kt = k + t * stride;
    const float* __restrict vt = v + t * stride;
    for (int j = 0; j < N; ++j) {
      const float kj = kt[j], wj = decay[j];
      float* __restrict Sj = S + j * N;
#pragma omp simd
      for (int i = 0; i < N; ++i) Sj[i] = wj * Sj[i] + kj * vt[i];
    }
  }
}

// Forward-direction backward scan: gr, and the per-(b,h) partial sums of gdecay and gu. ST holds s_in
// TRANSPOSED ([value i][key j]) on entry and is overwritten; QT (same layout) must be zero on entry. vg
// receives v_t.gy_t for every t. g_s_out (may be null) is in the normal [key j][value i] layout.
template <int N>
void wkv5_bwd_forward_scan(const float* __restrict r, const float* __restrict k, const float* __restrict v,
                           const float* __restrict decay, const float* __restrict u, const float* __restrict gy,
                           const float* __restrict g_s_out, float* __restrict ST, float* __restrict QT,
                           float* __restrict gr, float* __restrict gdecay, float* __restrict gu,
                           float* __restrict vg, int64_t T, int64_t stride) {
  float a[N], q[N];
  for (int64_t t = 0; t < T; ++t) {
    const float* __restrict rt = r + t * stride;
    const float* __restrict kt = k + t * stride;
    const float* __restrict vt = v + t * stride;
    const float* __restrict gyt = gy + t * stride;
    float* __restrict grt = gr + t * stride;
    const float vgt = dot<N>(vt, gyt);
    vg[t] = vgt;
#pragma omp simd
    for (int j = 0; j < N; ++j) a[j] = q[j] = 0.f;
    for (int i = 0; i < N; ++i) {
      const float gi = gyt[i], vi = vt[i];
      float* __restrict Si = ST + i * N;
      float* __restrict Qi = QT + i * N;
#pragma omp simd
      for (int j = 0; j < N; ++j) {
        const float s = Si[j];
        a[j] += s * gi;          // (S_{t-1} gy_t)[j]
        q[j] += Qi[j] * gi;      // (Q_{t-1} gy_t)[j]
        Qi[j] = decay[j] * Qi[j] + s;
        Si[j] = decay[j] * s + kt[j] * vi;
      }
    }
#pragma omp simd
    for (int j = 0; j < N; ++j) {
      grt[j] = a[j] + u[j] * kt[j] * vgt;
      gdecay[j] += rt[j] * q[j];
      gu[j] += rt[j] * kt[j] * vgt;
    }
  }
  if (g_s_out != nullptr) {
#pragma omp simd
    for (int j = 0; j < N; ++j) q[j] = 0.f;
    for (int i = 0; i < N; ++i) {
      const float* __restrict Qi = QT + i * N;
#pragma omp simd
      for (int j = 0; j < N; ++j) q[j] += Qi[j] * g_s_out[j * N + i];
    }
#pragma omp simd
    for (int j = 0; j < N; ++j) gdecay[j] += q[j];
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
    const float ruk = dot3<N>(rt, u, kt);
#pragma omp simd
    for (int i = 0; i < N; ++i) acc[i] = ruk * gyt[i];
    for (int j = 0; j < N; ++j) {
      const float rj = rt[j], kj = kt[j], wj = decay[j];
      float* __restrict dSj = dS + j * N;
      float p[kLanes] = {};
      for (int i0 = 0; i0 < N; i0 += kLanes) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const int i = i0 + l;
          const float d = dSj[i];
          p[l] += d * vt[i];
          acc[i] += d * kj;
          dSj[i] = wj * d + rj * gyt[i];
        }
      }
      gkt[j] = sum_lanes(p) + rj * u[j] * vg[t];
    }
    float* __restrict gvt = gv + t * stride;
#pragma omp simd
    for (int i = 0; i < N; ++i) gvt[i] = acc[i];
  }
}
