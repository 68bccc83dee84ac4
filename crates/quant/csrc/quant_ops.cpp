// The fast path of the 4-bit codec and the 4-bit linear layer, as C functions over libtorch
// tensors (tch's `C_tensor` is a `torch::Tensor*`). Every bit follows `src/codec.rs`, the
// reference implementation; `tests/ops.rs` checks them against each other.
//
// Calling convention: each function returns nullptr on success or a malloc'd error message
// (free it with `nibble_quant_free_error`); output tensors are `new torch::Tensor`s that the
// caller owns (tch frees them with `at_free`). No C++ exception crosses this boundary.
//
// Speed: parallel over blocks with at::parallel_for (OpenMP); on x86-64 the quantize block loop
// is also compiled for AVX2 (bf16 by octave tables of byte keys, see OctaveTable) and the 16-bit
// dequantize uses SSSE3 pshufb lookups, all chosen at run time (no FMA: -ffp-contract=off keeps
// every rounding identical to codec.rs).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/torch.h>

#include "ffi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NIBBLE_X86 1
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

namespace {

using nibble::guarded;

// Quant types, as passed from Rust.
constexpr int32_t kNf4 = 0;
constexpr int32_t kFp4 = 1;

// Output dtypes, as passed from Rust.
constexpr int32_t kOutF32 = 0;
constexpr int32_t kOutF16 = 1;
constexpr int32_t kOutBf16 = 2;
// Internal only: float32 outputs holding the values rounded to bfloat16 / float16 (a 16-bit
// compute dtype's weight, for matmuls that run in f32).
constexpr int32_t kOutF32Bf16 = 3;
constexpr int32_t kOutF32F16 = 4;

// NF4 code values by nibble (bitsandbytes' table; same digits as codec.rs).
constexpr float kNf4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// FP4 code values by nibble: e2m1 magnitudes over 12, sign in bit 3.
constexpr float kFp4Code[16] = {
    0.0f / 12.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  12.0f / 12.0f,
    4.0f / 12.0f,  6.0f / 12.0f,     2.0f / 12.0f,  3.0f / 12.0f,
    -0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,    -2.0f / 12.0f, -3.0f / 12.0f,
};

// The NF4 tree of codec.rs compares against these midpoints with a strict `>`; since they are
// sorted, the tree's answer is the number of thresholds strictly below x (NaN: none, code 0).
constexpr float kNf4Thresholds[15] = {
    -0.8480964f,  -0.6106329f, -0.45999527f, -0.33967943f, -0.2346074f,
    -0.13791173f, -0.045525018f, 0.03979015f, 0.12025525f,  0.20352125f,
    0.29201377f,  0.38931254f,  0.5016634f,   0.6427869f,   0.8614784f,
};

// FP4: the tree over |x| in codec.rs, as sorted thresholds, and the magnitude nibble for each
// count of thresholds exceeded (codes sorted by magnitude: 0, 1, 6, 7, 4, 5, 2, 3).
constexpr float kFp4Thresholds[7] = {
    0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f,
};
constexpr uint8_t kFp4ByRank[8] = {0, 1, 6, 7, 4, 5, 2, 3};

inline uint8_t encode_nf4(float x) {
  int k = 0;
  for (int t = 0; t < 15; ++t) {
    k += x > kNf4Thresholds[t] ? 1 : 0;
  }
  return static_cast<uint8_t>(k);
}

inline uint8_t encode_fp4(float x) {
  const uint8_t sign = x < 0.0f ? 8 : 0;
  const float a = std::fabs(x);
  int k = 0;
  for (int t = 0; t < 7; ++t) {
    k += a > kFp4Thresholds[t] ? 1 : 0;
  }
  return static_cast<uint8_t>(kFp4ByRank[k] + sign);
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize ", blocksize, " is not supported");
}

void check_cpu_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), what, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// Records the smallest flat index of a non-finite input over all threads.
struct FirstBad {
  std::atomic<int64_t> index{std::numeric_limits<int64_t>::max()};
  void offer(int64_t i) {
    int64_t cur = index.load(std::memory_order_relaxed);
    while (i < cur && !index.compare_exchange_weak(cur, i, std::memory_order_relaxed)) {
    }
  }
};

inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// 4-bit quantization of one block of `len` (even, or the odd tail) elements starting at `x`.
// Returns false if the block holds a non-finite value (nothing then is trusted).
template <typename T, int32_t QT>
__attribute__((always_inline)) inline bool quantize_block(const T* x, int64_t len, uint8_t* out,
                                                          float* absmax_out) {
  // absmax and the finiteness check in one integer max (which vectorizes, unlike a float max
  // without -ffast-math): the bits of |x| order like |x|, and inf/NaN are >= 0x7f800000.
  uint32_t m_bits = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t a = float_bits(static_cast<float>(x[i])) & 0x7fffffffu;
    m_bits = a > m_bits ? a : m_bits;
  }
  if (m_bits >= 0x7f800000u) {
    return false;
  }
  float m;
  std::memcpy(&m, &m_bits, sizeof m);
  *absmax_out = m;
  const float scale = 1.0f / m;
  constexpr int64_t kChunk = 256;
  uint8_t codes[kChunk];
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t n = std::min(kChunk, len - start);
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(x[start + i]) * scale;
      codes[i] = QT == kNf4 ? encode_nf4(v) : encode_fp4(v);
    }
    const int64_t pairs = n / 2;
    uint8_t* o = out + start / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      o[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
    }
    if (n % 2 == 1) {
      // Odd total length: the last low nibble is the code of 0.0 * scale.
      const float pad = 0.0f * scale;
      const uint8_t lo = QT == kNf4 ? encode_nf4(pad) : encode_fp4(pad);
      o[pairs] = static_cast<uint8_t>((codes[n - 1] << 4) | lo);
    }
  }
  return true;
}

// The same body compiled twice: for the baseline ISA and with AVX2 (picked at run time). AVX2
// only widens the compares; without FMA and with -ffp-contract=off every rounding is the same.
template <typename T, int32_t QT>
bool quantize_block_base(const T* x, int64_t len, uint8_t* out, float* absmax_out) {
  return quantize_block<T, QT>(x, len, out, absmax_out);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T, int32_t QT>
__attribute__((target("avx2"))) bool quantize_block_avx2(const T* x, int64_t len, uint8_t* out,
                                                         float* absmax_out) {
  return quantize_block<T, QT>(x, len, out, absmax_out);
}
#endif

#ifdef NIBBLE_X86
// Hand-vectorized AVX2 blocks (the compiler's own vectorization of the loops above leaves the
// per-element threshold count and the nibble packing scalar-ish). Same arithmetic as
// `quantize_block`: the integer absmax of |x|'s bits, one f32 division `1 / absmax`, one f32
// product per element, and the code found by comparing that product with the same sorted f32
// thresholds (a 4-level binary search with in-register table lookups instead of a count).
#define NIBBLE_AVX2 __attribute__((target("avx2,f16c"), always_inline)) inline

template <typename T>
NIBBLE_AVX2 __m256 load8_f32(const T* x);
template <>
NIBBLE_AVX2 __m256 load8_f32<float>(const float* x) {
  return _mm256_loadu_ps(x);
}
template <>
NIBBLE_AVX2 __m256 load8_f32<c10::BFloat16>(const c10::BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
NIBBLE_AVX2 __m256 load8_f32<c10::Half>(const c10::Half* x) {
  // f16 -> f32 is exact, so F16C's conversion equals c10::Half's.
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

NIBBLE_AVX2 uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

NIBBLE_AVX2 uint16_t hmax_epu16(__m256i v) {
  const __m128i m = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  // max(v) = 0xffff - min(0xffff - v), and SSE4.1 has a horizontal unsigned 16-bit min.
  const __m128i ones = _mm_set1_epi16(-1);
  const __m128i mn = _mm_minpos_epu16(_mm_sub_epi16(ones, m));
  return static_cast<uint16_t>(0xffff - (_mm_cvtsi128_si32(mn) & 0xffff));
}

// The bits of max |x| over a block of `len` (a multiple of 16) elements, as f32 bits; NaN and
// inf give >= 0x7f800000 like the scalar loop.
template <typename T>
NIBBLE_AVX2 uint32_t absmax_bits_avx2(const T* x, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    __m256i m = _mm256_setzero_si256();
    for (int64_t i = 0; i < len; i += 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      m = _mm256_max_epu32(m, _mm256_and_si256(v, mask));
    }
    return hmax_epu32(m);
  } else {
    // 16-bit floats: |x|'s bits order like |x| too, so the max is taken on 16 lanes at once.
    const __m256i mask = _mm256_set1_epi16(0x7fff);
    __m256i m = _mm256_setzero_si256();
    for (int64_t i = 0; i < len; i += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      m = _mm256_max_epu16(m, _mm256_and_si256(v, mask));
    }
    const uint16_t h = hmax_epu16(m);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return static_cast<uint32_t>(h) << 16;
    } else {
      if (h >= 0x7c00) {
        return 0x7f800000u;
      }
      return float_bits(_cvtsh_ss(h));
    }
  }
}

// -1 in each lane where a > b (false for NaN), else 0.
NIBBLE_AVX2 __m256i gt(__m256 a, __m256 b) {
  return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GT_OQ));
}

