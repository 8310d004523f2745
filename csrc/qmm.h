// The packed-weight matmul of qmm_cpu.cpp on raw pointers, for other ops that run it inside their own loops (the
// whole-layer decode step, rnn_step_cpu.cpp). Layouts as described at the top of qmm_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rwkvctl {

constexpr int64_t kQmmTile = 16;  // output rows per tile

// y (n, ceil(out / 16) * 16) fp32 = x (n, in) fp32 row-major @ W.T, W the group-affine weight in tiles: qtiles
// (tiles, 16 * in * bits / 8), scale and min (tiles, in / group, 16) fp16 bits. Arguments are trusted (checked by
// the callers); padded rows of y hold zeros.
void group_affine_mm_rows(const float* x, int64_t n, int64_t in, const uint8_t* qtiles, const uint16_t* scale,
                          const uint16_t* minimum, int64_t out, int64_t bits, int64_t group, float* y);

// Checks a packed weight for `out` output rows of `in` inputs against what group_affine_mm_rows reads (raises with
// "<op>: <what>: ..." naming the first mismatch): bits 4 or 8, a group dividing the row (a multiple of 4 at 4 bits, of
// 2 at 8 bits, at most 512 at 8 bits so int32 sums cannot overflow), contiguous CPU tiles of the expected shapes.
void check_group_affine(const char* op, const char* what, const at::Tensor& qtiles, const at::Tensor& scale,
                        const at::Tensor& minimum, int64_t out, int64_t in, int64_t bits, int64_t group);

}  // namespace rwkvctl
