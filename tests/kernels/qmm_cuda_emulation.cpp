// Runs the packed-matmul CUDA kernel of csrc/cuda/qmm_kernels.cuh on the CPU (cuda_emulation.h), so its
// indexing, word layout, group scaling and block reduction are tested on machines without a GPU
// (test_qmm_cuda_emulated.py). The host side mirrors group_affine_mv_cuda in csrc/cuda/qmm_cuda.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cuda_emulation.h"
#include "cuda/qmm_kernels.cuh"

namespace {

at::Tensor group_affine_mv_emulated(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                    const at::Tensor& minimum, int64_t bits, int64_t group) {
  namespace q = rwkvctl::qmm_cuda;
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= q::kMaxRows && (bits == 4 || bits == 8));
  const int64_t n = x.size(0), in = x.size(1), out = qweight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), qc = qweight.contiguous();
  const at::Tensor sc = scale.to(at::kHalf).contiguous(), mc = minimum.to(at::kHalf).contiguous();
  at::Tensor y = at::empty({n, out}, xf.options());
  const auto* s = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const auto* m = reinterpret_cast<const uint16_t*>(mc.data_ptr<at::Half>());
  emu_launch(static_cast<unsigned>(out), 1, 1, q::kThreads, [&] {
    if (bits == 4) {
      q::group_affine_mv_kernel<4>(xf.data_ptr<float>(), qc.data_ptr<uint8_t>(), s, m, y.data_ptr<float>(), n, in,
                                   out, group);
    } else {
      q::group_affine_mv_kernel<8>(xf.data_ptr<float>(), qc.data_ptr<uint8_t>(), s, m, y.data_ptr<float>(), n, in,
                                   out, group);
    }
  });
  return y;
}

float half_bits(int64_t bits) { return rwkvctl::qmm_cuda::half_bits_to_float(static_cast<uint16_t>(bits)); }

double half_bits_op(int64_t bits) { return half_bits(bits); }

}  // namespace

TORCH_LIBRARY(rwkvctl_qmm_cuda_emulation, m) {
  m.def("group_affine_mv(Tensor x, Tensor qweight, Tensor scale, Tensor min, int bits, int group) -> Tensor",
        &group_affine_mv_emulated);
  m.def("half_bits_to_float(int bits) -> float", &half_bits_op);
}