// Codes (0..15, one per 32-bit lane) of 8 scaled values. The first two levels of the search
// are one count of three thresholds (fewer dependent steps than two levels of lookups); the
// last two look the threshold up by the bits decided so far.
template <int32_t QT>
NIBBLE_AVX2 __m256i encode8_avx2(__m256 v) {
  if constexpr (QT == kNf4) {
    const float* t = kNf4Thresholds;
    const __m256 t3 = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0);
    const __m256 t4 = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
    const __m256i q = _mm256_sub_epi32(
        _mm256_setzero_si256(),
        _mm256_add_epi32(_mm256_add_epi32(gt(v, _mm256_set1_ps(t[3])), gt(v, _mm256_set1_ps(t[7]))),
                         gt(v, _mm256_set1_ps(t[11]))));
    const __m256i k = _mm256_sub_epi32(_mm256_slli_epi32(q, 1), gt(v, _mm256_permutevar8x32_ps(t3, q)));
    return _mm256_sub_epi32(_mm256_slli_epi32(k, 1), gt(v, _mm256_permutevar8x32_ps(t4, k)));
  } else {
    const float* t = kFp4Thresholds;
    const __m256 a = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    const __m256i sign = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ)), _mm256_set1_epi32(8));
    const __m256 t2 = _mm256_setr_ps(t[0], t[2], t[4], t[6], 0, 0, 0, 0);
    const __m256i q = _mm256_sub_epi32(
        _mm256_setzero_si256(),
        _mm256_add_epi32(_mm256_add_epi32(gt(a, _mm256_set1_ps(t[1])), gt(a, _mm256_set1_ps(t[3]))),
                         gt(a, _mm256_set1_ps(t[5]))));
    const __m256i rank = _mm256_sub_epi32(_mm256_slli_epi32(q, 1), gt(a, _mm256_permutevar8x32_ps(t2, q)));
    const __m256i by_rank = _mm256_setr_epi32(kFp4ByRank[0], kFp4ByRank[1], kFp4ByRank[2],
                                              kFp4ByRank[3], kFp4ByRank[4], kFp4ByRank[5],
                                              kFp4ByRank[6], kFp4ByRank[7]);
    return _mm256_add_epi32(_mm256_permutevar8x32_epi32(by_rank, rank), sign);
  }
}

// 16 consecutive elements as f32, split into the 8 even ones and the 8 odd ones (in order):
// an even element goes to a byte's high nibble, the next odd one to its low nibble.
template <typename T>
NIBBLE_AVX2 void load16_even_odd(const T* x, __m256& even, __m256& odd) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // A bf16 is the high half of its f32: each 32-bit lane holds (even, odd) already.
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  } else {
    const __m256 a = load8_f32<T>(x);
    const __m256 b = load8_f32<T>(x + 8);
    // shuffle_ps works per 128-bit lane; the 64-bit permute puts the halves back in order.
    even = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xd8));
    odd = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd)), 0xd8));
  }
}

// A whole block of a length divisible by 32 with AVX2; other lengths (a short last block) take
// the compiler-vectorized loop.
template <typename T, int32_t QT>
__attribute__((target("avx2,f16c"))) bool quantize_block_avx2_wide(const T* x, int64_t len,
                                                                   uint8_t* out,
                                                                   float* absmax_out) {
  if (len % 32 != 0) {
    return quantize_block<T, QT>(x, len, out, absmax_out);
  }
  const uint32_t m_bits = absmax_bits_avx2<T>(x, len);
  if (m_bits >= 0x7f800000u) {
    return false;
  }
  float m;
  std::memcpy(&m, &m_bits, sizeof m);
  *absmax_out = m;
  const __m256 scale = _mm256_set1_ps(1.0f / m);
  // packus works per 128-bit lane; this puts the 32-bit groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < len; i += 32) {
    __m256i pairs[2];
    for (int q = 0; q < 2; ++q) {
      __m256 even;
      __m256 odd;
      load16_even_odd<T>(x + i + 16 * q, even, odd);
      const __m256i hi = encode8_avx2<QT>(_mm256_mul_ps(even, scale));
      const __m256i lo = encode8_avx2<QT>(_mm256_mul_ps(odd, scale));
      pairs[q] = _mm256_or_si256(_mm256_slli_epi32(hi, 4), lo);  // one output byte per lane
    }
    // 16 bytes: [pairs0 0-3, pairs1 0-3, ... | pairs0 4-7, pairs1 4-7, ...] after the packs.
    const __m256i words = _mm256_packus_epi32(pairs[0], pairs[1]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_castsi256_si128(bytes));
  }
  return true;
}
#undef NIBBLE_AVX2
#endif

// bf16 to NF4 or FP4 without a multiply or an f32 compare. For a block's scale s = 1/absmax the
// code of x comes from #{i : fl(y * s) > t_i} (y = x for NF4, |x| for FP4), a step function of y
// that only rises with y, so that count is also the number of per-block bf16 values K_i below
// y, K_i the largest bf16 whose product with s is still <= t_i. Two absmax values that differ by
// a power of two give scales that differ by its inverse exactly, and the same products, so the
// K_i of absmax 1.m * 2^E are those of 1.m moved by E's exponent: they are found once per 7-bit
// mantissa m (binary searches with the kernel's own f32 arithmetic). This holds while the values
// involved stay normal: exponents within OctaveCodec's kMinDelta..kMaxDelta of [1, 2); other
// blocks (and all-zero ones) take the f32 path.
// Every K_i lies in one of the octaves just under E (E-5..E for NF4, E-9..E for FP4), at most 3
// per octave and sign, so the kernel splits each value into bytes (32 lanes per vector): an
// index (NF4: sign * 8 + octave; FP4: octave; octave 0 also every smaller exponent) and the low
// byte (the exponent's last bit and the mantissa; inverted for negative NF4 values) as a key
// that orders like y. The count is the octave's base count plus the number of its thresholds the
// key passes: four table lookups (pshufb) and three byte compares per 32 values, after two
// shuffles that split them (FP4: one more lookup, rank to code, and the sign).
bool have_avx2();  // AVX2 and F16C (below, with the dequantize kernels)

template <int32_t QT>
struct OctaveCodec {
  static constexpr bool kNf4Type = QT == kNf4;
  static constexpr int kCount = kNf4Type ? 15 : 7;  // thresholds
  static constexpr const float* kThresholds = kNf4Type ? kNf4Thresholds : kFp4Thresholds;
  // Octave 0 is exponent E - kBelow and every smaller one (no threshold lies there).
  static constexpr int kBelow = kNf4Type ? 6 : 10;
  // The smallest exponent difference to [1, 2) whose thresholds stay normal, with a margin of one.
  static constexpr int kMinDelta = kBelow - 126;
  // The largest: NF4 while 1/absmax stays normal; FP4 while no product of a nonzero value
  // underflows to 0 (FP4's sign is that of the product: -tiny * s = -0 has no sign bit).
  static constexpr int kMaxDelta = kNf4Type ? 125 : 16;
};
constexpr int8_t kNoThreshold = 127;  // no key is greater

