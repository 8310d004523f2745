// CUDA implementation of rwkvctl::group_affine_mv (schema in ../qmm_cpu.cpp): a packed 4/8-bit group-affine weight
// in its stored form times up to 16 fp32 rows, the decode step's matmul of a quantized model on the GPU
// (rwkvctl/quant/linear.py). The kernel is in qmm_kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "qmm_kernels.cuh"

namespace rwkvctl {
namespace {

at::Tensor group_affine_mv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                const at::Tensor& minimum, int64_t bits, int64_t group) {
  const char* op = "group_affine_mv";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && at::isFloatingType(x.scalar_type()), op,
              ": x must be (n, in) float on a CUDA device, got ", x.sizes(), " ", x.scalar_type());
  const int64_t n = x.size(0), in = x.size(1), out = qweight.size(0);
  TORCH_CHECK(n <= qmm_cuda::kMaxRows, op, ": at most ", qmm_cuda::kMaxRows, " rows, got ", n);
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group > 0 && group % (32 / bits) == 0 && in % group == 0, op, ": group ", group,
              " must be a multiple of ", 32 / bits, " dividing rows of ", in);
  TORCH_CHECK(qweight.device() == x.device() && qweight.dim() == 2 && qweight.scalar_type() == at::kByte &&
                  qweight.size(1) * 8 == in * bits && qweight.is_contiguous(),
              op, ": qweight must be contiguous (out, ", in * bits / 8, ") uint8 on ", x.device(), ", got ",
              qweight.sizes(), " ", qweight.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 4 == 0, op,
              ": qweight must start on a 4-byte boundary (the kernel reads 32-bit words); pass a copy");
  for (const at::Tensor* t : {&scale, &minimum}) {
    TORCH_CHECK(t->device() == x.device() && t->dim() == 2 && t->size(0) == out && t->size(1) == in / group &&
                    t->scalar_type() == at::kHalf && t->is_contiguous(),
                op, ": scale and min must be contiguous (", out, ", ", in / group, ") float16, got ", t->sizes(),
                " ", t->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({n, out}, xf.options());
  if (n == 0 || out == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* m = reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>());
  const auto blocks = static_cast<unsigned>(out);
  if (bits == 4) {
    qmm_cuda::group_affine_mv_kernel<4><<<blocks, qmm_cuda::kThreads, 0, stream>>>(
        xf.data_ptr<float>(), qweight.data_ptr<uint8_t>(), s, m, y.data_ptr<float>(), n, in, out, group);
  } else {
    qmm_cuda::group_affine_mv_kernel<8><<<blocks, qmm_cuda::kThreads, 0, stream>>>(
        xf.data_ptr<float>(), qweight.data_ptr<uint8_t>(), s, m, y.data_ptr<float>(), n, in, out, group);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_IMPL(rwkvctl, CUDA, m) { m.impl("group_affine_mv", &rwkvctl::group_affine_mv_cuda); }
