// WKV5 CUDA kernels (device code only), included by wkv5_cuda.cu. Kept free of host/torch-CUDA APIs so the
// same code can also be compiled as plain C++ by the CPU emulation test (tests/kernels/wkv5_cuda_emulation.cpp),
// which runs every "thread" of a block as a std::thread with a barrier for __syncthreads().
//
// Algorithm: a sequential scan over T per (batch, head), with the N x N fp32 state spread over the N threads
// of one block (one state row or column per thread, in registers). Where B*H blocks alone would leave the GPU
// idle (prompt ingestion, small batches) the forward cuts T into chunks and passes states between them:
// chunk contributions in parallel, a short scan over chunks, then every chunk's outputs in parallel, all with
// the same exact recurrence (no decay^-t factorisation, so no overflow for strong decays). The backward does the
// same for its three scans (the forward one also carries Q = dS/d(decay) across chunks). This is NOT the
// intra-chunk-matmul (tensor core) formulation, which is left as future work.
//
// The backward runs three independent scans as blockIdx.z = 0, 1, 2 of one launch (see ../wkv5.h for the math):
//   0: forward in t, thread j owns row j of S and of Q = dS/d(decay_j)  -> gr, gdecay, gu
//   1: reverse in t, thread j owns row j of dS                          -> gk, g_s_in
//   2: reverse in t, thread i owns column i of dS                       -> gv
#pragma once

#include <cstdint>

namespace rwkvctl {
namespace wkv5_cuda {

template <typename scalar_t>
__device__ __forceinline__ float load_f(const scalar_t* p, int64_t idx) {
  return static_cast<float>(p[idx]);
}

// Forward over one chunk of time steps [c * chunk, min(T, (c + 1) * chunk)) with c = blockIdx.y; one block per
// (b, h, chunk) (blockIdx.x = b * H + h), N threads; thread i owns column i of S: S[j] = S[j][i].
// s_init is (B*H, gridDim.y, N, N): the state entering each chunk (with one chunk: s_in itself). s_final, when
// not null, receives the state after the chunk (used with a single chunk, where it is s_out).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(N)
    wkv5_fwd_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                    const float* __restrict__ decay, const float* __restrict__ u, const float* __restrict__ s_init,
                    float* __restrict__ s_final, scalar_t* __restrict__ y, int64_t T, int64_t H, int64_t chunk) {
  const int64_t bh = blockIdx.x, c = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const int i = threadIdx.x;
  __shared__ float sr[N], sk[N], sw[N], su[N];
  sw[i] = decay[h * N + i];
  su[i] = u[h * N + i];
  float S[N];
  const float* s0 = s_init + (bh * gridDim.y + c) * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s0[j * N + i];
  const int64_t stride = H * N;
  const int64_t t0 = c * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
  int64_t off = (b * T * H + h) * N + i + t0 * stride;  // element (b, t0, h, i) of a contiguous (B, T, H, N) tensor
  for (int64_t t = t0; t < t1; ++t, off += stride) {
    __syncthreads();  // previous step's readers are done with sr/sk (and sw/su are visible on the first step)
    sr[i] = load_f(r, off);
    sk[i] = load_f(k, off);
    const float vi = load_f(v, off);
    __syncthreads();
    float acc = 0.f, bonus = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float rj = sr[j], kj = sk[j];
      bonus += rj * su[j] * kj;
      acc += rj * S[j];
      S[j] = sw[j] * S[j] + kj * vi;
    }
    y[off] = static_cast<scalar_t>(acc + bonus * vi);
  }
  if (s_final != nullptr) {
    float* s1 = s_final + bh * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) s1[j * N + i] = S[j];
  }
}