struct OctaveTable {
  // For absmax 1.m * 2^E (bf16 mantissa m), pshufb tables by index: t[p][m][0] the count below
  // the octave's smallest value (NF4: the code itself), t[p][m][1..3] its thresholds as keys,
  // kNoThreshold where unused. The keys hold the exponent's last bit, so they depend on E's
  // parity p (0: odd, 1: even).
  alignas(16) int8_t t[2][128][4][16];
  // False if some octave held more than 3 thresholds or one lay outside the octaves above 0
  // (never for NF4 and FP4: then the f32 path takes every block; see octave_path).
  bool ok;
};

inline float bf16_key_value(int32_t key) {
  const uint32_t bits = key >= 0 ? static_cast<uint32_t>(key)
                                 : (static_cast<uint32_t>(-1 - key) | 0x8000u);
  float f;
  const uint32_t b = bits << 16;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// The bits of the largest bf16 v with fl(v * (1 / absmax)) <= t, for absmax 1.m (exponent 127).
inline uint16_t threshold_bits(int m, float t) {
  const float absmax = bf16_key_value((127 << 7) | m);
  const float scale = 1.0f / absmax;
  // Search over signed keys (magnitude bits, -1 - magnitude for negatives) that order like the
  // values: the predicate holds for every key up to the answer and for none after.
  int32_t lo = -0x7f80;  // -max finite bf16: holds
  int32_t hi = 0x7f7f;   // +max finite bf16: fails
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (bf16_key_value(mid) * scale <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return static_cast<uint16_t>(lo >= 0 ? lo : ((-1 - lo) | 0x8000));
}

template <int32_t QT>
const OctaveTable& octave_table() {
  using C = OctaveCodec<QT>;
  static const OctaveTable table = [] {
    OctaveTable t{};
    t.ok = true;
    const int octave0 = 127 - C::kBelow;  // octave 0's exponent for E = 127
    for (int m = 0; m < 128; ++m) {
      auto& tab = t.t[0][m];
      for (int slot = 0; slot < 16; ++slot) {
        tab[1][slot] = tab[2][slot] = tab[3][slot] = kNoThreshold;
      }
      int used[16] = {};
      int below[16] = {};  // thresholds under the octave (negative NF4 ones: over it)
      for (int i = 0; i < C::kCount; ++i) {
        const uint16_t k = threshold_bits(m, C::kThresholds[i]);
        const bool negative = (k & 0x8000) != 0;
        const int octave = ((k >> 7) & 0xff) - octave0;
        if (negative != (C::kNf4Type && i < 7) || octave < 1 || octave > C::kBelow) {
          t.ok = false;
          continue;
        }
        const int idx = (negative ? 8 : 0) + octave;
        if (used[idx] == 3) {
          t.ok = false;
          continue;
        }
        // y > K_i within the octave: the low byte beyond K_i's (or, for a negative NF4 x, below
        // it: |x| < |K_i|), compared as the kernel's keys (the low byte, inverted for negative
        // NF4 values, as a signed byte; the octave fixes its top bit).
        const uint8_t low = static_cast<uint8_t>(k & 0xff);
        tab[1 + used[idx]++][idx] = static_cast<int8_t>(negative ? static_cast<uint8_t>(~low) : low);
        if (negative) {
          for (int o = 0; o < octave; ++o) {
            ++below[8 + o];
          }
        } else {
          for (int o = octave + 1; o < (C::kNf4Type ? 8 : 16); ++o) {
            ++below[o];
          }
        }
      }
      for (int idx = 0; idx < 16; ++idx) {
        // NF4's positive octaves count from code 7 (every negative threshold is below them).
        tab[0][idx] = static_cast<int8_t>(below[idx] + (C::kNf4Type && idx < 8 ? 7 : 0));
      }
      // An even exponent: every octave's last exponent bit, and so its keys' top bit, flips.
      auto& even = t.t[1][m];
      for (int k = 0; k < 4; ++k) {
        for (int slot = 0; slot < 16; ++slot) {
          const bool key = k > 0 && tab[k][slot] != kNoThreshold;
          even[k][slot] = static_cast<int8_t>(key ? tab[k][slot] ^ 0x80 : tab[k][slot]);
        }
      }
    }
    return t;
  }();
  return table;
}

#ifdef NIBBLE_X86
// Codes of 32 bf16 values at p for a block with octave base `eb` (E - kBelow in every byte) and
// the tables of its absmax, one per byte in the order [p0..7, p16..23 | p8..15, p24..31].
template <int32_t QT>
__attribute__((target("avx2,f16c"), always_inline)) inline __m256i octave_codes32(
    const c10::BFloat16* p, __m256i eb, __m256i base, __m256i t1, __m256i t2, __m256i t3) {
  // Per 128-bit lane: the high bytes of 8 values, then their low bytes.
  const __m256i split = _mm256_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1,
                                         3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i a = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), split);
  const __m256i b =
      _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)), split);
  const __m256i hi = _mm256_unpacklo_epi64(a, b);  // sign, exponent bits 7..1
  const __m256i lo = _mm256_unpackhi_epi64(a, b);  // exponent bit 0, mantissa
  const __m256i zero = _mm256_setzero_si256();
  const __m256i neg = _mm256_cmpgt_epi8(zero, hi);
  const __m256i hh = _mm256_add_epi8(hi, hi);  // exponent bits 7..1, 0 (the sign dropped)
  // The octave: max(0, e - (E - kBelow)).
  const __m256i octave = _mm256_subs_epu8(_mm256_sub_epi8(hh, _mm256_cmpgt_epi8(zero, lo)), eb);
  __m256i idx = octave;
  __m256i key = lo;
  if constexpr (QT == kNf4) {
    idx = _mm256_or_si256(octave, _mm256_and_si256(neg, _mm256_set1_epi8(8)));
    key = _mm256_xor_si256(lo, neg);
  }
  // Each threshold the key passes adds one to the base (a compare gives -1 where it does).
  __m256i count = _mm256_shuffle_epi8(base, idx);
  count = _mm256_sub_epi8(count, _mm256_cmpgt_epi8(key, _mm256_shuffle_epi8(t1, idx)));
  count = _mm256_sub_epi8(count, _mm256_cmpgt_epi8(key, _mm256_shuffle_epi8(t2, idx)));
  count = _mm256_sub_epi8(count, _mm256_cmpgt_epi8(key, _mm256_shuffle_epi8(t3, idx)));
  if constexpr (QT == kNf4) {
    return count;
  } else {
    const __m256i by_rank = _mm256_setr_epi8(
        kFp4ByRank[0], kFp4ByRank[1], kFp4ByRank[2], kFp4ByRank[3], kFp4ByRank[4], kFp4ByRank[5],
        kFp4ByRank[6], kFp4ByRank[7], 0, 0, 0, 0, 0, 0, 0, 0, kFp4ByRank[0], kFp4ByRank[1],
        kFp4ByRank[2], kFp4ByRank[3], kFp4ByRank[4], kFp4ByRank[5], kFp4ByRank[6], kFp4ByRank[7], 0,
        0, 0, 0, 0, 0, 0, 0);
    // The sign bit where x < 0: negative and not -0, the one negative value whose other bits are
    // all 0 (adding 0xf7 with saturation sets bit 3 exactly when they are not).
    const __m256i nonzero = _mm256_adds_epu8(_mm256_or_si256(lo, hh), _mm256_set1_epi8(static_cast<char>(0xf7)));
    const __m256i sign = _mm256_and_si256(_mm256_and_si256(neg, nonzero), _mm256_set1_epi8(8));
    return _mm256_or_si256(_mm256_shuffle_epi8(by_rank, count), sign);
  }
}

