// Runs the CUDA kernels of csrc/cuda/wkv5_kernels.cuh on the CPU (cuda_emulation.h), so their indexing, thread
// roles and math are tested on machines without a GPU (test_wkv5_cuda_emulated.py). The host side mirrors
// wkv5_fwd_cuda / wkv5_bwd_cuda in csrc/cuda/wkv5_cuda.cu.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "static_switch.h"

#include "cuda_emulation.h"
#include "cuda/wkv5_kernels.cuh"

namespace {

at::Tensor decay_of(const at::Tensor& w) { return at::exp(-at::exp(w.to(at::kFloat))).contiguous(); }

// The chunk length the CUDA host code would pick: `chunk` if positive, else the automatic one for `sms` SMs.
int64_t pick_chunk(int64_t chunk, int64_t batch_heads, int64_t T, int64_t sms) {
  return chunk > 0 ? chunk : rwkvctl::wkv5_cuda::wkv5_chunk_length(batch_heads, T, 8 * sms, 64);
}

// chunk <= 0: the automatic choice for a GPU with `sms` multiprocessors (as wkv5_fwd_cuda does).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& w, const at::Tensor& u, const at::Tensor& s_in,
                                            int64_t chunk, int64_t sms) {
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), sc = s_in.contiguous();
  const at::Tensor decay = decay_of(w), uf = u.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({B, T, H, N}, r.options());
  at::Tensor s_out = at::empty({B, H, N, N}, s_in.options());
  chunk = pick_chunk(chunk, B * H, T, sms);
  const int64_t n_chunks = T > 0 ? (T + chunk - 1) / chunk : 1;
  at::Tensor ws = at::empty({B * H, n_chunks, N, N}, s_out.options());
  const auto bh = static_cast<unsigned>(B * H);
  const auto nc = static_cast<unsigned>(n_chunks);
  WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
    const scalar_t *rp = rc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    const float *dp = decay.data_ptr<float>(), *up = uf.data_ptr<float>();
    if (n_chunks == 1) {
      emu_launch(bh, 1, 1, kN, [&] {
        rwkvctl::wkv5_cuda::wkv5_fwd_kernel<scalar_t, kN>(rp, kp, vp, dp, up, sc.data_ptr<float>(),
                                                         s_out.data_ptr<float>(), y.data_ptr<scalar_t>(), T, H,
                                                         chunk);
      });
      return;
    }
    emu_launch(bh, nc, 1, kN, [&] {
      rwkvctl::wkv5_cuda::wkv5_chunk_state_kernel<scalar_t, kN>(kp, vp, dp, ws.data_ptr<float>(), T, H, chunk);
    });
    emu_launch(bh, 1, 1, kN, [&] {
      rwkvctl::wkv5_cuda::wkv5_chunk_scan_kernel<kN>(dp, sc.data_ptr<float>(), ws.data_ptr<float>(),
                                                     s_out.data_ptr<float>(), T, H, chunk);
    });
    emu_launch(bh, nc, 1, kN, [&] {
      rwkvctl::wkv5_cuda::wkv5_fwd_kernel<scalar_t, kN>(rp, kp, vp, dp, up, ws.data_ptr<float>(), nullptr,
                                                       y.data_ptr<scalar_t>(), T, H, chunk);
    });
  });
  return {y, s_out};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
    const at::Tensor& s_in, const at::Tensor& gy, const std::optional<at::Tensor>& g_s_out, int64_t chunk,
    int64_t sms) {
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::Tensor rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), sc = s_in.contiguous();
  const at::Tensor gyc = gy.to(r.scalar_type()).contiguous();
  const at::Tensor gsoc = g_s_out.has_value() ? g_s_out->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor decay = decay_of(w), uf = u.to(at::kFloat).contiguous();
  at::Tensor gr = at::empty({B, T, H, N}, r.options()), gk = at::empty({B, T, H, N}, r.options());
  at::Tensor gv = at::empty({B, T, H, N}, r.options());
  const auto f32 = s_in.options().dtype(at::kFloat);
  chunk = pick_chunk(chunk, B * H, T, sms);
  const int64_t n_chunks = T > 0 ? (T + chunk - 1) / chunk : 1;
  at::Tensor gdecay = at::empty({B, H, n_chunks, N}, f32), gu_part = at::empty({B, H, n_chunks, N}, f32);
  at::Tensor g_s_in = at::empty({B, H, N, N}, f32);
  at::Tensor ws = at::empty({3, B * H, n_chunks, N, N}, f32);
  const auto bh = static_cast<unsigned>(B * H), nc = static_cast<unsigned>(n_chunks);
  WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
    const scalar_t *rp = rc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    const scalar_t* gyp = gyc.data_ptr<scalar_t>();
    const float *dp = decay.data_ptr<float>(), *sp = sc.data_ptr<float>();
    const float* gsop = gsoc.defined() ? gsoc.data_ptr<float>() : nullptr;
    const float *s_enter = sp, *q_enter = nullptr, *d_end = gsop;
    if (n_chunks > 1) {
      float *ws_s = ws[0].data_ptr<float>(), *ws_q = ws[1].data_ptr<float>(), *ws_d = ws[2].data_ptr<float>();
      emu_launch(bh, nc, 2, kN, [&] {
        rwkvctl::wkv5_cuda::wkv5_bwd_chunk_local_kernel<scalar_t, kN>(rp, kp, vp, gyp, dp, ws_s, ws_q, ws_d, T, H,
                                                                     chunk);
      });
      emu_launch(bh, 2, 1, kN, [&] {
        rwkvctl::wkv5_cuda::wkv5_bwd_chunk_scan_kernel<kN>(dp, sp, gsop, ws_s, ws_q, ws_d, T, H, chunk);
      });
      s_enter = ws_s;
      q_enter = ws_q;
      d_end = ws_d;
    }
    emu_launch(bh, nc, 3, kN, [&] {
      rwkvctl::wkv5_cuda::wkv5_bwd_kernel<scalar_t, kN>(
          rp, kp, vp, dp, uf.data_ptr<float>(), s_enter, q_enter, d_end, gyp, gsop, gr.data_ptr<scalar_t>(),
          gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(), gdecay.data_ptr<float>(), gu_part.data_ptr<float>(),
          g_s_in.data_ptr<float>(), T, H, chunk);
    });
  });
  const at::Tensor wf = w.to(at::kFloat);
  at::Tensor gw = (gdecay.sum(2).sum(0) * (-at::exp(wf)) * decay).to(w.scalar_type());
  return {gr, gk, gv, gw, gu_part.sum(2).sum(0).to(u.scalar_type()), g_s_in};
}

