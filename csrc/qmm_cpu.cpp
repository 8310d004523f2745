// CPU implementation of rwkvctl::group_affine_mm: x @ W.T with W in group-affine form (rwkvctl/quant/groupwise.py:
// W[o, k] = code[o, k] * scale[o, k / group] + min[o, k / group]), read straight from a tiled copy of the codes made
// once at load time (rwkvctl/kernels/qmm.py `pack`), never expanded.
//
// Tiled layout: output rows in tiles of 16 (the last one padded with zero codes and zero scales).
//   8 bits: per tile, per input pair p: 32 bytes, byte 2j+t = code(row j, input 2p+t)           -> (tiles, 16 * in)
//   4 bits: per tile, per input octet o: 64 bytes, byte 4j+t = code(row j, 8o+t) | code(row j, 8o+4+t) << 4
//                                                                                               -> (tiles, 8 * in)
//   scale, min: (tiles, groups, 16) fp16 bits (int16 storage, so model.to(dtype) leaves them alone)
// 8 bits: 32 bytes widened to 16-bit lanes hold, for 16 output rows, the codes of two neighbouring inputs side by
// side: one `vpmaddwd` / `vpdpwssd` against the two inputs' values (broadcast) gives 16 partial dot products.
// 4 bits: 64 bytes masked to their low (high) nibbles hold, for 16 output rows, the codes of four neighbouring inputs
// as bytes, with no widening: one `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd`) against four broadcast activation bytes
// gives 16 partial dot products of four terms. Activations are int16, so each is split into a signed high byte and
// an unsigned low byte (x = 256 * hi + lo) and the two sums are combined exactly: codes (0..15) fit either operand
// of the u8 x s8 product. Groups of 4-bit weights are whole octets (a multiple of 8 inputs).
//
// Activations: per call each row of x is cut into the weight's groups and each group rounded to int16 with its own
// scale (max |x| / 32767): a relative error under 2^-16 of the group's largest input, far below fp16/bf16 rounding
// (2^-11 / 2^-8), while the products become exact int32 arithmetic. Per group the int32 sums are scaled by
// weight scale * activation scale; min * sum(x) (the exact fp32 sum) adds the offsets.
//
// Instruction sets: AVX-512BW (with VNNI where the CPU has it), AVX2, and a portable loop over the same layout.
// The integer sums are identical in all three; only the fp32 order of the per-group scaling differs.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "qmm.h"

#ifdef RWKVCTL_X86_VARIANTS
#include <immintrin.h>
#endif

namespace rwkvctl {
namespace {

constexpr int kTile = kQmmTile;  // output rows per tile (qmm.h)

struct Prepared {
  int64_t n, in, out, tiles, group, groups, bits;
  const int16_t* xq;    // (n, in) activations as int16
  const int8_t* xhi;    // (n, in) their high bytes (4 bits, x86 kernels)
  const uint8_t* xlo;   // (n, in) their low bytes
  const float* xscale;  // (n, groups)
  const float* xsum;    // (n, groups): exact fp32 sums of x over each group
  const uint8_t* q;     // (tiles, tile_bytes)
  const uint16_t* scale;  // (tiles, groups, 16) fp16 bits
  const uint16_t* minimum;
  float* y;  // (n, tiles * 16)
  int64_t tile_bytes() const { return kTile * in * bits / 8; }
};

inline float half_to_float(uint16_t h) { return float(c10::Half(h, c10::Half::from_bits())); }

// Portable: the same arithmetic one lane at a time. Tiles [t0, t1), all input rows.
void tiles_portable(const Prepared& p, int64_t t0, int64_t t1) {
  const int64_t gbytes = kTile * p.group * p.bits / 8;  // bytes of one group in a tile
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* qt = p.q + t * p.tile_bytes();
    for (int64_t r = 0; r < p.n; ++r) {
      const int16_t* x = p.xq + r * p.in;
      float total[kTile] = {};
      for (int64_t g = 0; g < p.groups; ++g) {
        int32_t acc[kTile] = {};
        const uint8_t* qg = qt + g * gbytes;
        const int64_t k0 = g * p.group;
        if (p.bits == 8) {
          for (int64_t b = 0; b < gbytes; b += 32) {  // 32 bytes: 2 inputs
            for (int j = 0; j < kTile; ++j)
              for (int u = 0; u < 2; ++u) acc[j] += int32_t{qg[b + 2 * j + u]} * x[k0 + b / 16 + u];
          }
        } else {
          for (int64_t b = 0; b < gbytes; b += 64) {  // 64 bytes: 8 inputs
            for (int j = 0; j < kTile; ++j) {
              for (int u = 0; u < 4; ++u) {
                const int32_t c = qg[b + 4 * j + u];
                acc[j] += (c & 15) * x[k0 + b / 8 + u] + (c >> 4) * x[k0 + b / 8 + 4 + u];
              }
            }
          }
        }
        const int64_t sg = (t * p.groups + g) * kTile;
        const float xs = p.xscale[r * p.groups + g], sum = p.xsum[r * p.groups + g];
        for (int j = 0; j < kTile; ++j) {
          total[j] += float(acc[j]) * (half_to_float(p.scale[sg + j]) * xs) + half_to_float(p.minimum[sg + j]) * sum;
        }
      }
      std::memcpy(p.y + r * p.tiles * kTile + t * kTile, total, sizeof(total));
    }
  }
}

#ifdef RWKVCTL_X86_VARIANTS
inline int32_t quad_at(const void* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return v;
}

// AVX-512BW: 16 output rows per zmm. NR input rows share each code vector.
//
// With VNNI each vpdpwssd / vpdpbusd waits for the previous one on the same accumulator (~5 cycles), so one chain
// of sums per row would bound a lone decode row (NR = 1) at a fifth of what the multiply unit can do. Each row
// therefore keeps independent int32 sums (8 bits: one per chunk parity for NR <= 2; 4 bits: one per nibble and
// activation byte), added at the end of the group. Integer addition is exact, so the result does not depend on the
// split.
#define RWKVCTL_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

template <bool VNNI>
RWKVCTL_AVX512_TARGET inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
  return VNNI ? _mm512_dpwssd_epi32(acc, a, b) : _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
}