// A 16-entry table in both 128-bit lanes (pshufb looks up per lane).
__attribute__((target("avx2,f16c"), always_inline)) inline __m256i pshufb_table(const int8_t* t) {
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// Blocks b0..b1 of bf16 to NF4 or FP4 (see OctaveTable); a block it cannot take (a short last
// block, an exponent out of range, all zeros) goes to `quantize_block_avx2_wide`. Returns the
// first block with a non-finite value, or -1. kLen: the blocksize when known at compile time (the
// loops over a block unroll: 20% faster at 64), else 0.
template <int32_t QT, int64_t kLen>
__attribute__((target("avx2,f16c"))) int64_t quantize_blocks_bf16_octaves_avx2(
    const c10::BFloat16* x, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* packed,
    float* absmax) {
  using C = OctaveCodec<QT>;
  const OctaveTable& table = octave_table<QT>();
  // Two codes per byte, even value high: the byte pairs of octave_codes32 are value pairs.
  const __m256i pair = _mm256_set1_epi16(0x0110);
  // packus works per 128-bit lane; this puts the 32-bit groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // Chunks of blocks in two passes: first every block's absmax and tables, then the codes. A
  // block's tables wait on its absmax (a reduction); done for many blocks apart from the
  // encoding, those waits overlap instead of stalling each block.
  constexpr int64_t kChunk = 16;
  const int8_t* tabs[kChunk];  // nullptr: the f32 path
  int8_t ebs[kChunk];
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    int64_t c1 = std::min(b1, c0 + kChunk);
    int64_t bad = -1;
    for (int64_t b = c0; b < c1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = kLen != 0 ? kLen : std::min(blocksize, n - start);
      tabs[b - c0] = nullptr;
      if (len % 32 != 0 || start + len > n) {
        continue;  // a short last block: the f32 path checks it
      }
      // The block 4 chunks ahead into L1 (a hint: past the end it is dropped, never a fault);
      // 5% faster than the hardware prefetcher alone here.
      const char* ahead = reinterpret_cast<const char*>(x + start + 4 * kChunk * blocksize);
      for (int64_t off = 0; off < len * 2; off += 64) {
        _mm_prefetch(ahead + off, _MM_HINT_T0);
      }
      const uint32_t m_bits = absmax_bits_avx2<c10::BFloat16>(x + start, len);
      if (m_bits >= 0x7f800000u) {
        bad = b;  // encode the blocks before it, then report it
        c1 = b;
        break;
      }
      const int32_t h = static_cast<int32_t>(m_bits >> 16);
      const int32_t delta = (h >> 7) - 127;
      if (h == 0 || delta < C::kMinDelta || delta > C::kMaxDelta) {
        continue;
      }
      std::memcpy(absmax + b, &m_bits, sizeof m_bits);
      tabs[b - c0] = &table.t[(h >> 7) & 1 ? 0 : 1][h & 0x7f][0][0];
      ebs[b - c0] = static_cast<int8_t>((h >> 7) - C::kBelow);
    }
    for (int64_t b = c0; b < c1; ++b) {
      const int64_t start = b * blocksize;
      const c10::BFloat16* xb = x + start;
      uint8_t* out = packed + start / 2;
      const int8_t* tab = tabs[b - c0];
      if (tab == nullptr) {
        if (!quantize_block_avx2_wide<c10::BFloat16, QT>(xb, std::min(blocksize, n - start), out,
                                                         absmax + b)) {
          return b;
        }
        continue;
      }
      const __m256i base = pshufb_table(tab);
      const __m256i t1 = pshufb_table(tab + 16);
      const __m256i t2 = pshufb_table(tab + 32);
      const __m256i t3 = pshufb_table(tab + 48);
      const __m256i eb = _mm256_set1_epi8(ebs[b - c0]);
      const int64_t len = kLen != 0 ? kLen : std::min(blocksize, n - start);
      int64_t i = 0;
      for (; i + 64 <= len; i += 64) {
        const __m256i lo = _mm256_maddubs_epi16(octave_codes32<QT>(xb + i, eb, base, t1, t2, t3), pair);
        const __m256i hi =
            _mm256_maddubs_epi16(octave_codes32<QT>(xb + i + 32, eb, base, t1, t2, t3), pair);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), bytes);
      }
      if (i < len) {  // 32 left (blocksize 32, or a last block of 32 mod 64)
        const __m256i lo = _mm256_maddubs_epi16(octave_codes32<QT>(xb + i, eb, base, t1, t2, t3), pair);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, lo), order);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_castsi256_si128(bytes));
      }
    }
    if (bad >= 0) {
      return bad;
    }
  }
  return -1;
}
#endif

// Whether bf16 inputs of QT take quantize_blocks_bf16_octaves_avx2: AVX2 and F16C, tables that
// hold (always, for NF4 and FP4), and not turned off by NIBBLE_QUANT_F32_SEARCH=1 (which keeps the
// f32-compare kernel, for comparisons).
template <int32_t QT>
bool octave_path() {
#ifdef NIBBLE_X86
  static const bool yes = [] {
    const char* off = std::getenv("NIBBLE_QUANT_F32_SEARCH");
    const bool allowed = off == nullptr || *off == '\0' || std::strcmp(off, "0") == 0;
    return allowed && have_avx2() && octave_table<QT>().ok;
  }();
  return yes;
#else
  return false;
#endif
}

template <typename T, int32_t QT>
using BlockFn = bool (*)(const T*, int64_t, uint8_t*, float*);

template <typename T, int32_t QT>
BlockFn<T, QT> pick_quantize_block() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    return &quantize_block_avx2_wide<T, QT>;
  }
  if (__builtin_cpu_supports("avx2")) {
    return &quantize_block_avx2<T, QT>;
  }
#endif
  return &quantize_block_base<T, QT>;
}

template <typename T, int32_t QT>
void quantize_4bit_impl(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                        FirstBad& bad) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  static const BlockFn<T, QT> quantize_block_fn = pick_quantize_block<T, QT>();
  // Grain: enough blocks per task to amortise scheduling (about 16k elements).
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  // The first non-finite element of block b, offered to `bad`.
  const auto report = [&](int64_t b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min(blocksize, n - start);
    for (int64_t i = 0; i < len; ++i) {
      if (!std::isfinite(static_cast<float>(x[start + i]))) {
        bad.offer(start + i);
        return;
      }
    }
  };
#ifdef NIBBLE_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (octave_path<QT>()) {
      at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
        while (b0 < b1) {
          const int64_t failed =
              blocksize == 64
                  ? quantize_blocks_bf16_octaves_avx2<QT, 64>(x, n, blocksize, b0, b1, packed, absmax)
                  : quantize_blocks_bf16_octaves_avx2<QT, 0>(x, n, blocksize, b0, b1, packed, absmax);
          if (failed < 0) {
            break;
          }
          report(failed);
          b0 = failed + 1;
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      if (!quantize_block_fn(x + start, len, packed + start / 2, absmax + b)) {
        report(b);
      }
    }
  });
}

// Quantize `x` into preallocated outputs; on a non-finite input, *bad_index is its flat index.
void quantize_4bit_into(const at::Tensor& x, int64_t blocksize, int32_t qt, at::Tensor& packed,
                        at::Tensor& absmax, int64_t* bad_index) {
  check_blocksize(blocksize);
  TORCH_CHECK(qt == kNf4 || qt == kFp4, "unknown quant type ", qt);
  check_cpu_contiguous(x, "input");
  check_cpu_contiguous(packed, "packed");
  check_cpu_contiguous(absmax, "absmax");
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (n + 1) / 2,
              "packed must be uint8 with ", (n + 1) / 2, " elements, got ", packed.scalar_type(),
              " with ", packed.numel());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == nblocks,
              "absmax must be float32 with ", nblocks, " elements, got ", absmax.scalar_type(),
              " with ", absmax.numel());
  FirstBad bad;
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* a = absmax.data_ptr<float>();
  auto run = [&](auto* data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    if (qt == kNf4) {
      quantize_4bit_impl<T, kNf4>(data, n, blocksize, p, a, bad);
    } else {
      quantize_4bit_impl<T, kFp4>(data, n, blocksize, p, a, bad);
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      run(x.const_data_ptr<float>());
      break;
    case at::kHalf:
      run(x.const_data_ptr<c10::Half>());
      break;
    case at::kBFloat16:
      run(x.const_data_ptr<c10::BFloat16>());
      break;
    default:
      TORCH_CHECK(false, "cannot quantize ", x.scalar_type(),
                  " (use float32, float16 or bfloat16)");
  }
  const int64_t first = bad.index.load();
  if (first != std::numeric_limits<int64_t>::max()) {
    *bad_index = first;
  }
}

