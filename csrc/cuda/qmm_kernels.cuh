// Packed group-affine matmul for decode rows on CUDA (device code only), included by qmm_cuda.cu. Kept free of
// host and torch-CUDA APIs so the CPU emulation test (tests/kernels/qmm_cuda_emulation.cpp) compiles the same code
// as plain C++, every "thread" of a block a std::thread, __syncthreads() a barrier.
//
// y[r, o] = sum_k x[r, k] * (code(o, k) * scale[o, k / group] + min[o, k / group]) for the n <= kMaxRows rows of x,
// the weight in its stored form (rwkvctl/quant/groupwise.py), never expanded:
//   qweight (out, in * BITS / 8) uint8, row-major; 4 bits: two codes per byte, the lower input in the low nibble
//   scale, min (out, in / group) fp16 bits
// One block per output row, kThreads threads reading the row as 32-bit words (coalesced): a word holds 32 / BITS
// consecutive inputs, all in one group (group is a multiple of 32 / BITS), so each word is one fp32 dot product of
// codes with x and one sum of x, scaled by its group's scale and min. Then a tree sum over the block in shared
// memory. The CPU's packed kernel (csrc/qmm_cpu.cpp) rounds activations to int16 first; here x stays fp32.
#pragma once

#include <cstdint>
#include <cstring>

namespace rwkvctl {
namespace qmm_cuda {

constexpr int kThreads = 128;
constexpr int kMaxRows = 16;

// IEEE half bits -> float, in plain arithmetic (no cuda_fp16.h, so the emulation compiles it too)
__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // normal: rebias 15 -> 127
  } else {
    // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

template <int BITS>
__global__ void __launch_bounds__(kThreads)
    group_affine_mv_kernel(const float* __restrict__ x, const uint8_t* __restrict__ qweight,
                           const uint16_t* __restrict__ scale, const uint16_t* __restrict__ minimum,
                           float* __restrict__ y, int64_t n, int64_t in, int64_t out, int64_t group) {
  constexpr int kPerWord = 32 / BITS;  // inputs per 32-bit word of codes
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  __shared__ float partial[kMaxRows][kThreads];
  const int64_t o = blockIdx.x;
  const int t = threadIdx.x;
  const int64_t words = in / kPerWord, groups = in / group;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(qweight + o * (in * BITS / 8));
  float acc[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.f;
  for (int64_t w = t; w < words; w += kThreads) {
    const uint32_t codes = row[w];
    const int64_t k = w * kPerWord, g = k / group;
    const float s = half_bits_to_float(scale[o * groups + g]), m = half_bits_to_float(minimum[o * groups + g]);
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= n) break;
      const float* xr = x + r * in + k;
      float dot = 0.f, sum = 0.f;
#pragma unroll
      for (int e = 0; e < kPerWord; ++e) {
        const float xv = xr[e];
        dot += static_cast<float>((codes >> (BITS * e)) & kMask) * xv;
        sum += xv;
      }
      acc[r] += dot * s + sum * m;
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) partial[r][t] = acc[r];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      for (int r = 0; r < n; ++r) partial[r][t] += partial[r][t + stride];
    }
    __syncthreads();
  }
  if (t < n) y[t * out + o] = partial[t][0];
}

}  // namespace qmm_cuda
}  // namespace rwkvctl