// Chunked forward, pass 1 (grid (B*H, n_chunks), N threads): the state each chunk adds when it starts from
// zero, sum_s decay^(end-1-s) k_s v_s^T over its steps, written to ws (B*H, n_chunks, N, N).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(N)
    wkv5_chunk_state_kernel(const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                            const float* __restrict__ decay, float* __restrict__ ws, int64_t T, int64_t H,
                            int64_t chunk) {
  const int64_t bh = blockIdx.x, c = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const int i = threadIdx.x;
  __shared__ float sk[N], sw[N];
  sw[i] = decay[h * N + i];
  float S[N];
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = 0.f;
  const int64_t stride = H * N;
  const int64_t t0 = c * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
  int64_t off = (b * T * H + h) * N + i + t0 * stride;
  for (int64_t t = t0; t < t1; ++t, off += stride) {
    __syncthreads();
    sk[i] = load_f(k, off);
    const float vi = load_f(v, off);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = sw[j] * S[j] + sk[j] * vi;
  }
  float* out = ws + (bh * gridDim.y + c) * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) out[j * N + i] = S[j];
}

// Chunked forward, pass 2 (grid B*H, N threads): the short sequential scan over chunks. Replaces each ws[c]
// (the chunk's own contribution) by the state entering chunk c, and writes the final state to s_out:
// S_enter(c + 1) = decay^len(c) * S_enter(c) + contribution(c), S_enter(0) = s_in.
template <int N>
__global__ void __launch_bounds__(N)
    wkv5_chunk_scan_kernel(const float* __restrict__ decay, const float* __restrict__ s_in,
                           float* __restrict__ ws, float* __restrict__ s_out, int64_t T, int64_t H,
                           int64_t chunk) {
  const int64_t bh = blockIdx.x, n_chunks = (T + chunk - 1) / chunk;
  const int64_t h = bh % H;
  const int i = threadIdx.x;
  float S[N];
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s_in[bh * N * N + j * N + i];
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t len = (c + 1) * chunk < T ? chunk : T - c * chunk;
    float* p = ws + (bh * n_chunks + c) * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float contribution = p[j * N + i];
      p[j * N + i] = S[j];
      S[j] = powf(decay[h * N + j], static_cast<float>(len)) * S[j] + contribution;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) s_out[bh * N * N + j * N + i] = S[j];
}

// Steps per chunk so that about `target_blocks` blocks run at once (forward and backward): T itself (a single
// pass) when B*H alone fills the GPU or T is short; chunks are at least `min_chunk` steps long.
inline int64_t wkv5_chunk_length(int64_t batch_heads, int64_t T, int64_t target_blocks, int64_t min_chunk) {
  if (T < 2 * min_chunk || batch_heads >= target_blocks) return T > 0 ? T : 1;
  int64_t n_chunks = (target_blocks + batch_heads - 1) / batch_heads;
  if (n_chunks > T / min_chunk) n_chunks = T / min_chunk;
  return (T + n_chunks - 1) / n_chunks;
}

