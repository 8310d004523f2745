// CUDA implementation of rwkvctl::wkv5_fwd / wkv5_bwd.
//
// Algorithm: a sequential scan over T per (batch, head), with the N x N fp32 state spread over the N threads
// of one block (one state row or column per thread, in registers). This is the simple, verifiable form; it
// is NOT the chunked (intra-chunk matmul) formulation, which is left as future work. Unlike the RWKV-LM
// kernel it takes an initial state, returns the final state, has the full backward including g_s_in and an
// incoming g_s_out, supports any batch/length (64-bit offsets), fp32/fp16/bf16 inputs and head sizes
// 16/32/64/128 chosen at run time, and launches on the current stream with error checks.
//
// The backward runs three independent scans as blockIdx.y = 0, 1, 2 of one launch (see wkv5.h for the math):
//   0: forward in t, thread j owns row j of S and of Q = dS/d(decay_j)  -> gr, gdecay, gu
//   1: reverse in t, thread j owns row j of dS                          -> gk, g_s_in
//   2: reverse in t, thread i owns column i of dS                       -> gv
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../static_switch.h"
#include "../wkv5.h"

// fp32, fp16 and bf16 inputs (fp64 would only be computed in fp32 anyway: use the reference for it).
#define WKV5_CUDA_DTYPES(...)                              \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)     \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)      \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

namespace rwkvctl {
namespace {

template <typename scalar_t>
__device__ __forceinline__ float load_f(const scalar_t* p, int64_t idx) {
  return static_cast<float>(p[idx]);
}

// One block per (b, h) (blockIdx.x = b * H + h), N threads; thread i owns column i of S: S[j] = S[j][i].
template <typename scalar_t, int N>
__global__ void __launch_bounds__(N)
    wkv5_fwd_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                    const float* __restrict__ decay, const float* __restrict__ u, const float* __restrict__ s_in,
                    float* __restrict__ s_out, scalar_t* __restrict__ y, int64_t T, int64_t H) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H, h = bh % H;
  const int i = threadIdx.x;
  __shared__ float sr[N], sk[N], sw[N], su[N];
  sw[i] = decay[h * N + i];
  su[i] = u[h * N + i];
  float S[N];
  const float* s0 = s_in + bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s0[j * N + i];
  const int64_t stride = H * N;
  int64_t off = (b * T * H + h) * N + i;  // element (b, t, h, i) of a contiguous (B, T, H, N) tensor
  for (int64_t t = 0; t < T; ++t, off += stride) {
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
  float* s1 = s_out + bh * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) s1[j * N + i] = S[j];
}

