// CUDA implementation of rwkvctl::wkv5_fwd / wkv5_bwd.
//
// The kernels (a sequential scan per (batch, head); not yet the chunked form) are in wkv5_kernels.cuh. Unlike
// the RWKV-LM kernel this takes an initial state, returns the final state, has the full backward including
// g_s_in and an incoming g_s_out, supports any batch/length (64-bit offsets), fp32/fp16/bf16 inputs and head
// sizes 16/32/64/128 chosen at run time, and launches on the current stream with error checks.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>

#include "../static_switch.h"
#include "../wkv5.h"
#include "wkv5_kernels.cuh"

// fp32, fp16 and bf16 inputs (fp64 would only be computed in fp32 anyway: use the reference for it).
#define WKV5_CUDA_DTYPES(...)                              \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)     \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)      \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

namespace rwkvctl {
namespace {

// Steps per chunk: enough chunks for ~8 blocks per SM (see wkv5_chunk_length), chunks of >= 64 steps.
// RWKVCTL_CUDA_CHUNK=<steps> forces a length (benchmarks, tests); 0 or unset = automatic.
int64_t chunk_length(int64_t batch_heads, int64_t T, int device) {
  if (const char* env = std::getenv("RWKVCTL_CUDA_CHUNK")) {
    const long long forced = std::atoll(env);
    if (forced > 0) return forced;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return wkv5_cuda::wkv5_chunk_length(batch_heads, T, 8 * static_cast<int64_t>(sms), 64);
}

int64_t count_chunks(int64_t T, int64_t chunk) {
  const int64_t n_chunks = T > 0 ? (T + chunk - 1) / chunk : 1;
  TORCH_CHECK(n_chunks <= 65535, "wkv5: ", n_chunks, " chunks of ", chunk, " steps exceed the grid limit; raise ",
              "RWKVCTL_CUDA_CHUNK");
  return n_chunks;
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
  const int64_t chunk = chunk_length(B * H, T, r.get_device());
  const int64_t n_chunks = count_chunks(T, chunk);
  at::Tensor ws = n_chunks > 1 ? at::empty({B * H, n_chunks, N, N}, s_out.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto bh = static_cast<unsigned>(B * H);
  AT_DISPATCH_SWITCH(r.scalar_type(), "wkv5_fwd_cuda", WKV5_CUDA_DTYPES([&] {
    WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
      const scalar_t *rp = rc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
      const float *dp = decay.data_ptr<float>(), *up = uf.data_ptr<float>();
      if (n_chunks == 1) {
        wkv5_cuda::wkv5_fwd_kernel<scalar_t, kN><<<dim3(bh, 1), dim3(kN), 0, stream>>>(
            rp, kp, vp, dp, up, sc.data_ptr<float>(), s_out.data_ptr<float>(), y.data_ptr<scalar_t>(), T, H, chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const auto nc = static_cast<unsigned>(n_chunks);
      wkv5_cuda::wkv5_chunk_state_kernel<scalar_t, kN><<<dim3(bh, nc), dim3(kN), 0, stream>>>(
          kp, vp, dp, ws.data_ptr<float>(), T, H, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      wkv5_cuda::wkv5_chunk_scan_kernel<kN><<<dim3(bh), dim3(kN), 0, stream>>>(
          dp, sc.data_ptr<float>(), ws.data_ptr<float>(), s_out.data_ptr<float>(), T, H, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      wkv5_cuda::wkv5_fwd_kernel<scalar_t, kN><<<dim3(bh, nc), dim3(kN), 0, stream>>>(
          rp, kp, vp, dp, up, ws.data_ptr<float>(), nullptr, y.data_ptr<scalar_t>(), T, H, chunk);
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
  const int64_t chunk = chunk_length(B * H, T, r.get_device());
  const int64_t n_chunks = count_chunks(T, chunk);
  at::Tensor gdecay = at::empty({B, H, n_chunks, N}, f32), gu_part = at::empty({B, H, n_chunks, N}, f32);
  at::Tensor g_s_in = at::empty({B, H, N, N}, f32);
  at::Tensor ws = n_chunks > 1 ? at::empty({3, B * H, n_chunks, N, N}, f32) : at::Tensor();  // S, Q, dS per chunk
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto bh = static_cast<unsigned>(B * H), nc = static_cast<unsigned>(n_chunks);
  AT_DISPATCH_SWITCH(r.scalar_type(), "wkv5_bwd_cuda", WKV5_CUDA_DTYPES([&] {
    WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
      const scalar_t *rp = rc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
      const scalar_t* gyp = gyc.data_ptr<scalar_t>();
      const float *dp = decay.data_ptr<float>(), *sp = sc.data_ptr<float>();
      const float* gsop = gsoc.defined() ? gsoc.data_ptr<float>() : nullptr;
      const float *s_enter = sp, *q_enter = nullptr, *d_end = gsop;  // one chunk: straight from the inputs
      if (n_chunks > 1) {
        float *ws_s = ws[0].data_ptr<float>(), *ws_q = ws[1].data_ptr<float>(), *ws_d = ws[2].data_ptr<float>();
        wkv5_cuda::wkv5_bwd_chunk_local_kernel<scalar_t, kN><<<dim3(bh, nc, 2), dim3(kN), 0, stream>>>(
            rp, kp, vp, gyp, dp, ws_s, ws_q, ws_d, T, H, chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        wkv5_cuda::wkv5_bwd_chunk_scan_kernel<kN><<<dim3(bh, 2), dim3(kN), 0, stream>>>(
            dp, sp, gsop, ws_s, ws_q, ws_d, T, H, chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        s_enter = ws_s;
        q_enter = ws_q;
        d_end = ws_d;
      }
      wkv5_cuda::wkv5_bwd_kernel<scalar_t, kN><<<dim3(bh, nc, 3), dim3(kN), 0, stream>>>(
          rp, kp, vp, dp, uf.data_ptr<float>(), s_enter, q_enter, d_end, gyp, gsop, gr.data_ptr<scalar_t>(),
          gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), gdecay.data_ptr<float>(), gu_part.data_ptr<float>(),
          g_s_in.data_ptr<float>(), T, H, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }));
  gdecay = gdecay.sum(2);  // (B, H, n_chunks, N) -> (B, H, N)
  gu_part = gu_part.sum(2);
  return {gr, gk, gv, wkv5_gw_from_gdecay(gdecay, w),
          gu_part.sum(0).to(u.scalar_type()), g_s_in};
}

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_IMPL(rwkvctl, CUDA, m) {
  m.impl("wkv5_fwd", &rwkvctl::wkv5_fwd_cuda);
  m.impl("wkv5_bwd", &rwkvctl::wkv5_bwd_cuda);
}
