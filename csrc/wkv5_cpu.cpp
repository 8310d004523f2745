// CPU implementation of rwkvctl::wkv5_fwd / wkv5_bwd: one sequential fp32 scan per (batch, head), the
// (batch, head) pairs spread over threads with at::parallel_for. Inputs of any float dtype and any strides
// are read as contiguous fp32 rows (converted per slice by the thread that owns it); outputs are written in
// the input dtypes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "static_switch.h"
#include "wkv5.h"

// The same scans compiled for three instruction sets; the best one the CPU supports is picked per call.
namespace rwkvctl::cpu_default {
#include "wkv5_cpu_kernel.h"
}  // namespace rwkvctl::cpu_default

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WKV5_X86_VARIANTS 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace rwkvctl::cpu_avx2 {
#include "wkv5_cpu_kernel.h"
}  // namespace rwkvctl::cpu_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma,prefer-vector-width=512")
#endif
namespace rwkvctl::cpu_avx512 {
#include "wkv5_cpu_kernel.h"
}  // namespace rwkvctl::cpu_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace rwkvctl {
namespace {

#ifdef WKV5_X86_VARIANTS
#define WKV5_PICK(fn, N, level) \
  ((level) >= 2 ? &cpu_avx512::fn<N> : (level) == 1 ? &cpu_avx2::fn<N> : &cpu_default::fn<N>)
#else
#define WKV5_PICK(fn, N, level) (&cpu_default::fn<N>)
#endif

// Forward chunk length: T (one pass per (b, h)) unless there are at least 4 threads per (b, h) pair and T is
// long (chunking costs ~1.5x the work, so it pays only with threads to spare: B=1 prompt ingestion on a
// many-core CPU); then chunks of >= 64 steps, about two per thread. RWKVCTL_CPU_CHUNK=<steps> forces a length.
int64_t cpu_chunk_length(int64_t batch_heads, int64_t T) {
  if (const char* env = std::getenv("RWKVCTL_CPU_CHUNK")) {
    const long long forced = std::atoll(env);
    if (forced > 0) return forced;
  }
  const int64_t threads = at::get_num_threads();
  if (T < 128 || 4 * batch_heads > threads) return T > 0 ? T : 1;
  const int64_t n_chunks = std::min((2 * threads + batch_heads - 1) / batch_heads, T / 64);
  return (T + n_chunks - 1) / n_chunks;
}

at::Tensor contiguous_f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

// fp32 access to a contiguous (B, T, H, N) tensor of any float dtype. An fp32 tensor is used in place; any
// other gets an fp32 twin that each task fills (inputs) or flushes (outputs) for its own rows inside the same
// parallel region as the scans: a whole-tensor .to(float) would be one more parallel region (one more thread
// wake-up, which costs milliseconds on a busy machine) and one more pass over memory.
class F32Rows {
 public:
  explicit F32Rows(at::Tensor x)
      : x_(std::move(x)),
        f32_(x_.scalar_type() == at::kFloat ? x_ : at::empty(x_.sizes(), x_.options().dtype(at::kFloat))) {}
  float* data() const { return f32_.data_ptr<float>(); }
  const at::Tensor& tensor() const { return x_; }
  // Rows [0, rows) of `n` elements, `stride` apart, from element `off`: tensor -> fp32 twin.
  void load(int64_t off, int64_t rows, int64_t stride, int64_t n) const { copy(off, rows, stride, n, true); }
  // The same rows: fp32 twin -> tensor.
  void store(int64_t off, int64_t rows, int64_t stride, int64_t n) const { copy(off, rows, stride, n, false); }

 private:
  void copy(int64_t off, int64_t rows, int64_t stride, int64_t n, bool to_f32) const {
    if (x_.scalar_type() == at::kFloat) return;
    float* f = f32_.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_.scalar_type(), "wkv5_cpu_rows", [&] {
      scalar_t* x = x_.data_ptr<scalar_t>();
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t base = off + t * stride;
        if (to_f32) {
          for (int64_t i = 0; i < n; ++i) f[base + i] = static_cast<float>(x[base + i]);
        } else {
          for (int64_t i = 0; i < n; ++i) x[base + i] = static_cast<scalar_t>(f[base + i]);
        }
      }
    });
  }
  at::Tensor x_, f32_;
};