// One 32-byte chunk of an 8-bit tile's codes (2 inputs for 16 rows) into the sums of parity C.
template <int NR, bool VNNI, int C, int kParity>
RWKVCTL_AVX512_TARGET inline void chunk8_avx512(__m512i (&acc)[NR][kParity], const uint8_t* codes_at,
                                                const int16_t* x_at, int64_t row_stride) {
  const __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes_at)));
  for (int r = 0; r < NR; ++r) {
    acc[r][C] = dot_pairs<VNNI>(acc[r][C], codes, _mm512_set1_epi32(quad_at(x_at + r * row_stride)));
  }
}

// The per-group epilogue shared by the AVX-512 kernels: total += sum * (scale * xscale) + min * xsum, 16 rows.
RWKVCTL_AVX512_TARGET inline __m512 scale_group(const Prepared& p, __m512i sum, __m512 total, __m512 s, __m512 m,
                                                int64_t rg) {
  const __m512 sx = _mm512_mul_ps(s, _mm512_set1_ps(p.xscale[rg]));
  total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sx, total);
  return _mm512_fmadd_ps(m, _mm512_set1_ps(p.xsum[rg]), total);
}

template <int NR, bool VNNI>
RWKVCTL_AVX512_TARGET void tiles8_avx512(const Prepared& p, int64_t t0, int64_t t1, int64_t r0) {
  constexpr int kParity = NR <= 2 ? 2 : 1;  // even and odd 32-byte chunks kept apart
  const int64_t gbytes = kTile * p.group;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* qt = p.q + t * p.tile_bytes();
    __m512 total[NR];
    for (int r = 0; r < NR; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      __m512i acc[NR][kParity];
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < kParity; ++c) acc[r][c] = _mm512_setzero_si512();
      const uint8_t* qg = qt + g * gbytes;
      const int16_t* xg = p.xq + r0 * p.in + g * p.group;
      int64_t b = 0;
      if constexpr (kParity == 2) {
        for (; b + 64 <= gbytes; b += 64) {
          chunk8_avx512<NR, VNNI, 0, kParity>(acc, qg + b, xg + b / 16, p.in);
          chunk8_avx512<NR, VNNI, kParity - 1, kParity>(acc, qg + b + 32, xg + b / 16 + 2, p.in);
        }
      }
      for (; b < gbytes; b += 32) chunk8_avx512<NR, VNNI, 0, kParity>(acc, qg + b, xg + b / 16, p.in);
      const int64_t sg = (t * p.groups + g) * kTile;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scale + sg)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.minimum + sg)));
      for (int r = 0; r < NR; ++r) {
        __m512i sum = acc[r][0];
        for (int c = 1; c < kParity; ++c) sum = _mm512_add_epi32(sum, acc[r][c]);
        total[r] = scale_group(p, sum, total[r], s, m, (r0 + r) * p.groups + g);
      }
    }
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(p.y + (r0 + r) * p.tiles * kTile + t * kTile, total[r]);
  }
}