inline uint16_t to_bf16_bits(float f) {
  // c10::BFloat16's round_to_nearest_even (NaN becomes 0x7fc0).
  if (std::isnan(f)) {
    return 0x7fc0;
  }
  const uint32_t bits = float_bits(f);
  return static_cast<uint16_t>((bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16);
}

template <int32_t OUT>
inline auto convert_out(float v) {
  if constexpr (OUT == kOutF32) {
    return v;
  } else if constexpr (OUT == kOutF32Bf16) {
    return static_cast<float>(c10::BFloat16(v));
  } else if constexpr (OUT == kOutF32F16) {
    return static_cast<float>(c10::Half(v));
  } else if constexpr (OUT == kOutBf16) {
    return to_bf16_bits(v);
  } else {
    return c10::Half(v).x;
  }
}

// Per block, the 16 possible outputs `code[k] * absmax` (the same f32 products as per element,
// so exact) are rounded once into a small table; the inner loop is then two lookups per byte.
#ifdef NIBBLE_X86
// 16-bit outputs with SSSE3: the 16 table entries split into low and high bytes, looked up 16
// nibbles at a time with pshufb and interleaved back. Writes elements [0, 2 * (nbytes & ~15)).
__attribute__((target("ssse3"))) int64_t dequantize_16bit_ssse3(const uint8_t* p, int64_t nbytes,
                                                                const uint16_t* table,
                                                                uint16_t* o) {
  alignas(16) uint8_t lo[16];
  alignas(16) uint8_t hi[16];
  for (int k = 0; k < 16; ++k) {
    lo[k] = static_cast<uint8_t>(table[k] & 0xff);
    hi[k] = static_cast<uint8_t>(table[k] >> 8);
  }
  const __m128i lo_tbl = _mm_load_si128(reinterpret_cast<const __m128i*>(lo));
  const __m128i hi_tbl = _mm_load_si128(reinterpret_cast<const __m128i*>(hi));
  const __m128i mask = _mm_set1_epi8(0x0f);
  int64_t j = 0;
  for (; j + 16 <= nbytes; j += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
    const __m128i hn = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m128i ln = _mm_and_si128(v, mask);
    // Element 2j is the high nibble of byte j: interleave high, low.
    const __m128i idx[2] = {_mm_unpacklo_epi8(hn, ln), _mm_unpackhi_epi8(hn, ln)};
    for (int h = 0; h < 2; ++h) {
      const __m128i l = _mm_shuffle_epi8(lo_tbl, idx[h]);
      const __m128i u = _mm_shuffle_epi8(hi_tbl, idx[h]);
      __m128i* dst = reinterpret_cast<__m128i*>(o + 2 * j + 16 * h);
      _mm_storeu_si128(dst, _mm_unpacklo_epi8(l, u));
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi8(l, u));
    }
  }
  return 2 * j;
}

bool have_ssse3() {
  static const bool yes = __builtin_cpu_supports("ssse3");
  return yes;
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}

// The bf16 bits of 8 floats, one per 32-bit lane (low half): round to nearest even on the bits,
// as to_bf16_bits, and NaN becomes 0x7fc0.
__attribute__((target("avx2"), always_inline)) inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

// One whole block (len a multiple of 32) with AVX2, table included: the 16 products
// `code[k] * absmax` are formed and rounded in two vectors (the per-block scalar table cost as
// much as the lookups themselves at blocksize 64), then every 16 packed bytes become 32 outputs.
template <int32_t OUT>
__attribute__((target("avx2,f16c"))) void dequantize_block_avx2(const uint8_t* p, int64_t len,
                                                                const float* code, float am,
                                                                void* out) {
  const __m256 scale = _mm256_set1_ps(am);
  __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(code), scale);
  __m256 c1 = _mm256_mul_ps(_mm256_loadu_ps(code + 8), scale);
  const __m128i nib = _mm_set1_epi8(0x0f);
  if constexpr (OUT == kOutF32F16) {
    c0 = _mm256_cvtph_ps(_mm256_cvtps_ph(c0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    c1 = _mm256_cvtph_ps(_mm256_cvtps_ph(c1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if constexpr (OUT == kOutF32Bf16) {
    // The bf16 values as f32 (NaN stays NaN: 0x7fc0 becomes 0x7fc00000).
    c0 = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_avx2(c0), 16));
    c1 = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits_avx2(c1), 16));
  }
  if constexpr (OUT == kOutF32 || OUT == kOutF32Bf16 || OUT == kOutF32F16) {
    float* o = static_cast<float*>(out);
    for (int64_t j = 0; j < len / 2; j += 8) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
      const __m256i hi = _mm256_srli_epi32(b, 4);
      const __m256i lo = _mm256_and_si256(b, _mm256_set1_epi32(15));
      // Element 2j is the high nibble of byte j.
      const __m256i a = _mm256_unpacklo_epi32(hi, lo);
      const __m256i c = _mm256_unpackhi_epi32(hi, lo);
      const __m256i idx[2] = {_mm256_permute2x128_si256(a, c, 0x20),
                              _mm256_permute2x128_si256(a, c, 0x31)};
      for (int h = 0; h < 2; ++h) {
        const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx[h], 28));
        const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c0, idx[h]),
                                          _mm256_permutevar8x32_ps(c1, idx[h]), pick);
        _mm256_storeu_ps(o + 2 * j + 8 * h, v);
      }
    }
    return;
  } else {
    __m256i r[2];
    const __m256 c[2] = {c0, c1};
    for (int h = 0; h < 2; ++h) {
      if constexpr (OUT == kOutBf16) {
        r[h] = bf16_bits_avx2(c[h]);
      } else {
        // F16C rounds to nearest even like c10::Half; NaN is made c10's 0x7e00.
        const __m256 nan = _mm256_cmp_ps(c[h], c[h], _CMP_UNORD_Q);
        const __m256i half = _mm256_cvtepu16_epi32(
            _mm256_cvtps_ph(c[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        r[h] = _mm256_blendv_epi8(half, _mm256_set1_epi32(0x7e00), _mm256_castps_si256(nan));
      }
    }
    // 16 words in order, then their low and high bytes as two pshufb tables in both lanes.
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
    const __m256i split = _mm256_shuffle_epi8(
        words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6,
                                8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    const __m128i s0 = _mm256_castsi256_si128(split);
    const __m128i s1 = _mm256_extracti128_si256(split, 1);
    const __m256i lo_tbl = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(s0, s1));
    const __m256i hi_tbl = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(s0, s1));
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t j = 0; j < len / 2; j += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
      const __m128i hn = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
      const __m128i ln = _mm_and_si128(v, nib);
      const __m256i idx =
          _mm256_set_m128i(_mm_unpackhi_epi8(hn, ln), _mm_unpacklo_epi8(hn, ln));
      const __m256i l = _mm256_shuffle_epi8(lo_tbl, idx);
      const __m256i u = _mm256_shuffle_epi8(hi_tbl, idx);
      const __m256i a = _mm256_unpacklo_epi8(l, u);  // elements 0..7 | 16..23
      const __m256i b = _mm256_unpackhi_epi8(l, u);  // elements 8..15 | 24..31
      __m256i* dst = reinterpret_cast<__m256i*>(o + 2 * j);
      _mm256_storeu_si256(dst, _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(a, b, 0x31));
    }
  }
}
#endif

template <int32_t OUT>
void dequantize_4bit_impl(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                          int32_t qt, void* out_ptr) {
  using O = decltype(convert_out<OUT>(0.0f));
  const float* code = qt == kNf4 ? kNf4Code : kFp4Code;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t grain = std::max<int64_t>(1, 32768 / blocksize);
#ifdef NIBBLE_X86
  const bool ssse3 = have_ssse3();
  const bool avx2 = have_avx2();
#endif
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    O table[16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float am = absmax[b];
#ifdef NIBBLE_X86
      if (avx2 && len % 32 == 0) {
        dequantize_block_avx2<OUT>(packed + start / 2, len, code, am,
                                   static_cast<O*>(out_ptr) + start);
        continue;
      }
#endif
      for (int k = 0; k < 16; ++k) {
        table[k] = convert_out<OUT>(code[k] * am);
      }
      const uint8_t* p = packed + start / 2;
      O* o = static_cast<O*>(out_ptr) + start;
      const int64_t pairs = len / 2;
      int64_t done = 0;
#ifdef NIBBLE_X86
      if constexpr (OUT == kOutBf16 || OUT == kOutF16) {
        if (ssse3) {
          done = dequantize_16bit_ssse3(p, pairs, table, o) / 2;
        }
      }
#endif
      for (int64_t j = done; j < pairs; ++j) {
        const uint8_t byte = p[j];
        o[2 * j] = table[byte >> 4];
        o[2 * j + 1] = table[byte & 15];
      }
      if (len % 2 == 1) {
        o[len - 1] = table[p[pairs] >> 4];
      }
    }
  });
}