std::tuple<at::Tensor, at::Tensor> wkv5_fwd_cpu(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& w, const at::Tensor& u, const at::Tensor& s_in) {
  wkv5_check_inputs("wkv5_fwd", r, k, v, w, u, s_in, at::Tensor(), at::Tensor());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const F32Rows rr(r.contiguous()), kk(k.contiguous()), vv(v.contiguous());
  const F32Rows yy(at::empty({B, T, H, N}, r.options()));
  const at::Tensor decay = wkv5_decay(w), uf = contiguous_f32(u);
  at::Tensor s = at::empty({B, H, N, N}, s_in.options().dtype(at::kFloat)).copy_(s_in);  // becomes s_out
  const float *rp = rr.data(), *kp = kk.data(), *vp = vv.data();
  const float *dp = decay.data_ptr<float>(), *up = uf.data_ptr<float>();
  float *sp = s.data_ptr<float>(), *yp = yy.data();
  const int level = cpu_isa_level();
  const int64_t chunk = cpu_chunk_length(B * H, T), n_chunks = T > 0 ? (T + chunk - 1) / chunk : 1;
  WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
    auto fwd = WKV5_PICK(wkv5_fwd_head, kN, level);
    const int64_t stride = H * kN;
    if (n_chunks == 1) {
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / H, h = bh % H;
          const int64_t off = (b * T * H + h) * kN;  // element (b, t=0, h, 0) of a (B, T, H, N) tensor
          for (const F32Rows* x : {&rr, &kk, &vv}) x->load(off, T, stride, kN);
          fwd(rp + off, kp + off, vp + off, dp + h * kN, up + h * kN, sp + bh * kN * kN, yp + off, T, stride);
          yy.store(off, T, stride, kN);
        }
      });
      return;
    }
    // Time-chunked (state passing): every chunk's own state in parallel, a short scan over chunks for the
    // state entering each one, then every chunk's outputs in parallel. Same recurrence, ~1.5x the work.
    auto own_state = WKV5_PICK(wkv5_state_head, kN, level);
    at::Tensor ws = at::zeros({B * H, n_chunks, kN, kN}, s.options());
    float* wp = ws.data_ptr<float>();
    const auto chunk_of = [&](int64_t idx, int64_t& off, int64_t& len) {  // idx = bh * n_chunks + c
      const int64_t bh = idx / n_chunks, c = idx % n_chunks, b = bh / H, h = bh % H;
      off = (b * T * H + h) * kN + c * chunk * stride;
      len = std::min(chunk, T - c * chunk);
    };
    at::parallel_for(0, B * H * n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        int64_t off, len;
        chunk_of(idx, off, len);
        for (const F32Rows* x : {&rr, &kk, &vv}) x->load(off, len, stride, kN);
        own_state(kp + off, vp + off, dp + (idx / n_chunks % H) * kN, wp + idx * kN * kN, len, stride);
      }
    });
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> own(kN * kN);
      for (int64_t bh = begin; bh < end; ++bh) {
        float* S = sp + bh * kN * kN;  // s_in on entry, s_out on exit
        const float* decay_h = dp + (bh % H) * kN;
        for (int64_t c = 0; c < n_chunks; ++c) {
          float* slot = wp + (bh * n_chunks + c) * kN * kN;
          const auto len = static_cast<float>(std::min(chunk, T - c * chunk));
          std::memcpy(own.data(), slot, sizeof(float) * kN * kN);
          std::memcpy(slot, S, sizeof(float) * kN * kN);  // the state entering chunk c
          for (int j = 0; j < kN; ++j) {
            const float wl = std::pow(decay_h[j], len);
            for (int i = 0; i < kN; ++i) S[j * kN + i] = wl * S[j * kN + i] + own[j * kN + i];
          }
        }
      }
    });
    at::parallel_for(0, B * H * n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        int64_t off, len;
        chunk_of(idx, off, len);
        const int64_t h = idx / n_chunks % H;
        fwd(rp + off, kp + off, vp + off, dp + h * kN, up + h * kN, wp + idx * kN * kN, yp + off, len, stride);
        yy.store(off, len, stride, kN);
      }
    });
  });
  return {yy.tensor(), s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv5_bwd_cpu(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w, const at::Tensor& u,
    const at::Tensor& s_in, const at::Tensor& gy, const std::optional<at::Tensor>& g_s_out) {
  const at::Tensor gso = g_s_out.has_value() ? *g_s_out : at::Tensor();
  wkv5_check_inputs("wkv5_bwd", r, k, v, w, u, s_in, gy, gso);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const F32Rows rr(r.contiguous()), kk(k.contiguous()), vv(v.contiguous()), gyy(gy.contiguous());
  const F32Rows grr(at::empty({B, T, H, N}, r.options())), gkk(at::empty({B, T, H, N}, k.options()));
  const F32Rows gvv(at::empty({B, T, H, N}, v.options()));
  const at::Tensor sf = contiguous_f32(s_in), gsof = gso.defined() ? contiguous_f32(gso) : at::Tensor();
  const at::Tensor decay = wkv5_decay(w), uf = contiguous_f32(u);
  const auto f32 = r.options().dtype(at::kFloat);
  at::Tensor gdecay = at::zeros({B, H, N}, f32), gu_part = at::zeros({B, H, N}, f32);
  at::Tensor g_s_in = at::empty({B, H, N, N}, f32);
  const float *rp = rr.data(), *kp = kk.data(), *vp = vv.data(), *gyp = gyy.data(), *sp = sf.data_ptr<float>();
  const float* gsop = gsof.defined() ? gsof.data_ptr<float>() : nullptr;
  const float *dp = decay.data_ptr<float>(), *up = uf.data_ptr<float>();
  float *grp = grr.data(), *gkp = gkk.data(), *gvp = gvv.data();
  float *gdp = gdecay.data_ptr<float>(), *gup = gu_part.data_ptr<float>(), *gsp = g_s_in.data_ptr<float>();
  const int level = cpu_isa_level();
  WKV5_HEAD_SIZE_SWITCH(N, kN, [&] {
    auto fscan = WKV5_PICK(wkv5_bwd_forward_scan, kN, level);
    auto rscan = WKV5_PICK(wkv5_bwd_reverse_scan, kN, level);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> ST(kN * kN), QT(kN * kN), vg(static_cast<size_t>(T));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t off = (b * T * H + h) * kN;
        const int64_t soff = bh * kN * kN;
        for (const F32Rows* x : {&rr, &kk, &vv, &gyy}) x->load(off, T, H * kN, kN);
        for (int i = 0; i < kN; ++i) {  // the forward scan keeps S transposed: ST[i][j] = s_in[j][i]
          for (int j = 0; j < kN; ++j) ST[i * kN + j] = sp[soff + j * kN + i];
        }
        std::fill(QT.begin(), QT.end(), 0.f);
        fscan(rp + off, kp + off, vp + off, dp + h * kN, up + h * kN, gyp + off, gsop ? gsop + soff : nullptr,
              ST.data(), QT.data(), grp + off, gdp + bh * kN, gup + bh * kN, vg.data(), T, H * kN);
        float* dS = gsp + soff;  // carries dS_t backwards, ends as g_s_in
        if (gsop) {
          std::memcpy(dS, gsop + soff, sizeof(float) * kN * kN);
        } else {
          std::fill(dS, dS + kN * kN, 0.f);
        }
        rscan(rp + off, kp + off, vp + off, dp + h * kN, up + h * kN, gyp + off, vg.data(), dS, gkp + off,
              gvp + off, T, H * kN);
        for (const F32Rows* x : {&grr, &gkk, &gvv}) x->store(off, T, H * kN, kN);
      }
    });
  });
  return {grr.tensor(),
          gkk.tensor(),
          gvv.tensor(),
          wkv5_gw_from_gdecay(gdecay, w),
          gu_part.sum(0).to(u.scalar_type()),
          g_s_in};
}

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_IMPL(rwkvctl, CPU, m) {
  m.impl("wkv5_fwd", &rwkvctl::wkv5_fwd_cpu);
  m.impl("wkv5_bwd", &rwkvctl::wkv5_bwd_cpu);
}
