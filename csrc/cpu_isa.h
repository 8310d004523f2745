// The instruction-set level a CPU kernel may use, shared by every CPU op of the extension.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RWKVCTL_X86_VARIANTS 1
// target("avx512bf16") and __builtin_cpu_supports("avx512bf16"): GCC 10+, clang 9+; older compilers build without
// the bf16 dot-product kernel
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define RWKVCTL_HAVE_AVX512BF16 1
#endif
#endif

namespace rwkvctl {

// 0 = baseline, 1 = AVX2+FMA(+F16C), 2 = AVX-512 (F+VL). RWKVCTL_CPU_ISA=default|avx2|avx512 caps it (tests,
// debugging); avx512bw is avx512 without the VNNI instructions (see cpu_isa_allows_vnni).
inline int cpu_isa_level() {
  int hw = 0;
#ifdef RWKVCTL_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) hw = 1;
  if (hw == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) hw = 2;
#endif
  const char* env = std::getenv("RWKVCTL_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  if (std::strcmp(env, "default") == 0) return 0;
  if (std::strcmp(env, "avx2") == 0) return hw < 1 ? hw : 1;
  if (std::strcmp(env, "avx512") == 0 || std::strcmp(env, "avx512bw") == 0) return hw;
  TORCH_CHECK(false, "RWKVCTL_CPU_ISA must be default, avx2, avx512 or avx512bw, got '", env, "'");
}

// False when RWKVCTL_CPU_ISA=avx512bw: kernels with a VNNI variant take their plain AVX-512BW one (so that variant
// is tested on CPUs that have VNNI).
inline bool cpu_isa_allows_vnni() {
  const char* env = std::getenv("RWKVCTL_CPU_ISA");
  return env == nullptr || std::strcmp(env, "avx512bw") != 0;
}

// Whether kernels may use the AVX512-BF16 dot product (`vdpbf16ps`): the CPU has it and RWKVCTL_CPU_ISA is unset
// or avx512 (avx512bw means plain AVX-512BW, as for VNNI).
inline bool cpu_isa_allows_bf16_dot() {
#ifdef RWKVCTL_HAVE_AVX512BF16
  static const bool hw = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  }();
  return hw && cpu_isa_level() >= 2 && cpu_isa_allows_vnni();
#else
  return false;
#endif
}

// How the AVX512-BF16 gemv takes its fp32 input: 1 part, x rounded to bf16 (RWKVCTL_BF16_INPUT unset or `round`:
// what torch's bf16 Linear does to its input), or 2 parts, hi = bf16(x) and lo = bf16(x - hi) (`split`: 16
// significant bits of x, ~8% slower bf16 decode). See gemv_seq_dpbf16 in rnn_step_avx512.h.
inline int bf16_input_parts() {
  const char* env = std::getenv("RWKVCTL_BF16_INPUT");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "round") == 0) return 1;
  if (std::strcmp(env, "split") == 0) return 2;
  TORCH_CHECK(false, "RWKVCTL_BF16_INPUT must be round or split, got '", env, "'");
}

}  // namespace rwkvctl
