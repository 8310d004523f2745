// WKV5 (RWKV v5.2 linear attention) as torch ops: shared declarations for the CPU and CUDA parts.
//
// Conventions (identical to rwkvctl/kernels/reference.py):
//   r, k, v : (B, T, H, N) any float dtype, any strides      y     : (B, T, H, N) dtype of r
//   w       : (H, N) raw time_decay, decay = exp(-exp(w))    s_in  : (B, H, N, N) fp32 [key j, value i]
//   u       : (H, N) time_faaaa (bonus of the current token)  s_out : (B, H, N, N) fp32
//   y_t[i]    = sum_j r_t[j] (u_j k_t[j] v_t[i] + S_{t-1}[j, i])
//   S_t[j, i] = decay_j S_{t-1}[j, i] + k_t[j] v_t[i]
//
// Backward (all implementations use the same three scans, none needs stored states):
//   forward scan over t, row j of S and of Q = dS/d(decay_j) (forward-mode: Q_t = S_{t-1} + decay Q_{t-1}):
//       gr_t[j] = S_{t-1}[j,:].gy_t + u_j k_t[j] (v_t.gy_t)
//       gdecay_j = sum_t r_t[j] Q_{t-1}[j,:].gy_t + Q_{T-1}[j,:].g_s_out[j,:]
//       gu_j     = sum_t r_t[j] k_t[j] (v_t.gy_t)
//   reverse scan over t carrying dS_t (gradient w.r.t. S_t, starting from g_s_out):
//       gk_t[j] = dS_t[j,:].v_t + r_t[j] u_j (v_t.gy_t)
//       gv_t[i] = dS_t[:,i].k_t + (sum_j r_t[j] u_j k_t[j]) gy_t[i]
//       dS_{t-1} = decay dS_t + r_t gy_t^T ;  g_s_in = dS_{-1}
//   gw = gdecay * d(decay)/dw = gdecay * (-exp(w)) * decay   (chain rule to the raw time_decay)
#pragma once

#include <torch/types.h>

#include <tuple>

namespace rwkvctl {

// Validates shapes/dtypes/devices of a wkv5_fwd / wkv5_bwd call; throws a one-line c10::Error otherwise.
// gy and g_s_out may be undefined (forward call / no state gradient).
void wkv5_check_inputs(const char* op, const at::Tensor& r, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& w, const at::Tensor& u, const at::Tensor& s_in, const at::Tensor& gy,
                       const at::Tensor& g_s_out);

// The per-step decay exp(-exp(w)) as a contiguous fp32 (H, N) tensor on w's device.
at::Tensor wkv5_decay(const at::Tensor& w);

// gdecay (B, H, N) fp32 partial sums -> gradient w.r.t. the raw time_decay, in w's dtype.
at::Tensor wkv5_gw_from_gdecay(const at::Tensor& gdecay, const at::Tensor& w);

// Head sizes with a compiled specialisation (CPU and CUDA): 16, 32, 64, 128.
bool wkv5_head_size_supported(int64_t n);

}  // namespace rwkvctl