// u8 x s8 products of 4 bytes summed into each int32 lane: vpdpbusd, or without VNNI vpmaddubsw (pairs to int16: at
// most 2 * 255 * 15, no saturation with 4-bit codes) and vpmaddwd against ones.
template <bool VNNI>
RWKVCTL_AVX512_TARGET inline __m512i dot_quads(__m512i acc, __m512i u8, __m512i s8) {
  if constexpr (VNNI) return _mm512_dpbusd_epi32(acc, u8, s8);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u8, s8), _mm512_set1_epi16(1)));
}

// 4 bits: per octet, the low nibbles are the codes of inputs 8o..8o+3 and the high nibbles of 8o+4..8o+7, as bytes
// of 16 rows x 4 inputs. Each row keeps 4 sums (high/low activation byte x low/high nibble) for NR <= 2, else 2
// (the nibbles share one): sum = 256 * high-byte sums + low-byte sums, the int16 activation's exact products.
template <int NR, bool VNNI>
RWKVCTL_AVX512_TARGET void tiles4_avx512(const Prepared& p, int64_t t0, int64_t t1, int64_t r0) {
  constexpr int kNib = NR <= 2 ? 2 : 1;
  const int64_t gbytes = kTile * p.group / 2;
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* qt = p.q + t * p.tile_bytes();
    __m512 total[NR];
    for (int r = 0; r < NR; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      __m512i hi_acc[NR][kNib], lo_acc[NR][kNib];  // sums against the activations' high / low bytes
      for (int r = 0; r < NR; ++r)
        for (int c = 0; c < kNib; ++c) hi_acc[r][c] = lo_acc[r][c] = _mm512_setzero_si512();
      const uint8_t* qg = qt + g * gbytes;
      const int64_t k0 = (r0 * p.in) + g * p.group;
      for (int64_t b = 0; b < gbytes; b += 64) {
        const __m512i v = _mm512_loadu_si512(qg + b);
        const __m512i nib[2] = {_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)};
        const int64_t k = k0 + b / 8;
        for (int r = 0; r < NR; ++r) {
          const int8_t* xh = p.xhi + k + r * p.in;
          const uint8_t* xl = p.xlo + k + r * p.in;
          for (int h = 0; h < 2; ++h) {
            const int c = kNib == 2 ? h : 0;
            hi_acc[r][c] = dot_quads<VNNI>(hi_acc[r][c], nib[h], _mm512_set1_epi32(quad_at(xh + 4 * h)));
            lo_acc[r][c] = dot_quads<VNNI>(lo_acc[r][c], _mm512_set1_epi32(quad_at(xl + 4 * h)), nib[h]);
          }
        }
      }
      const int64_t sg = (t * p.groups + g) * kTile;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scale + sg)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.minimum + sg)));
      for (int r = 0; r < NR; ++r) {
        __m512i hi = hi_acc[r][0], lo = lo_acc[r][0];
        if constexpr (kNib == 2) hi = _mm512_add_epi32(hi, hi_acc[r][1]), lo = _mm512_add_epi32(lo, lo_acc[r][1]);
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
        total[r] = scale_group(p, sum, total[r], s, m, (r0 + r) * p.groups + g);
      }
    }
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(p.y + (r0 + r) * p.tiles * kTile + t * kTile, total[r]);
  }
}