// Backward over one chunk of steps [c * chunk, min(T, (c + 1) * chunk)): c = blockIdx.y, the scan role =
// blockIdx.z (0, 1, 2 as described at the top), one block per (b, h) = blockIdx.x, N threads.
// s_enter: (B*H, gridDim.y, N, N) the state entering each chunk (single chunk: s_in itself).
// q_enter: same layout, Q = dS/d(decay) entering each chunk; null means zero (single chunk).
// d_end:   same layout, the gradient w.r.t. the state after each chunk's last step; null means zero.
// g_s_out: only read by the last chunk, for the decay-gradient term of the final state (null: none).
// gdecay, gu: (B*H, gridDim.y, N) per-chunk partial sums; g_s_in is written by the first chunk.
template <typename scalar_t, int N>
__global__ void __launch_bounds__(N)
    wkv5_bwd_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                    const float* __restrict__ decay, const float* __restrict__ u, const float* __restrict__ s_enter,
                    const float* __restrict__ q_enter, const float* __restrict__ d_end,
                    const scalar_t* __restrict__ gy, const float* __restrict__ g_s_out, scalar_t* __restrict__ gr,
                    scalar_t* __restrict__ gk, scalar_t* __restrict__ gv, float* __restrict__ gdecay,
                    float* __restrict__ gu, float* __restrict__ g_s_in, int64_t T, int64_t H, int64_t chunk) {
  const int64_t bh = blockIdx.x, c = blockIdx.y, n_chunks = gridDim.y;
  const int64_t b = bh / H, h = bh % H;
  const int role = blockIdx.z;
  const int x = threadIdx.x;  // row j for roles 0 and 1, column i for role 2
  __shared__ float sa[N], sb[N], sw[N], su[N];
  sw[x] = decay[h * N + x];
  su[x] = u[h * N + x];
  const float wx = sw[x], ux = su[x];
  const int64_t stride = H * N;
  const int64_t t0 = c * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
  const int64_t first = (b * T * H + h) * N + x;  // (b, t=0, h, x)
  const int64_t slot = (bh * n_chunks + c) * N * N;

  if (role == 0) {
    float S[N], Q[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      S[i] = s_enter[slot + x * N + i];
      Q[i] = q_enter == nullptr ? 0.f : q_enter[slot + x * N + i];
    }
    float gdec = 0.f, guj = 0.f;
    int64_t off = first + t0 * stride;
    for (int64_t t = t0; t < t1; ++t, off += stride) {
      __syncthreads();
      sa[x] = load_f(v, off);
      sb[x] = load_f(gy, off);
      const float rj = load_f(r, off), kj = load_f(k, off);
      __syncthreads();
      float vg = 0.f, a = 0.f, q = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float g = sb[i], s = S[i];
        vg += sa[i] * g;
        a += s * g;
        q += Q[i] * g;
        Q[i] = wx * Q[i] + s;
        S[i] = wx * s + kj * sa[i];
      }
      gr[off] = static_cast<scalar_t>(a + ux * kj * vg);
      gdec += rj * q;
      guj += rj * kj * vg;
    }
    if (g_s_out != nullptr && c == n_chunks - 1) {
      const float* gso = g_s_out + bh * N * N;
#pragma unroll
      for (int i = 0; i < N; ++i) gdec += Q[i] * gso[x * N + i];
    }
    gdecay[(bh * n_chunks + c) * N + x] = gdec;
    gu[(bh * n_chunks + c) * N + x] = guj;
  } else if (role == 1) {
    float dS[N];
#pragma unroll
    for (int i = 0; i < N; ++i) dS[i] = d_end == nullptr ? 0.f : d_end[slot + x * N + i];
    int64_t off = first + (t1 - 1) * stride;
    for (int64_t t = t1 - 1; t >= t0; --t, off -= stride) {
      __syncthreads();
      sa[x] = load_f(v, off);
      sb[x] = load_f(gy, off);
      const float rj = load_f(r, off);
      __syncthreads();
      float vg = 0.f, a = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        vg += sa[i] * sb[i];
        a += dS[i] * sa[i];
        dS[i] = wx * dS[i] + rj * sb[i];
      }
      gk[off] = static_cast<scalar_t>(a + rj * ux * vg);
    }
    if (c == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) g_s_in[bh * N * N + x * N + i] = dS[i];
    }
  } else {
    float dS[N];  // column x: dS[j] = dS[j][x]
#pragma unroll
    for (int j = 0; j < N; ++j) dS[j] = d_end == nullptr ? 0.f : d_end[slot + j * N + x];
    int64_t off = first + (t1 - 1) * stride;
    for (int64_t t = t1 - 1; t >= t0; --t, off -= stride) {
      __syncthreads();
      sa[x] = load_f(r, off);
      sb[x] = load_f(k, off);
      const float gyi = load_f(gy, off);
      __syncthreads();
      float ruk = 0.f, acc = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float rj = sa[j], kj = sb[j];
        ruk += rj * su[j] * kj;
        acc += dS[j] * kj;
        dS[j] = sw[j] * dS[j] + rj * gyi;
      }
      gv[off] = static_cast<scalar_t>(acc + ruk * gyi);
    }
  }
}