// Dequantize into `out` (contiguous CPU, f32/f16/bf16, out.numel() elements).
// With a float32 `out`, `round_to` (bfloat16 or float16) makes the values those of that dtype.
void dequantize_4bit_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                          int32_t qt, at::Tensor& out,
                          at::ScalarType round_to = at::ScalarType::Undefined) {
  check_blocksize(blocksize);
  TORCH_CHECK(qt == kNf4 || qt == kFp4, "unknown quant type ", qt);
  check_cpu_contiguous(packed, "packed");
  check_cpu_contiguous(absmax, "absmax");
  check_cpu_contiguous(out, "out");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ",
              absmax.scalar_type());
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed bytes: expected ", (n + 1) / 2,
              " elements, got ", packed.numel());
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, "absmax: expected ", nblocks, " elements, got ",
              absmax.numel());
  if (n == 0) {
    return;
  }
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* a = absmax.const_data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat:
      if (round_to == at::kBFloat16) {
        dequantize_4bit_impl<kOutF32Bf16>(p, a, n, blocksize, qt, out.data_ptr());
      } else if (round_to == at::kHalf) {
        dequantize_4bit_impl<kOutF32F16>(p, a, n, blocksize, qt, out.data_ptr());
      } else {
        dequantize_4bit_impl<kOutF32>(p, a, n, blocksize, qt, out.data_ptr());
      }
      break;
    case at::kBFloat16:
      dequantize_4bit_impl<kOutBf16>(p, a, n, blocksize, qt, out.data_ptr());
      break;
    case at::kHalf:
      dequantize_4bit_impl<kOutF16>(p, a, n, blocksize, qt, out.data_ptr());
      break;
    default:
      TORCH_CHECK(false, "cannot dequantize to ", out.scalar_type(),
                  " (use float32, float16 or bfloat16)");
  }
}

at::Tensor dequantize_4bit_tensor(const at::Tensor& packed, const at::Tensor& absmax, int64_t n,
                                  int64_t blocksize, int32_t qt, at::ScalarType out_type) {
  TORCH_CHECK(n >= 0, "element count ", n, " is negative");
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kHalf || out_type == at::kBFloat16,
              "cannot dequantize to ", out_type, " (use float32, float16 or bfloat16)");
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(out_type));
  dequantize_4bit_into(packed, absmax, blocksize, qt, out);
  return out;
}

at::ScalarType out_type_of(int32_t out) {
  switch (out) {
    case kOutF32:
      return at::kFloat;
    case kOutF16:
      return at::kHalf;
    case kOutBf16:
      return at::kBFloat16;
    default:
      TORCH_CHECK(false, "unknown output dtype code ", out);
  }
}

// codec.rs `encode_8bit`: seven halving steps from the middle of a sorted 256-entry map, then
// the nearer of the two bracketing codes.
inline uint8_t encode_8bit(const float* code, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) {
    upper = code[255];
  }
  if (lower_pivot == 0) {
    lower = code[0];
  }
  int idx;
  if (x > val) {
    const float mid = (upper + val) * 0.5f;
    idx = x > mid ? upper_pivot : pivot;
  } else {
    const float mid = (lower + val) * 0.5f;
    idx = x < mid ? lower_pivot : pivot;
  }
  return static_cast<uint8_t>(idx);
}

// The CUDA dequantize of csrc/cuda/ (quant's `cuda` feature). This file is built without CUDA,
// so the kernels' entry point is handed over at run time by the Rust side
// (`nibble_register_cuda_dequantize`, called before the first 4-bit layer runs on a GPU).
using CudaDequantize4bit = char* (*)(const at::Tensor*, const at::Tensor*, const at::Tensor*,
                                     const at::Tensor*, float, int64_t, int64_t, int32_t, int32_t,
                                     at::Tensor**);
std::atomic<CudaDequantize4bit> g_cuda_dequantize_4bit{nullptr};

// A new CUDA tensor of `n` dequantized values (plain f32 absmax), through the registered kernels.
at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t n,
                                int64_t blocksize, int32_t qt, at::ScalarType dtype) {
  const CudaDequantize4bit f = g_cuda_dequantize_4bit.load();
  TORCH_CHECK(f != nullptr, "4-bit weight on ", packed.device(),
              ", but nibble's quant crate was built without its `cuda` feature (CUDA kernels)");
  const int32_t out = dtype == at::kFloat ? kOutF32 : dtype == at::kHalf ? kOutF16 : kOutBf16;
  at::Tensor* result = nullptr;
  char* err = f(&packed, &absmax, nullptr, nullptr, 0.0f, n, blocksize, qt, out, &result);
  if (err != nullptr) {
    const std::string msg(err);
    std::free(err);
    TORCH_CHECK(false, msg);
  }
  at::Tensor w = std::move(*result);
  delete result;
  return w;
}

// Per-thread dequantize buffers in turn, and the bytes they may hold together beyond the
// largest layer's: writing a weight into the buffer the previous product has just read took 3-4
// times as long as into one last used several products ago (a 134M bf16 step: 46-55 ms of
// dequantize with one buffer, 19-23 ms with four, 16-17 with eight; docs/benchmarks.md), the
// lines that product's threads still held being taken back first.
constexpr int64_t kScratchRing = 4;
constexpr int64_t kScratchRingBytes = 32 << 20;

// The weight of a Linear4bit for one matmul, dequantized into one of a few per-thread buffers
// (kScratchRing, fewer for layers over kScratchRingBytes / kScratchRing) that grow to the layers
// they serve and are reused in turn: a fresh tensor per call would be fresh memory, and on Linux
// a large one comes from mmap, whose page faults cost several times the dequantization itself
// (docs/benchmarks.md). The result stays valid until the same thread has dequantized as many
// times again as there are buffers (at least once more), which is fine for the synchronous CPU
// matmuls below: nothing keeps it.
at::Tensor dequantize_4bit_scratch(const at::Tensor& packed, const at::Tensor& absmax,
                                   int64_t out_features, int64_t in_features, int64_t blocksize,
                                   int32_t qt, at::ScalarType dtype, at::ScalarType round_to) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "cannot dequantize to ", dtype, " (use float32, float16 or bfloat16)");
  if (packed.is_cuda()) {
    return dequantize_4bit_cuda(packed, absmax, out_features * in_features, blocksize, qt, dtype)
        .view({out_features, in_features});
  }
  TORCH_CHECK(packed.device().is_cpu(), "4-bit weight on ", packed.device(),
              ": only CPU and CUDA are supported");
  thread_local std::array<at::Tensor, kScratchRing> ring;
  thread_local int64_t turn = 0;
  const int64_t bytes = out_features * in_features * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t depth = std::clamp<int64_t>(kScratchRingBytes / std::max<int64_t>(bytes, 1), 1, kScratchRing);
  at::Tensor& buffer = ring[turn % depth];
  turn = (turn + 1) % kScratchRing;
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::Tensor();  // free the old one first
    buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  at::Tensor w = buffer.narrow(0, 0, bytes).view(dtype).view({out_features, in_features});
  dequantize_4bit_into(packed, absmax, blocksize, qt, w, round_to);
  return w;
}

// `t` on `device`: itself when it is there already, else a copy (asynchronous from pinned host
// memory, ordered before the kernels that follow on the current stream).
at::Tensor on_device(const at::Tensor& t, const at::Device& device) {
  return t.device() == device ? t : t.to(device, /*non_blocking=*/true);
}