std::tuple<at::Tensor, at::Tensor> emu_fwd(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& w, const at::Tensor& u, const at::Tensor& s_in,
                                           int64_t chunk, int64_t sms) {
  if (r.scalar_type() == at::kBFloat16) return fwd_impl<c10::BFloat16>(r, k, v, w, u, s_in, chunk, sms);
  TORCH_CHECK(r.scalar_type() == at::kFloat, "emulation: float32 or bfloat16 inputs");
  return fwd_impl<float>(r, k, v, w, u, s_in, chunk, sms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_bwd(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
    const at::Tensor& s_in, const at::Tensor& gy, const std::optional<at::Tensor>& g_s_out, int64_t chunk,
    int64_t sms) {
  if (r.scalar_type() == at::kBFloat16) return bwd_impl<c10::BFloat16>(r, k, v, w, u, s_in, gy, g_s_out, chunk, sms);
  TORCH_CHECK(r.scalar_type() == at::kFloat, "emulation: float32 or bfloat16 inputs");
  return bwd_impl<float>(r, k, v, w, u, s_in, gy, g_s_out, chunk, sms);
}

}  // namespace

TORCH_LIBRARY(rwkvctl_cuda_emulation, m) {
  m.def(
      "wkv5_fwd(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s_in, int chunk, int sms)"
      " -> (Tensor, Tensor)");
  m.def(
      "wkv5_bwd(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s_in, Tensor gy, Tensor? g_s_out,"
      " int chunk, int sms) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkvctl_cuda_emulation, CPU, m) {
  m.impl("wkv5_fwd", &emu_fwd);
  m.impl("wkv5_bwd", &emu_bwd);
}