// AVX2: a tile as two halves of 8 rows (2 ymm per input row). 8 bits: widened codes against int16 pairs;
// 4 bits: the nibbles as bytes against the activation bytes as in tiles4_avx512 (vpmaddubsw: each half's two
// nibble products added in int16, at most 2 * 2 * 255 * 15 < 32768, then vpmaddwd against ones).
template <int BITS, int NR>
__attribute__((target("avx2,fma,f16c"))) void tiles_avx2(const Prepared& p, int64_t t0, int64_t t1, int64_t r0) {
  const int64_t gbytes = kTile * p.group * BITS / 8;
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* qt = p.q + t * p.tile_bytes();
    __m256 total[NR][2];
    for (int r = 0; r < NR; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      __m256i acc[NR][2];
      for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      const uint8_t* qg = qt + g * gbytes;
      const int64_t k0 = r0 * p.in + g * p.group;
      if constexpr (BITS == 8) {
        for (int64_t b = 0; b < gbytes; b += 32) {
          for (int h = 0; h < 2; ++h) {  // bytes 0..15: rows 0..7, bytes 16..31: rows 8..15
            const __m256i codes =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + b + 16 * h)));
            for (int r = 0; r < NR; ++r) {
              const __m256i xv = _mm256_set1_epi32(quad_at(p.xq + k0 + r * p.in + b / 16));
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(codes, xv));
            }
          }
        }
      } else {
        __m256i lo_acc[NR][2];  // sums against the activations' low bytes; acc takes the high bytes'
        for (int r = 0; r < NR; ++r) lo_acc[r][0] = lo_acc[r][1] = _mm256_setzero_si256();
        for (int64_t b = 0; b < gbytes; b += 64) {
          for (int h = 0; h < 2; ++h) {  // bytes 0..31: rows 0..7, bytes 32..63: rows 8..15
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + b + 32 * h));
            const __m256i n0 = _mm256_and_si256(v, low4), n1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int r = 0; r < NR; ++r) {
              const int64_t k = k0 + r * p.in + b / 8;
              const __m256i xh0 = _mm256_set1_epi32(quad_at(p.xhi + k)), xh1 = _mm256_set1_epi32(quad_at(p.xhi + k + 4));
              const __m256i xl0 = _mm256_set1_epi32(quad_at(p.xlo + k)), xl1 = _mm256_set1_epi32(quad_at(p.xlo + k + 4));
              const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(n0, xh0), _mm256_maddubs_epi16(n1, xh1));
              const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(xl0, n0), _mm256_maddubs_epi16(xl1, n1));
              acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(hi, ones));
              lo_acc[r][h] = _mm256_add_epi32(lo_acc[r][h], _mm256_madd_epi16(lo, ones));
            }
          }
        }
        for (int r = 0; r < NR; ++r)
          for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_add_epi32(_mm256_slli_epi32(acc[r][h], 8), lo_acc[r][h]);
      }
      const int64_t sg = (t * p.groups + g) * kTile;
      for (int h = 0; h < 2; ++h) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scale + sg + 8 * h)));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.minimum + sg + 8 * h)));
        for (int r = 0; r < NR; ++r) {
          const int64_t rg = (r0 + r) * p.groups + g;
          const __m256 sx = _mm256_mul_ps(s, _mm256_set1_ps(p.xscale[rg]));
          total[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), sx, total[r][h]);
          total[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(p.xsum[rg]), total[r][h]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      float* y = p.y + (r0 + r) * p.tiles * kTile + t * kTile;
      _mm256_storeu_ps(y, total[r][0]);
      _mm256_storeu_ps(y + 8, total[r][1]);
    }
  }
}

using TilesFn = void (*)(const Prepared&, int64_t, int64_t, int64_t);

// 0 portable, 1 AVX2, 2 AVX-512BW, 3 AVX-512BW + VNNI (capped by RWKVCTL_CPU_ISA like the WKV5 kernels).
int qmm_level() {
  const int level = cpu_isa_level();
  if (level < 2) return level;
  if (!__builtin_cpu_supports("avx512bw")) return 1;
  return __builtin_cpu_supports("avx512vnni") && cpu_isa_allows_vnni() ? 3 : 2;
}

template <int BITS, int NR>
TilesFn pick_nr(int level) {
  if constexpr (BITS == 4) {
    if (level == 3) return &tiles4_avx512<NR, true>;
    if (level == 2) return &tiles4_avx512<NR, false>;
  } else {
    if (level == 3) return &tiles8_avx512<NR, true>;
    if (level == 2) return &tiles8_avx512<NR, false>;
  }
  return &tiles_avx2<BITS, NR <= 2 ? NR : 2>;
}

// The kernel for the next `rows` input rows and how many of them it takes.
template <int BITS>
TilesFn pick(int level, int64_t rows, int* taken) {
  if (level >= 2) {
    *taken = rows >= 8 ? 8 : rows >= 4 ? 4 : rows >= 2 ? 2 : 1;
    switch (*taken) {
      case 8: return pick_nr<BITS, 8>(level);
      case 4: return pick_nr<BITS, 4>(level);
      case 2: return pick_nr<BITS, 2>(level);
      default: return pick_nr<BITS, 1>(level);
    }
  }
  *taken = rows >= 2 ? 2 : 1;
  return *taken == 2 ? pick_nr<BITS, 2>(level) : pick_nr<BITS, 1>(level);
}
#endif