// Linear4bit: y = x W^T (+ b) with W dequantized on the fly; only the packed weight and its
// absmax (tensors the layer holds anyway) are saved, and backward dequantizes again. A weight
// stored on another device than x (CPU offload: codes in host memory, compute on the GPU) is
// copied to x's device for each product and only the stored tensors are saved, so between
// forward and backward the GPU holds none of it.
struct Linear4bitFn : public torch::autograd::Function<Linear4bitFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& bias, int64_t out_features,
                            int64_t in_features,
                            int64_t blocksize, int64_t qt, int64_t round_to) {
    // round_to >= 0: x is float32 standing in for a 16-bit compute dtype, whose weight values
    // the f32 matmul then uses.
    const auto rt = round_to < 0 ? at::ScalarType::Undefined : static_cast<at::ScalarType>(round_to);
    at::Tensor w =
        dequantize_4bit_scratch(on_device(packed, x.device()), on_device(absmax, x.device()),
                                out_features, in_features, blocksize, static_cast<int32_t>(qt),
                                x.scalar_type(), rt);
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor y = has_bias ? at::linear(x, w, *bias) : at::linear(x, w);
    ctx->save_for_backward({packed, absmax});
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["qt"] = qt;
    ctx->saved_data["round_to"] = round_to;
    ctx->saved_data["has_bias"] = has_bias;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t out_features = ctx->saved_data["out_features"].toInt();
    const int64_t in_features = ctx->saved_data["in_features"].toInt();
    const at::Tensor& g = grads[0];
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      at::Tensor w = dequantize_4bit_scratch(
          on_device(saved[0], g.device()), on_device(saved[1], g.device()), out_features,
          in_features, ctx->saved_data["blocksize"].toInt(),
          static_cast<int32_t>(ctx->saved_data["qt"].toInt()), g.scalar_type(),
          ctx->saved_data["round_to"].toInt() < 0
              ? at::ScalarType::Undefined
              : static_cast<at::ScalarType>(ctx->saved_data["round_to"].toInt()));
      // Same ops as autograd through at::linear: a 2-D matmul on the flattened batch.
      auto sizes = g.sizes().vec();
      sizes.back() = in_features;
      grad_x = at::mm(g.reshape({-1, out_features}), w).view(sizes);
    }
    at::Tensor grad_b;
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_b = g.reshape({-1, out_features}).sum(0);
    }
    return {grad_x,       at::Tensor(), at::Tensor(), grad_b, at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Bytes of f32 weight a frozen dense upcast linear converts at once: the output head of a 32k
// vocabulary is 98 MiB in f32 at hidden 768 (1 GiB at 128k x 4096), so the weight is upcast and
// multiplied in slabs of output rows instead of as one f32 copy.
constexpr int64_t kUpcastSlabBytes = 8 << 20;

// Rows of `weight` per slab of at most kUpcastSlabBytes in f32.
int64_t upcast_slab_rows(const at::Tensor& weight) {
  return std::max<int64_t>(1, kUpcastSlabBytes / (4 * std::max<int64_t>(1, weight.size(1))));
}

// A frozen dense linear whose 16-bit matmuls run in f32 (x and W upcast, one rounding of the
// result back): on CPUs without native bf16/f16 GEMMs torch's 16-bit products run one to two
// orders of magnitude slower than f32 ones (docs/benchmarks.md). Saves only the 16-bit weight
// (alive anyway), not its f32 copy; forward and backward upcast it again slab by slab, so no
// f32 copy of the whole weight ever exists.
struct DenseUpcastFn : public torch::autograd::Function<DenseUpcastFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    const bool has_bias = bias.has_value() && bias->defined();
    const int64_t out_features = weight.size(0);
    const at::Tensor xf = x.reshape({-1, weight.size(1)}).to(at::kFloat);
    auto sizes = x.sizes().vec();
    sizes.back() = out_features;
    at::Tensor y = at::empty({xf.size(0), out_features}, x.options());
    const int64_t rows = upcast_slab_rows(weight);
    for (int64_t start = 0; start < out_features; start += rows) {
      const int64_t len = std::min(rows, out_features - start);
      const at::Tensor wf = weight.narrow(0, start, len).to(at::kFloat);
      at::Tensor part = has_bias ? at::addmm(bias->narrow(0, start, len).to(at::kFloat), xf, wf.t())
                                 : at::mm(xf, wf.t());
      // One rounding of each f32 result to x's dtype, as `.to(dtype)` of the whole product.
      y.narrow(1, start, len).copy_(part);
    }
    ctx->save_for_backward({weight});
    ctx->saved_data["has_bias"] = has_bias;
    return y.view(sizes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& w = saved[0];
    const at::Tensor& g = grads[0];
    const int64_t out_features = w.size(0);
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      auto sizes = g.sizes().vec();
      sizes.back() = w.size(1);
      const at::Tensor gf = g.reshape({-1, out_features}).to(at::kFloat);
      const int64_t rows = upcast_slab_rows(w);
      at::Tensor acc;
      for (int64_t start = 0; start < out_features; start += rows) {
        const int64_t len = std::min(rows, out_features - start);
        const at::Tensor wf = w.narrow(0, start, len).to(at::kFloat);
        const at::Tensor gs = gf.narrow(1, start, len);
        if (!acc.defined()) {
          acc = at::mm(gs, wf);
        } else {
          acc.addmm_(gs, wf);
        }
      }
      grad_x = acc.to(g.scalar_type()).view(sizes);
    }
    at::Tensor grad_b;
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_b = g.reshape({-1, out_features}).to(at::kFloat).sum(0).to(g.scalar_type());
    }
    return {grad_x, at::Tensor(), grad_b};
  }
};

// A linear whose weight is wider than its input (a LoRA factor in f32 on bf16 activations, as
// PEFT computes it): y = x.to(w) W^T. Plain autograd would save the f32 copy of x for the
// weight's gradient; this saves x itself (often alive anyway: the base layer's input) and
// upcasts it again in backward. Same matmuls as autograd through at::linear.
struct UpcastInputLinearFn : public torch::autograd::Function<UpcastInputLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight) {
    auto sizes = x.sizes().vec();
    sizes.back() = weight.size(0);
    const at::Tensor xf = x.reshape({-1, weight.size(1)}).to(weight.scalar_type());
    at::Tensor y = at::mm(xf, weight.t());
    ctx->save_for_backward({x, weight});
    return y.view(sizes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor g = grads[0].reshape({-1, w.size(0)});
    at::Tensor grad_x;
    at::Tensor grad_w;
    if (ctx->needs_input_grad(0)) {
      grad_x = at::mm(g, w).to(x.scalar_type()).view(x.sizes());
    }
    if (ctx->needs_input_grad(1)) {
      grad_w = at::mm(g.t(), x.reshape({-1, w.size(1)}).to(w.scalar_type()));
    }
    return {grad_x, grad_w};
  }
};

}  // namespace

extern "C" {

void nibble_quant_free_error(char* err) { std::free(err); }

// 1 if bf16 inputs of quant type qt quantize on the octave-table kernel (see octave_path), else 0.
int32_t nibble_quantize_bf16_octaves(int32_t qt) {
  return (qt == kNf4 ? octave_path<kNf4>() : qt == kFp4 && octave_path<kFp4>()) ? 1 : 0;
}

// Hands the CUDA kernels' 4-bit dequantize to the quantized linears (see CudaDequantize4bit).
void nibble_register_cuda_dequantize(CudaDequantize4bit f) { g_cuda_dequantize_4bit.store(f); }

// 4-bit quantization of any contiguous f32/f16/bf16 CPU tensor, flattened. On a non-finite
// input, returns no error but sets *bad_index to its flat index (else -1) and no tensors.
char* nibble_quantize_4bit(const at::Tensor* input, int64_t blocksize, int32_t qt,
                           at::Tensor** packed_out, at::Tensor** absmax_out, int64_t* bad_index) {
  return guarded([&] {
    *packed_out = nullptr;
    *absmax_out = nullptr;
    *bad_index = -1;
    check_blocksize(blocksize);
    const int64_t n = input->numel();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    at::Tensor packed = at::empty({(n + 1) / 2, 1}, at::TensorOptions().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, at::TensorOptions().dtype(at::kFloat));
    quantize_4bit_into(*input, blocksize, qt, packed, absmax, bad_index);
    if (*bad_index < 0) {
      *packed_out = new at::Tensor(std::move(packed));
      *absmax_out = new at::Tensor(std::move(absmax));
    }
  });
}

// Same, into existing contiguous CPU tensors: `packed` uint8 of (n + 1) / 2 elements, `absmax`
// float32 of one per block (their shapes are kept). On a non-finite input their contents are
// unspecified.
char* nibble_quantize_4bit_into(const at::Tensor* input, int64_t blocksize, int32_t qt,
                                at::Tensor* packed, at::Tensor* absmax, int64_t* bad_index) {
  return guarded([&] {
    *bad_index = -1;
    quantize_4bit_into(*input, blocksize, qt, *packed, *absmax, bad_index);
  });
}

// Dequantize n 4-bit values to float32 (0), float16 (1) or bfloat16 (2): code * absmax in f32,
// then rounded to nearest even. Returns a 1-D tensor of n elements.
char* nibble_dequantize_4bit(const at::Tensor* packed, const at::Tensor* absmax, int64_t n,
                             int64_t blocksize, int32_t qt, int32_t out, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    at::Tensor t = dequantize_4bit_tensor(*packed, *absmax, n, blocksize, qt, out_type_of(out));
    *result = new at::Tensor(std::move(t));
  });
}

