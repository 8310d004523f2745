// Schema of the rwkvctl WKV5 ops and the input checks shared by the CPU and CUDA implementations.
// The CPU kernels live in wkv5_cpu.cpp, the CUDA ones in cuda/wkv5_cuda.cu; autograd and the fake
// (meta) implementation are registered from Python (rwkvctl/kernels/ops.py).
#include <torch/library.h>

#include "wkv5.h"

namespace rwkvctl {

bool wkv5_head_size_supported(int64_t n) { return n == 16 || n == 32 || n == 64 || n == 128; }

void wkv5_check_inputs(const char* op, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& w, const at::Tensor& u, const at::Tensor& s_in, const at::Tensor& gy,
                       const at::Tensor& g_s_out) {
  TORCH_CHECK(r.dim() == 4, op, ": r must be (B, T, H, N), got ", r.sizes());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(k.sizes() == r.sizes() && v.sizes() == r.sizes(), op, ": r, k, v must have the same shape, got ",
              r.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(r.scalar_type() == k.scalar_type() && r.scalar_type() == v.scalar_type(), op,
              ": r, k, v must have the same dtype, got ", r.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(at::isFloatingType(r.scalar_type()), op, ": r, k, v must be floating point, got ", r.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == H && w.size(1) == N, op, ": w (time_decay) must be (H, N) = (", H, ", ",
              N, "), got ", w.sizes());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == H && u.size(1) == N, op, ": u (time_faaaa) must be (H, N) = (", H, ", ",
              N, "), got ", u.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()) && at::isFloatingType(u.scalar_type()), op,
              ": w and u must be floating point");
  TORCH_CHECK(s_in.dim() == 4 && s_in.size(0) == B && s_in.size(1) == H && s_in.size(2) == N && s_in.size(3) == N,
              op, ": s_in must be (B, H, N, N) = (", B, ", ", H, ", ", N, ", ", N, "), got ", s_in.sizes());
  TORCH_CHECK(s_in.scalar_type() == at::kFloat, op, ": s_in must be float32, got ", s_in.scalar_type());
  TORCH_CHECK(wkv5_head_size_supported(N), op, ": head size N=", N, " is not compiled; use 16, 32, 64 or 128");
  TORCH_CHECK(T >= 0 && B > 0 && H > 0, op, ": empty batch or head dimension");
  const auto device = r.device();
  for (const at::Tensor* t : {&k, &v, &w, &u, &s_in}) {
    TORCH_CHECK(t->device() == device, op, ": all inputs must be on ", device, ", found one on ", t->device());
  }
  if (gy.defined()) {
    TORCH_CHECK(gy.sizes() == r.sizes(), op, ": gy must be (B, T, H, N) like r, got ", gy.sizes());
    TORCH_CHECK(gy.device() == device, op, ": gy must be on ", device);
    TORCH_CHECK(at::isFloatingType(gy.scalar_type()), op, ": gy must be floating point, got ", gy.scalar_type());
  }
  if (g_s_out.defined()) {
    TORCH_CHECK(g_s_out.sizes() == s_in.sizes(), op, ": g_s_out must be (B, H, N, N), got ", g_s_out.sizes());
    TORCH_CHECK(g_s_out.device() == device, op, ": g_s_out must be on ", device);
    TORCH_CHECK(at::isFloatingType(g_s_out.scalar_type()), op, ": g_s_out must be floating point, got ",
                g_s_out.scalar_type());
  }
}

at::Tensor wkv5_decay(const at::Tensor& w) { return at::exp(-at::exp(w.to(at::kFloat))).contiguous(); }

at::Tensor wkv5_gw_from_gdecay(const at::Tensor& gdecay, const at::Tensor& w) {
  const at::Tensor wf = w.to(at::kFloat);
  // decay = exp(-exp(w))  =>  d decay / dw = -exp(w) * decay = -exp(w - exp(w)), which stays finite (0)
  // where exp(w) overflows
  return (gdecay.sum(0) * (-at::exp(wf - at::exp(wf)))).to(w.scalar_type());
}

}  // namespace rwkvctl

TORCH_LIBRARY(rwkvctl, m) {
  m.def("wkv5_fwd(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s_in) -> (Tensor, Tensor)");
  m.def(
      "wkv5_bwd(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s_in, Tensor gy, Tensor? g_s_out)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