void run_tiles(const Prepared& p, int level, int64_t t0, int64_t t1) {
#ifdef RWKVCTL_X86_VARIANTS
  if (level >= 1) {
    for (int64_t r0 = 0; r0 < p.n;) {
      int taken = 1;
      const TilesFn fn = p.bits == 4 ? pick<4>(level, p.n - r0, &taken) : pick<8>(level, p.n - r0, &taken);
      fn(p, t0, t1, r0);
      r0 += taken;
    }
    return;
  }
#endif
  tiles_portable(p, t0, t1);
}

// Each run of `group` values of x (all rows one after another) -> int16 codes, its scale (max |x| / 32767, 1 for an
// all-zero group) and its exact fp32 sum.
void quantize_activations(const float* x, int64_t runs, int64_t group, int16_t* xq, float* xscale, float* xsum) {
  for (int64_t g = 0; g < runs; ++g) {
    const float* v = x + g * group;
    float peak = 0.f, sum = 0.f;
    for (int64_t i = 0; i < group; ++i) peak = std::max(peak, std::fabs(v[i])), sum += v[i];
    const float scale = peak > 0.f ? peak / 32767.f : 1.f, inv = 1.f / scale;
    for (int64_t i = 0; i < group; ++i) {
      const float c = std::clamp(std::nearbyint(v[i] * inv), -32767.f, 32767.f);
      xq[g * group + i] = c == c ? static_cast<int16_t>(c) : 0;  // NaN: the sum below carries it to the output
    }
    xscale[g] = scale;
    xsum[g] = sum;
  }
}

#ifdef RWKVCTL_X86_VARIANTS
// quantize_activations with AVX-512 (the same codes: round to nearest even, clamp, NaN -> 0; the sums in 16 lanes):
// the scalar loop's nearbyint is a library call per input (~100k a token on the 0.1b preset), and it runs before the
// matmul splits over threads.
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void quantize_activations_avx512(
    const float* x, int64_t runs, int64_t group, int16_t* xq, float* xscale, float* xsum) {
  const __m512i hi = _mm512_set1_epi32(32767), lo = _mm512_set1_epi32(-32767);
  for (int64_t g = 0; g < runs; ++g) {
    const float* v = x + g * group;
    int16_t* q = xq + g * group;
    __m512 peak = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < group; i += 16) {
      const __mmask16 m = group - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (group - i)) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(m, v + i);
      peak = _mm512_max_ps(_mm512_abs_ps(a), peak);  // maxps returns its 2nd operand if the 1st is NaN
      sum = _mm512_add_ps(sum, a);
    }
    const float top = _mm512_reduce_max_ps(peak);
    const float scale = top > 0.f ? top / 32767.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / scale);
    for (int64_t i = 0; i < group; i += 16) {
      const __mmask16 m = group - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (group - i)) - 1);
      const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, v + i), inv);
      const __mmask16 ordered = _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q);  // NaN (or inf * 0) -> code 0
      const __m512i c = _mm512_maskz_max_epi32(ordered, _mm512_min_epi32(_mm512_cvtps_epi32(a), hi), lo);
      _mm256_mask_storeu_epi16(q + i, m, _mm512_cvtepi32_epi16(c));
    }
    xscale[g] = scale;
    xsum[g] = _mm512_reduce_add_ps(sum);
  }
}
#endif

}  // namespace

void check_group_affine(const char* op, const char* what, const at::Tensor& qtiles, const at::Tensor& scale,
                        const at::Tensor& minimum, int64_t out, int64_t in, int64_t bits, int64_t group) {
  const int64_t tiles = (out + kTile - 1) / kTile;
  TORCH_CHECK(bits == 4 || bits == 8, op, ": ", what, ": packed bits must be 4 or 8, got ", bits);
  // whole octets (4 bits) or pairs (8 bits) per group; int32 sums: 8 bits up to 256 inputs (255 * 32767 each),
  // 4 bits up to 4096 (the high-byte sums, 15 * 128 * 256 each)
  TORCH_CHECK(group > 0 && group % (bits == 4 ? 8 : 2) == 0 && in % group == 0 && group <= (bits == 4 ? 4096 : 256),
              op, ": ", what, ": group ", group, " does not fit rows of ", in, " at ", bits, " bits");
  TORCH_CHECK(qtiles.device().is_cpu() && qtiles.dim() == 2 && qtiles.scalar_type() == at::kByte &&
                  qtiles.size(0) == tiles && qtiles.size(1) == kTile * in * bits / 8 && qtiles.is_contiguous(),
              op, ": ", what, ": codes must be contiguous (", tiles, ", ", kTile * in * bits / 8,
              ") uint8 on the CPU, got ", qtiles.sizes(), " ", qtiles.scalar_type());
  for (const at::Tensor* t : {&scale, &minimum}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->size(0) == tiles && t->size(1) == in / group &&
                    t->size(2) == kTile && t->element_size() == 2 && t->is_contiguous(),
                op, ": ", what, ": scale and min tiles must be contiguous (", tiles, ", ", in / group,
                ", 16) fp16 bits on the CPU, got ", t->sizes());
  }
}