// Same, into an existing contiguous CPU tensor whose dtype (f32/f16/bf16) and element count
// say what to write; its shape is kept.
char* nibble_dequantize_4bit_into(const at::Tensor* packed, const at::Tensor* absmax,
                                  int64_t blocksize, int32_t qt, at::Tensor* out) {
  return guarded([&] { dequantize_4bit_into(*packed, *absmax, blocksize, qt, *out); });
}

// Blockwise 8-bit quantization of a contiguous f32 CPU tensor with a 256-entry sorted map, after
// subtracting an offset. With use_mean != 0 the offset is torch's own `input.mean()` (how
// bitsandbytes takes it for double quantization), else `*offset` as given; either way `*offset`
// holds the offset used. A non-finite x or x - offset is reported as in nibble_quantize_4bit.
char* nibble_quantize_8bit(const at::Tensor* input, const at::Tensor* code, int64_t blocksize,
                           int32_t use_mean, float* offset, at::Tensor** codes_out,
                           at::Tensor** absmax_out, int64_t* bad_index) {
  return guarded([&] {
    *codes_out = nullptr;
    *absmax_out = nullptr;
    *bad_index = -1;
    check_blocksize(blocksize);
    const at::Tensor& x = *input;
    check_cpu_contiguous(x, "input");
    check_cpu_contiguous(*code, "code");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "input must be float32, got ", x.scalar_type());
    TORCH_CHECK(code->scalar_type() == at::kFloat && code->numel() == 256,
                "code must be 256 float32 values");
    const int64_t n = x.numel();
    const float* xs = x.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(xs[i])) {
        *bad_index = i;
        return;
      }
    }
    if (use_mean != 0) {
      *offset = n == 0 ? std::numeric_limits<float>::quiet_NaN() : x.mean().item<float>();
    }
    const float off = *offset;
    // What is quantized is x - offset (as in codec.rs): it must be finite too (near f32::MAX the
    // mean or the difference overflows).
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(xs[i] - off)) {
        *bad_index = i;
        return;
      }
    }
    const float* map = code->const_data_ptr<float>();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    at::Tensor q = at::empty({n}, at::TensorOptions().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, at::TensorOptions().dtype(at::kFloat));
    uint8_t* qs = q.data_ptr<uint8_t>();
    float* as = absmax.data_ptr<float>();
    at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        float m = 0.0f;
        for (int64_t i = 0; i < len; ++i) {
          const float a = std::fabs(xs[start + i] - off);
          m = a > m ? a : m;
        }
        as[b] = m;
        const float scale = 1.0f / m;
        for (int64_t i = 0; i < len; ++i) {
          qs[start + i] = encode_8bit(map, (xs[start + i] - off) * scale);
        }
      }
    });
    *codes_out = new at::Tensor(std::move(q));
    *absmax_out = new at::Tensor(std::move(absmax));
  });
}

// Inverse of nibble_quantize_8bit: float32 `code[q] * absmax[block] + offset` (two roundings).
char* nibble_dequantize_8bit(const at::Tensor* codes, const at::Tensor* absmax,
                             const at::Tensor* code, int64_t blocksize, float offset,
                             at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    check_blocksize(blocksize);
    check_cpu_contiguous(*codes, "codes");
    check_cpu_contiguous(*absmax, "nested absmax");
    check_cpu_contiguous(*code, "code");
    TORCH_CHECK(codes->scalar_type() == at::kByte, "codes must be uint8");
    TORCH_CHECK(absmax->scalar_type() == at::kFloat, "nested absmax must be float32");
    TORCH_CHECK(code->scalar_type() == at::kFloat && code->numel() == 256,
                "code must be 256 float32 values");
    const int64_t n = codes->numel();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    TORCH_CHECK(absmax->numel() == nblocks, "nested absmax: expected ", nblocks,
                " elements, got ", absmax->numel());
    at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    const uint8_t* qs = codes->const_data_ptr<uint8_t>();
    const float* as = absmax->const_data_ptr<float>();
    const float* map = code->const_data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float v = map[qs[i]] * as[i / blocksize];
        o[i] = v + offset;
      }
    });
    *result = new at::Tensor(std::move(out));
  });
}

// Linear4bit forward through the autograd Function above: x [..., in] in the compute dtype (or
// float32 with round_to = 1 / 2 when the compute dtype is float16 / bfloat16 but the matmuls run
// in f32 on the weight's values in that dtype; -1 otherwise),
// packed/absmax the 4-bit weight [out, in], bias [out] or null. The result carries a grad_fn
// whenever x (or bias) requires grad.
char* nibble_linear4bit_forward(const at::Tensor* x, const at::Tensor* packed,
                                const at::Tensor* absmax, const at::Tensor* bias,
                                int64_t out_features, int64_t in_features, int64_t blocksize,
                                int32_t qt, int32_t round_to, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(x->size(-1) == in_features, "input has ", x->size(-1),
                " features in its last dimension, the layer expects ", in_features);
    TORCH_CHECK(round_to < 0 || x->scalar_type() == at::kFloat,
                "rounding the weight to a 16-bit dtype needs a float32 input");
    std::optional<at::Tensor> b;
    if (bias != nullptr) {
      b = *bias;
    }
    const int64_t rt = round_to < 0 ? -1 : static_cast<int64_t>(out_type_of(round_to));
    at::Tensor y = Linear4bitFn::apply(*x, *packed, *absmax, b, out_features, in_features,
                                       blocksize, static_cast<int64_t>(qt), rt);
    *result = new at::Tensor(std::move(y));
  });
}

// Whether this CPU has native 16-bit GEMMs for `out` (1: f16, 2: bf16): AVX512-BF16/AMX-BF16,
// AVX512-FP16/AMX-FP16. Anything else (AVX2 machines, non-x86) answers 0.
int32_t nibble_cpu_native_16bit_matmul(int32_t out) {
#ifdef NIBBLE_X86
  if (out == kOutBf16) {
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16") ? 1 : 0;
  }
  if (out == kOutF16) {
    return __builtin_cpu_supports("avx512fp16") ? 1 : 0;
  }
#endif
  (void)out;
  return 0;
}

// DenseUpcastFn: y = (x W^T + b) computed in f32 and returned in x's dtype; the weight must not
// require grad (the caller uses plain ops for trainable weights).
char* nibble_dense_upcast_forward(const at::Tensor* x, const at::Tensor* weight,
                                  const at::Tensor* bias, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(!weight->requires_grad(), "weight must be frozen for the upcast linear");
    TORCH_CHECK(x->size(-1) == weight->size(1), "input has ", x->size(-1),
                " features in its last dimension, the layer expects ", weight->size(1));
    std::optional<at::Tensor> b;
    if (bias != nullptr) {
      b = *bias;
    }
    at::Tensor y = DenseUpcastFn::apply(*x, *weight, b);
    *result = new at::Tensor(std::move(y));
  });
}

// UpcastInputLinearFn: x.to(w.dtype) W^T, saving x (not its upcast copy) for backward.
char* nibble_upcast_input_linear(const at::Tensor* x, const at::Tensor* weight,
                                 at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(weight->dim() == 2, "weight must be 2-D, got ", weight->dim(), " dimensions");
    TORCH_CHECK(x->size(-1) == weight->size(1), "input has ", x->size(-1),
                " features in its last dimension, the layer expects ", weight->size(1));
    at::Tensor y = UpcastInputLinearFn::apply(*x, *weight);
    *result = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