// Chunked backward, pass 1 (grid (B*H, n_chunks, 2), N threads, thread i owns column i). blockIdx.z = 0: the
// chunk's own S and Q = dS/d(decay) starting from zero (-> ws_s, ws_q); blockIdx.z = 1: its own reverse
// accumulation sum_t decay^(t - start) r_t gy_t^T starting from zero (-> ws_d). Layout (B*H, n_chunks, N, N).
template <typename scalar_t, int N>
__global__ void __launch_bounds__(N)
    wkv5_bwd_chunk_local_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ k,
                                const scalar_t* __restrict__ v, const scalar_t* __restrict__ gy,
                                const float* __restrict__ decay, float* __restrict__ ws_s, float* __restrict__ ws_q,
                                float* __restrict__ ws_d, int64_t T, int64_t H, int64_t chunk) {
  const int64_t bh = blockIdx.x, c = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const int i = threadIdx.x;
  __shared__ float sa[N], sw[N];
  sw[i] = decay[h * N + i];
  const int64_t stride = H * N;
  const int64_t t0 = c * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
  const int64_t first = (b * T * H + h) * N + i;
  const int64_t slot = (bh * gridDim.y + c) * N * N;
  if (blockIdx.z == 0) {
    float S[N], Q[N];
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = Q[j] = 0.f;
    int64_t off = first + t0 * stride;
    for (int64_t t = t0; t < t1; ++t, off += stride) {
      __syncthreads();
      sa[i] = load_f(k, off);
      const float vi = load_f(v, off);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < N; ++j) {
        Q[j] = sw[j] * Q[j] + S[j];
        S[j] = sw[j] * S[j] + sa[j] * vi;
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      ws_s[slot + j * N + i] = S[j];
      ws_q[slot + j * N + i] = Q[j];
    }
  } else {
    float D[N];
#pragma unroll
    for (int j = 0; j < N; ++j) D[j] = 0.f;
    int64_t off = first + (t1 - 1) * stride;
    for (int64_t t = t1 - 1; t >= t0; --t, off -= stride) {
      __syncthreads();
      sa[i] = load_f(r, off);
      const float gyi = load_f(gy, off);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < N; ++j) D[j] = sw[j] * D[j] + sa[j] * gyi;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) ws_d[slot + j * N + i] = D[j];
  }
}

// Chunked backward, pass 2 (grid (B*H, 2), N threads, thread i owns column i): the short scans over chunks.
// blockIdx.y = 0, forward: ws_s/ws_q[c] <- the (S, Q) entering chunk c, from S = s_in, Q = 0 and
//   S' = w^len S + S_own,  Q' = w^len Q + len w^(len-1) S + Q_own   (Q' is d S'/dw, product rule).
// blockIdx.y = 1, backward: ws_d[c] <- the gradient w.r.t. the state after chunk c, from g_s_out (or 0) at the
//   last chunk and D(c-1) = w^len(c) D(c) + D_own(c).
template <int N>
__global__ void __launch_bounds__(N)
    wkv5_bwd_chunk_scan_kernel(const float* __restrict__ decay, const float* __restrict__ s_in,
                               const float* __restrict__ g_s_out, float* __restrict__ ws_s,
                               float* __restrict__ ws_q, float* __restrict__ ws_d, int64_t T, int64_t H,
                               int64_t chunk) {
  const int64_t bh = blockIdx.x, n_chunks = (T + chunk - 1) / chunk;
  const int64_t h = bh % H;
  const int i = threadIdx.x;
  if (blockIdx.y == 0) {
    float S[N], Q[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      S[j] = s_in[bh * N * N + j * N + i];
      Q[j] = 0.f;
    }
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t len = (c + 1) * chunk < T ? chunk : T - c * chunk;
      const int64_t slot = (bh * n_chunks + c) * N * N;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float own_s = ws_s[slot + j * N + i], own_q = ws_q[slot + j * N + i];
        ws_s[slot + j * N + i] = S[j];
        ws_q[slot + j * N + i] = Q[j];
        const float w = decay[h * N + j];
        const float w_len_1 = powf(w, static_cast<float>(len - 1));
        Q[j] = w_len_1 * w * Q[j] + static_cast<float>(len) * w_len_1 * S[j] + own_q;
        S[j] = w_len_1 * w * S[j] + own_s;
      }
    }
  } else {
    float D[N];
#pragma unroll
    for (int j = 0; j < N; ++j) D[j] = g_s_out == nullptr ? 0.f : g_s_out[bh * N * N + j * N + i];
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
      const int64_t len = (c + 1) * chunk < T ? chunk : T - c * chunk;
      const int64_t slot = (bh * n_chunks + c) * N * N;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float own = ws_d[slot + j * N + i];
        ws_d[slot + j * N + i] = D[j];
        D[j] = powf(decay[h * N + j], static_cast<float>(len)) * D[j] + own;
      }
    }
  }
}

}  // namespace wkv5_cuda
}  // namespace rwkvctl