void group_affine_mm_rows(const float* x, int64_t n, int64_t in, const uint8_t* qtiles, const uint16_t* scale,
                          const uint16_t* minimum, int64_t out, int64_t bits, int64_t group, float* y) {
  const int64_t tiles = (out + kTile - 1) / kTile, groups = in / group;
  // activations, each group rounded to int16 on its own scale: a plain loop, as a chain of ATen ops would cost
  // more than the matmul of a small layer
  std::vector<int16_t> xq(static_cast<size_t>(n * in));
  std::vector<float> xscale(static_cast<size_t>(n * groups)), xsum(static_cast<size_t>(n * groups));
  const int level = qmm_level();
#ifdef RWKVCTL_X86_VARIANTS
  const auto quantize = level >= 2 ? &quantize_activations_avx512 : &quantize_activations;
#else
  const auto quantize = &quantize_activations;
#endif
  quantize(x, n * groups, group, xq.data(), xscale.data(), xsum.data());
  // 4 bits on x86: each int16 activation as a signed high and an unsigned low byte (x = 256 * hi + lo)
  std::vector<int8_t> xhi(bits == 4 && level >= 1 ? static_cast<size_t>(n * in) : 0);
  std::vector<uint8_t> xlo(xhi.size());
  for (size_t i = 0; i < xhi.size(); ++i) {
    xhi[i] = static_cast<int8_t>(xq[i] >> 8);  // arithmetic shift: the floor of x / 256
    xlo[i] = static_cast<uint8_t>(xq[i] & 0xFF);
  }
  Prepared p{n,          in,         out,           tiles,       group,  groups, bits,    xq.data(),
             xhi.data(), xlo.data(), xscale.data(), xsum.data(), qtiles, scale,  minimum, y};
  // ~32 KB of codes per task at least: a small matrix is not split over threads whose wake-up costs more
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / p.tile_bytes());
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { run_tiles(p, level, t0, t1); });
}

namespace {

at::Tensor group_affine_mm_cpu(const at::Tensor& x, const at::Tensor& qtiles, const at::Tensor& scale,
                               const at::Tensor& minimum, int64_t out, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()) && x.device().is_cpu(),
              "group_affine_mm: x must be (n, in) float on the CPU, got ", x.sizes(), " ", x.scalar_type());
  const int64_t n = x.size(0), in = x.size(1), tiles = (out + kTile - 1) / kTile;
  check_group_affine("group_affine_mm", "weight", qtiles, scale, minimum, out, in, bits, group);
  at::Tensor y = at::empty({n, tiles * kTile}, x.options().dtype(at::kFloat));
  if (n == 0 || out == 0) return y.narrow(1, 0, out);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // (n, in)
  group_affine_mm_rows(x32.data_ptr<float>(), n, in, qtiles.data_ptr<uint8_t>(),
                       reinterpret_cast<const uint16_t*>(scale.data_ptr()),
                       reinterpret_cast<const uint16_t*>(minimum.data_ptr()), out, bits, group, y.data_ptr<float>());
  return tiles * kTile == out ? y : y.narrow(1, 0, out).contiguous();
}

int64_t group_affine_level() { return qmm_level(); }

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_FRAGMENT(rwkvctl, m) {
  m.def("group_affine_mm(Tensor x, Tensor qtiles, Tensor scale, Tensor min, int out, int bits, int group) -> Tensor");
  m.def("group_affine_level() -> int", &rwkvctl::group_affine_level);
  // the stored form times up to 16 rows on a GPU: CUDA only (cuda/qmm_cuda.cu); the CPU reads the tiles above
  m.def("group_affine_mv(Tensor x, Tensor qweight, Tensor scale, Tensor min, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(rwkvctl, CPU, m) { m.impl("group_affine_mm", &rwkvctl::group_affine_mm_cpu); }