template <typename scalar_t, int N>
__global__ void __launch_bounds__(N)
    wkv5_bwd_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                    const float* __restrict__ decay, const float* __restrict__ u, const float* __restrict__ s_in,
                    const scalar_t* __restrict__ gy, const float* __restrict__ g_s_out, scalar_t* __restrict__ gr,
                    scalar_t* __restrict__ gk, scalar_t* __restrict__ gv, float* __restrict__ gdecay,
                    float* __restrict__ gu, float* __restrict__ g_s_in, int64_t T, int64_t H) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H, h = bh % H;
  const int role = blockIdx.y;
  const int x = threadIdx.x;  // row j for roles 0 and 1, column i for role 2
  __shared__ float sa[N], sb[N], sw[N], su[N];
  sw[x] = decay[h * N + x];
  su[x] = u[h * N + x];
  const float wx = sw[x], ux = su[x];
  const int64_t stride = H * N;
  const int64_t first = (b * T * H + h) * N + x;  // (b, t=0, h, x)
  const float* gso = g_s_out == nullptr ? nullptr : g_s_out + bh * N * N;

  if (role == 0) {
    float S[N], Q[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      S[i] = s_in[bh * N * N + x * N + i];
      Q[i] = 0.f;
    }
    float gdec = 0.f, guj = 0.f;
    int64_t off = first;
    for (int64_t t = 0; t < T; ++t, off += stride) {
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
    if (gso != nullptr) {
#pragma unroll
      for (int i = 0; i < N; ++i) gdec += Q[i] * gso[x * N + i];
    }
    gdecay[bh * N + x] = gdec;
    gu[bh * N + x] = guj;
  } else if (role == 1) {
    float dS[N];
#pragma unroll
    for (int i = 0; i < N; ++i) dS[i] = gso == nullptr ? 0.f : gso[x * N + i];
    int64_t off = first + (T - 1) * stride;
    for (int64_t t = T - 1; t >= 0; --t, off -= stride) {
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
#pragma unroll
    for (int i = 0; i < N; ++i) g_s_in[bh * N * N + x * N + i] = dS[i];
  } else {
    float dS[N];  // column x: dS[j] = dS[j][x]
#pragma unroll
    for (int j = 0; j < N; ++j) dS[j] = gso == nullptr ? 0.f : gso[j * N + x];
    int64_t off = first + (T - 1) * stride;
    for (int64_t t = T - 1; t >= 0; --t, off -= stride) {
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

std::tuple<at::Tensor, at::Tensor> wkv5_fwd_cuda(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& w, const at::Tensor& u, const at::Tensor& s_in) {
  wkv5_check_inputs("wkv5_fwd", r, k, v, w, u, s_in, at::Tensor(), at::Tensor());
  TORCH_CHECK(r.is_cuda(), "wkv5_fwd: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), sc = s_in.contiguous();
  const at::Tensor decay = wkv5_decay(w), uf = u.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({B, T, H, N}, r.options());
  at::Tensor s_out = at::empty({B, H, N, N}, s_in.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(r.scalar_type(), "wkv5_fwd_cuda", WKV5_CUDA_DTYPES([&] {
    WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
      wkv5_fwd_kernel<scalar_t, kN><<<dim3(static_cast<unsigned>(B * H)), dim3(kN), 0, stream>>>(
          rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), decay.data_ptr<float>(),
          uf.data_ptr<float>(), sc.data_ptr<float>(), s_out.data_ptr<float>(), y.data_ptr<scalar_t>(), T, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }));
  return {y, s_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv5_bwd_cuda(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
    const at::Tensor& s_in, const at::Tensor& gy, const std::optional<at::Tensor>& g_s_out) {
  const at::Tensor gso = g_s_out.has_value() ? *g_s_out : at::Tensor();
  wkv5_check_inputs("wkv5_bwd", r, k, v, w, u, s_in, gy, gso);
  TORCH_CHECK(r.is_cuda(), "wkv5_bwd: the CUDA kernel needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), sc = s_in.contiguous();
  const at::Tensor gyc = gy.to(r.scalar_type()).contiguous();
  const at::Tensor gsoc = gso.defined() ? gso.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor decay = wkv5_decay(w), uf = u.to(at::kFloat).contiguous();
  at::Tensor gr = at::empty({B, T, H, N}, r.options()), gk = at::empty({B, T, H, N}, r.options());
  at::Tensor gv = at::empty({B, T, H, N}, r.options());
  const auto f32 = s_in.options().dtype(at::kFloat);
  at::Tensor gdecay = at::empty({B, H, N}, f32), gu_part = at::empty({B, H, N}, f32);
  at::Tensor g_s_in = at::empty({B, H, N, N}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(r.scalar_type(), "wkv5_bwd_cuda", WKV5_CUDA_DTYPES([&] {
    WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
      wkv5_bwd_kernel<scalar_t, kN><<<dim3(static_cast<unsigned>(B * H), 3), dim3(kN), 0, stream>>>(
          rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), decay.data_ptr<float>(),
          uf.data_ptr<float>(), sc.data_ptr<float>(), gyc.data_ptr<scalar_t>(),
          gsoc.defined() ? gsoc.data_ptr<float>() : nullptr, gr.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
          gv.data_ptr<scalar_t>(), gdecay.data_ptr<float>(), gu_part.data_ptr<float>(), g_s_in.data_ptr<float>(), T,
          H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }));
  return {gr, gk, gv, wkv5_gw_from_gdecay(gdecay, w),
          gu_part.sum(0).to(u.scalar_type()), g_s_in};
}

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_IMPL(rwkvctl, CUDA, m) {
  m.impl("wkv5_fwd", &rwkvctl::wkv5_fwd_cuda);
  m.impl("wkv5_bwd", &rwkvctl::wkv5_bwd_cuda);
}
