// Scaled dot-product attention of bf16 heads on a CPU with AVX512-BF16, forward and backward as
// one autograd Function, for what a causal LM's training step asks: no mask beyond causality,
// no dropout, grouped-query heads allowed.
//
// Why: torch's CPU flash attention multiplies its bf16 blocks through MKL's bf16 GEMM, which on
// CPUs MKL does not dispatch natively (AMD Zen 4 and 5, which have AVX512-BF16 but no AMX)
// converts both sides to f32 and runs the generic sgemm: 8-10% of a 134M QLoRA step, about five
// times what the same products take as oneDNN bf16 GEMMs (docs/benchmarks.md, issue 23). Here
// every product is `vdpbf16ps` over operands packed in pairs, in one pass per query block.
//
// Numerics, as torch's flash kernel computes them for blocks that hold all keys (sequences up to
// its 512-key block): scores in f32 from bf16 products, softmax in f32 with the row max
// subtracted, exp values rounded to bf16 for the product with V, the f32 sum of the unrounded
// values dividing the output. Backward recomputes the probabilities from the saved log-sum-exp;
// the score gradient enters its two products as two bf16 parts (about 16 bits).
// So: float noise from torch's bits, never more; nibble takes this path only where the
// `cpu_matmul` policy is not `native`.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/torch.h>

#include "ffi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NIBBLE_ATTN_X86 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace {

using nibble::guarded;

// The widest head the kernels take (sixteen 16-lane groups).
constexpr int64_t kMaxHeadDim = 256;

bool kernels_available() {
#ifdef NIBBLE_ATTN_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

#ifdef NIBBLE_ATTN_X86
#define NIBBLE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define NIBBLE_BF16_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), always_inline)) inline

using bf16 = c10::BFloat16;

// Query rows per block: the unit of work between packing and the softmax.
constexpr int64_t kQueryBlock = 32;

inline __mmask16 tail_mask(int64_t len) {
  return len >= 16 ? static_cast<__mmask16>(0xffff)
                   : (len <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << len) - 1));
}

inline uint16_t bits(bf16 v) { return v.x; }

// Round to bf16, nearest even (NaN stays NaN, 0x7fc0).
NIBBLE_BF16_INLINE __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

NIBBLE_BF16_INLINE __m512 load_bf16(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// exp(x) in f32 (Cephes' polynomial, about 1 ulp), arguments clamped to f32's range.
NIBBLE_BF16_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// A panel packed for `vdpbf16ps`: B [K, N] as [ceil(K/2)][ceil(N/16)][16][2], element (k, n) at
// ((k/2) * groups + n/16) * 32 + (n%16) * 2 + k%2, zeros past K and N (written by the packers).
struct Packed {
  std::vector<uint16_t> data;
  int64_t k = 0, n = 0, groups = 0, pairs = 0;

  void resize(int64_t k_, int64_t n_) {
    k = k_;
    n = n_;
    groups = (n + 15) / 16;
    pairs = (k + 1) / 2;
    // No zero fill: both packers write every element, their pads included.
    const size_t len = static_cast<size_t>(pairs * groups * 32);
    if (data.size() < len) {
      data.resize(len);
    }
  }
};

// B = rows [K, N] of a row-major source with row stride `ld` (B[k][n] = src[k * ld + n]).
NIBBLE_BF16 void pack_rows(const bf16* src, int64_t ld, int64_t k_dim, int64_t n_dim, Packed& out) {
  out.resize(k_dim, n_dim);
  for (int64_t p = 0; p < out.pairs; ++p) {
    const bf16* r0 = src + 2 * p * ld;
    const bool second = 2 * p + 1 < k_dim;
    for (int64_t g = 0; g < out.groups; ++g) {
      const __mmask16 m = tail_mask(n_dim - 16 * g);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + 16 * g));
      const __m512i hi = second ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + ld + 16 * g))
                                : _mm512_setzero_si512();
      _mm512_storeu_si512(out.data.data() + (p * out.groups + g) * 32,
                          _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// B = the transpose of rows [N, K] with row stride `ld` (B[k][n] = src[n * ld + k]), K even:
// each pair is one 32-bit element of its row, gathered 16 rows at a time.
NIBBLE_BF16 void pack_cols(const bf16* src, int64_t ld, int64_t n_dim, int64_t k_dim, Packed& out) {
  out.resize(k_dim, n_dim);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i rows = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(ld)));
  for (int64_t g = 0; g < out.groups; ++g) {
    const __mmask16 m = tail_mask(n_dim - 16 * g);
    const bf16* base = src + 16 * g * ld;
    uint16_t* d = out.data.data() + g * 32;
    for (int64_t p = 0; p < out.pairs; ++p, d += out.groups * 32) {
      // Element offsets in bf16 units, scaled by 2 bytes.
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, base + 2 * p, 2);
      _mm512_storeu_si512(d, v);
    }
  }
}

// C[MR rows, NR groups of 16 from group g0] (=, or += with ACC) A[MR, 2 * pairs] B; A row-major
// bf16 with row stride lda (its pairs read whole), only columns below `n_left` (from g0) written.
template <int MR, int NR, bool ACC>
NIBBLE_BF16_INLINE void micro(const bf16* a, int64_t lda, const Packed& b, int64_t pairs, int64_t g0, float* c,
                              int64_t ldc, int64_t n_left) {
  __m512 acc[MR][NR];
  __mmask16 m[NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    m[j] = tail_mask(n_left - 16 * j);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      acc[i][j] = ACC ? _mm512_maskz_loadu_ps(m[j], c + i * ldc + 16 * j) : _mm512_setzero_ps();
    }
  }
  const uint16_t* bp = b.data.data() + g0 * 32;
  for (int64_t p = 0; p < pairs; ++p, bp += b.groups * 32) {
    __m512bh bv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      bv[j] = (__m512bh)_mm512_loadu_si512(bp + 32 * j);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      _mm512_mask_storeu_ps(c + i * ldc + 16 * j, m[j], acc[i][j]);
    }
  }
}

template <int MR, bool ACC>
NIBBLE_BF16 void micro_rows(const bf16* a, int64_t lda, const Packed& b, int64_t n, int64_t pairs, float* c,
                            int64_t ldc) {
  const int64_t groups = (n + 15) / 16;
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) {
    micro<MR, 4, ACC>(a, lda, b, pairs, g, c + 16 * g, ldc, n - 16 * g);
  }
  switch (groups - g) {
    case 3: micro<MR, 3, ACC>(a, lda, b, pairs, g, c + 16 * g, ldc, n - 16 * g); break;
    case 2: micro<MR, 2, ACC>(a, lda, b, pairs, g, c + 16 * g, ldc, n - 16 * g); break;
    case 1: micro<MR, 1, ACC>(a, lda, b, pairs, g, c + 16 * g, ldc, n - 16 * g); break;
    default: break;
  }
}

// C [m, n] (=, or += with ACC) A [m, 2 * pairs] B[:2 * pairs, :n]: A bf16 row-major (stride
// lda), C f32 (stride ldc), n and pairs within B's packing.
template <bool ACC>
void gemm(const bf16* a, int64_t lda, int64_t m, const Packed& b, int64_t n, int64_t pairs, float* c,
          int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    micro_rows<4, ACC>(a + i * lda, lda, b, n, pairs, c + i * ldc, ldc);
  }
  switch (m - i) {
    case 3: micro_rows<3, ACC>(a + i * lda, lda, b, n, pairs, c + i * ldc, ldc); break;
    case 2: micro_rows<2, ACC>(a + i * lda, lda, b, n, pairs, c + i * ldc, ldc); break;
    case 1: micro_rows<1, ACC>(a + i * lda, lda, b, n, pairs, c + i * ldc, ldc); break;
    default: break;
  }
}

// A [B, heads, T, D] bf16 tensor's elements by strides (the last dimension contiguous).
template <typename P>
struct Heads {
  P* p;
  int64_t sb, sh, st;
  Heads(P* p_, const at::Tensor& t) : p(p_), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  P* at(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};
using In = Heads<const bf16>;
using Out = Heads<bf16>;

struct Shape {
  int64_t batch, heads, kv_heads, tq, tk, dim;
  bool causal;
  float scale;
  // Keys query i sees (causal: the last query sees every key).
  int64_t keys_of(int64_t i) const { return causal ? std::min(tk, i + (tk - tq) + 1) : tk; }
};

// Keys padded to an even count: probability rows are read in pairs.
inline int64_t even(int64_t n) { return (n + 1) & ~int64_t{1}; }

// One query block's probabilities from its f32 scores `s` [rows, ld]: p = exp(scale s - shift)
// on each row's keys, 0 after them, written back to `s` in f32 and rounded into `p16` [rows, ld].
// Forward: the shift is the row max, `lse` gets max + log(sum), `inv` 1 / sum. Backward: the
// shift is the saved log-sum-exp, `saved`.
template <bool FORWARD>
NIBBLE_BF16 void softmax_rows(const Shape& sh, int64_t q0, int64_t rows, float* s, int64_t ld, bf16* p16,
                              const float* saved, float* lse, float* inv) {
  const __m512 scale = _mm512_set1_ps(sh.scale);
  for (int64_t i = 0; i < rows; ++i) {
    float* si = s + i * ld;
    const int64_t keys = sh.keys_of(q0 + i);
    float shift;
    if constexpr (FORWARD) {
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < keys; j += 16) {
        const __mmask16 m = tail_mask(keys - j);
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, si + j), scale));
      }
      shift = _mm512_reduce_max_ps(mx);
    } else {
      shift = saved[i];
    }
    const __m512 sv = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < ld; j += 16) {
      const __mmask16 in = tail_mask(keys - j), all = tail_mask(ld - j);
      const __m512 e =
          _mm512_maskz_mov_ps(in, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(in, si + j), scale, sv)));
      sum = _mm512_add_ps(sum, e);
      _mm512_mask_storeu_ps(si + j, all, e);
      _mm256_mask_storeu_epi16(p16 + i * ld + j, all, to_bf16(e));
    }
    if constexpr (FORWARD) {
      const float total = _mm512_reduce_add_ps(sum);
      lse[i] = shift + std::log(total);
      inv[i] = 1.0f / total;
    }
  }
}

// The score gradient dS = P (dP - D) scale of one query block as two bf16 parts, `hi` its
// rounding and `lo` the rounding of the rest (both [rows, ld]), so its products keep about 16
// bits: a row of dS sums to zero, and the q and k gradients are differences its rounding to 8
// bits alone would swamp on narrow heads. P the f32 probabilities, dP their gradient (both
// [rows, ld], dP written on each row's keys only), D the rows' dO . O. Zero past each row's keys.
NIBBLE_BF16 void ds_rows(const Shape& sh, int64_t q0, int64_t rows, const float* p, const float* dp,
                         const float* d, int64_t ld, bf16* hi, bf16* lo) {
  const __m512 scale = _mm512_set1_ps(sh.scale);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t keys = sh.keys_of(q0 + i);
    const __m512 di = _mm512_set1_ps(d[i]);
    for (int64_t j = 0; j < ld; j += 16) {
      const __mmask16 in = tail_mask(keys - j), all = tail_mask(ld - j);
      const __m512 pv = _mm512_maskz_loadu_ps(in, p + i * ld + j);
      const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(in, dp + i * ld + j), di);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(pv, g), scale);
      const __m256i h = to_bf16(v);
      const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      _mm256_mask_storeu_epi16(hi + i * ld + j, all, h);
      _mm256_mask_storeu_epi16(lo + i * ld + j, all, to_bf16(rest));
    }
  }
}

// `src` [rows, cols] bf16 (stride ld, cols even) transposed into `dst` [cols, ld_t], zeros in
// rows..ld_t: pairs of columns gathered 16 rows at a time and split.
NIBBLE_BF16 void transpose_into(const bf16* src, int64_t rows, int64_t cols, int64_t ld, bf16* dst, int64_t ld_t) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(ld)));
  for (int64_t i0 = 0; i0 < ld_t; i0 += 16) {
    const __mmask16 in = tail_mask(rows - i0), all = tail_mask(ld_t - i0);
    for (int64_t c = 0; c < cols; c += 2) {
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, offsets, src + i0 * ld + c, 2);
      _mm256_mask_storeu_epi16(dst + c * ld_t + i0, all, _mm512_cvtepi32_epi16(v));
      _mm256_mask_storeu_epi16(dst + (c + 1) * ld_t + i0, all, _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
    }
  }
}

// f32 `src` [cols, rows] (stride lds) transposed and rounded into bf16 rows `row(j)` [cols].
NIBBLE_BF16 void store_transposed(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                  const std::function<bf16*(int64_t)>& row) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(lds)));
  for (int64_t j = 0; j < rows; ++j) {
    bf16* d = row(j);
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = tail_mask(cols - c);
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, offsets, src + c * lds + j, 4);
      _mm256_mask_storeu_epi16(d + c, m, to_bf16(v));
    }
  }
}

// Rounds f32 `src` [rows, n] (stride lds) into bf16 `dst` rows (stride by `row`), times `scale[i]`
// per row where given.
NIBBLE_BF16 void store_rows(const float* src, int64_t lds, int64_t rows, int64_t n, const float* scale,
                            const std::function<bf16*(int64_t)>& row) {
  for (int64_t i = 0; i < rows; ++i) {
    bf16* dst = row(i);
    const __m512 f = _mm512_set1_ps(scale == nullptr ? 1.0f : scale[i]);
    for (int64_t d = 0; d < n; d += 16) {
      const __mmask16 m = tail_mask(n - d);
      _mm256_mask_storeu_epi16(dst + d, m, to_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + i * lds + d), f)));
    }
  }
}

// Forward over (batch, head) tasks: per query block, scores against the keys it sees, softmax,
// probabilities times V, divided by the row sums. `lse` [B, heads, Tq] f32.
void forward_kernel(const Shape& sh, const In& q, const In& k, const In& v, const Out& out, float* lse) {
  const int64_t rep = sh.heads / sh.kv_heads;
  at::parallel_for(0, sh.batch * sh.heads, 1, [&](int64_t t0, int64_t t1) {
    Packed kt, vp;
    const int64_t ld_max = even(sh.tk);
    std::vector<float> s(static_cast<size_t>(kQueryBlock * ld_max)), o(static_cast<size_t>(kQueryBlock * sh.dim));
    std::vector<bf16> p16(s.size());
    std::vector<float> inv(kQueryBlock);
    int64_t packed_for = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / sh.heads, h = task % sh.heads, g = h / rep;
      if (packed_for != b * sh.kv_heads + g) {
        pack_cols(k.at(b, g, 0), k.st, sh.tk, sh.dim, kt);  // K^T: [D, Tk]
        pack_rows(v.at(b, g, 0), v.st, sh.tk, sh.dim, vp);  // V: [Tk, D]
        packed_for = b * sh.kv_heads + g;
      }
      for (int64_t q0 = 0; q0 < sh.tq; q0 += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, sh.tq - q0);
        const int64_t keys = sh.keys_of(q0 + rows - 1), ld = even(keys);
        gemm<false>(q.at(b, h, q0), q.st, rows, kt, keys, kt.pairs, s.data(), ld);
        softmax_rows<true>(sh, q0, rows, s.data(), ld, p16.data(), nullptr, lse + task * sh.tq + q0, inv.data());
        gemm<false>(p16.data(), ld, rows, vp, sh.dim, ld / 2, o.data(), sh.dim);
        store_rows(o.data(), sh.dim, rows, sh.dim, inv.data(), [&](int64_t i) { return out.at(b, h, q0 + i); });
      }
    }
  });
}

// D_i = dO_i . O_i in f32 for a query block's rows.
NIBBLE_BF16 void row_dots(const In& out, const In& dout, int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t dim,
                          float* d) {
  for (int64_t i = 0; i < rows; ++i) {
    const bf16* o = out.at(b, h, q0 + i);
    const bf16* g = dout.at(b, h, q0 + i);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t e = 0; e < dim; e += 16) {
      const __mmask16 m = tail_mask(dim - e);
      acc = _mm512_fmadd_ps(load_bf16(o + e, m), load_bf16(g + e, m), acc);
    }
    d[i] = _mm512_reduce_add_ps(acc);
  }
}

// Backward over (batch, key/value head) tasks, so each task owns its dK and dV: per query head
// of the group and query block, probabilities again from `lse`, dP = dO V^T, dS = P (dP - rowsum(dO
// O)) scale, dQ = dS K, dK^T += Q^T dS, dV^T += dO^T P.
void backward_kernel(const Shape& sh, const In& q, const In& k, const In& v, const In& out, const In& dout,
                     const float* lse, const Out& dq, const Out& dk, const Out& dv) {
  const int64_t rep = sh.heads / sh.kv_heads;
  at::parallel_for(0, sh.batch * sh.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    Packed kt, kn, vt, dsp, dsp_lo, pp;
    const int64_t ld_max = even(sh.tk), lq_max = even(kQueryBlock);
    std::vector<float> s(static_cast<size_t>(kQueryBlock * ld_max)), dp(s.size());
    std::vector<bf16> p16(s.size()), ds16(s.size()), ds_lo(s.size());
    std::vector<bf16> qt(static_cast<size_t>(sh.dim * lq_max)), ot(qt.size());
    std::vector<float> dqf(static_cast<size_t>(kQueryBlock * sh.dim)), di(kQueryBlock);
    // dK^T and dV^T [D, Tk], f32 over the group's query heads.
    std::vector<float> dkt(static_cast<size_t>(sh.dim * sh.tk)), dvt(dkt.size());
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / sh.kv_heads, g = task % sh.kv_heads;
      pack_cols(k.at(b, g, 0), k.st, sh.tk, sh.dim, kt);  // K^T: [D, Tk]
      pack_rows(k.at(b, g, 0), k.st, sh.tk, sh.dim, kn);  // K: [Tk, D]
      pack_cols(v.at(b, g, 0), v.st, sh.tk, sh.dim, vt);  // V^T: [D, Tk]
      std::fill(dkt.begin(), dkt.end(), 0.0f);
      std::fill(dvt.begin(), dvt.end(), 0.0f);
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int64_t q0 = 0; q0 < sh.tq; q0 += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, sh.tq - q0);
          const int64_t keys = sh.keys_of(q0 + rows - 1), ld = even(keys), lq = even(rows);
          const float* lse_blk = lse + (b * sh.heads + h) * sh.tq + q0;
          gemm<false>(q.at(b, h, q0), q.st, rows, kt, keys, kt.pairs, s.data(), ld);
          softmax_rows<false>(sh, q0, rows, s.data(), ld, p16.data(), lse_blk, nullptr, nullptr);
          gemm<false>(dout.at(b, h, q0), dout.st, rows, vt, keys, vt.pairs, dp.data(), ld);
          row_dots(out, dout, b, h, q0, rows, sh.dim, di.data());
          ds_rows(sh, q0, rows, s.data(), dp.data(), di.data(), ld, ds16.data(), ds_lo.data());
          // dQ = dS K over the block's keys.
          gemm<false>(ds16.data(), ld, rows, kn, sh.dim, ld / 2, dqf.data(), sh.dim);
          gemm<true>(ds_lo.data(), ld, rows, kn, sh.dim, ld / 2, dqf.data(), sh.dim);
          store_rows(dqf.data(), sh.dim, rows, sh.dim, nullptr, [&](int64_t i) { return dq.at(b, h, q0 + i); });
          // dK^T += Q^T dS, dV^T += dO^T P over the block's queries (a pair's missing row zero).
          transpose_into(q.at(b, h, q0), rows, sh.dim, q.st, qt.data(), lq);
          transpose_into(dout.at(b, h, q0), rows, sh.dim, dout.st, ot.data(), lq);
          pack_rows(ds16.data(), ld, rows, keys, dsp);
          pack_rows(ds_lo.data(), ld, rows, keys, dsp_lo);
          pack_rows(p16.data(), ld, rows, keys, pp);
          gemm<true>(qt.data(), lq, sh.dim, dsp, keys, dsp.pairs, dkt.data(), sh.tk);
          gemm<true>(qt.data(), lq, sh.dim, dsp_lo, keys, dsp_lo.pairs, dkt.data(), sh.tk);
          gemm<true>(ot.data(), lq, sh.dim, pp, keys, pp.pairs, dvt.data(), sh.tk);
        }
      }
      store_transposed(dkt.data(), sh.tk, sh.tk, sh.dim, [&](int64_t j) { return dk.at(b, g, j); });
      store_transposed(dvt.data(), sh.tk, sh.tk, sh.dim, [&](int64_t j) { return dv.at(b, g, j); });
    }
  });
}
#endif


// softmax(q k^T scale (+ causal mask)) v for bf16 q [B, H, Tq, D], k and v [B, KVH, Tk, D] (H a
// multiple of KVH); saves the inputs, the output and the rows' log-sum-exp.
struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                            const at::Tensor& v_in, bool causal, double scale) {
#ifdef NIBBLE_ATTN_X86
    const auto last = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
    const at::Tensor q = last(q_in), k = last(k_in), v = last(v_in);
    const Shape sh{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal, static_cast<float>(scale)};
    // [B, Tq, H, D] memory, so the heads' concatenation after it is a view.
    at::Tensor out = at::empty({sh.batch, sh.tq, sh.heads, sh.dim}, q.options()).transpose(1, 2);
    at::Tensor lse = at::empty({sh.batch, sh.heads, sh.tq}, q.options().dtype(at::kFloat));
    forward_kernel(sh, In(q.const_data_ptr<bf16>(), q), In(k.const_data_ptr<bf16>(), k),
                   In(v.const_data_ptr<bf16>(), v), Out(out.mutable_data_ptr<bf16>(), out),
                   lse.mutable_data_ptr<float>());
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return out;
#else
    TORCH_CHECK(false, "the attention kernels need x86-64");
#endif
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
#ifdef NIBBLE_ATTN_X86
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    at::Tensor g = grads[0].to(at::kBFloat16);
    if (g.stride(3) != 1) {
      g = g.contiguous();
    }
    const Shape sh{q.size(0),
                   q.size(1),
                   k.size(1),
                   q.size(2),
                   k.size(2),
                   q.size(3),
                   ctx->saved_data["causal"].toBool(),
                   static_cast<float>(ctx->saved_data["scale"].toDouble())};
    at::Tensor dq = at::empty({sh.batch, sh.tq, sh.heads, sh.dim}, q.options()).transpose(1, 2);
    at::Tensor dk = at::empty({sh.batch, sh.tk, sh.kv_heads, sh.dim}, q.options()).transpose(1, 2);
    at::Tensor dv = at::empty_like(dk);
    backward_kernel(sh, In(q.const_data_ptr<bf16>(), q), In(k.const_data_ptr<bf16>(), k),
                    In(v.const_data_ptr<bf16>(), v), In(out.const_data_ptr<bf16>(), out),
                    In(g.const_data_ptr<bf16>(), g), lse.const_data_ptr<float>(),
                    Out(dq.mutable_data_ptr<bf16>(), dq), Out(dk.mutable_data_ptr<bf16>(), dk),
                    Out(dv.mutable_data_ptr<bf16>(), dv));
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
#else
    TORCH_CHECK(false, "the attention kernels need x86-64");
#endif
  }
};

}  // namespace

extern "C" {

// 1 where this CPU runs the attention kernels (AVX-512 F, BW, VL and BF16), else 0.
int32_t nibble_attention_available() { return kernels_available() ? 1 : 0; }

// AttentionFn: softmax(q k^T scale, causal where asked) v, for bf16 CPU tensors q [B, H, Tq, D],
// k and v [B, KVH, Tk, D], H a multiple of KVH, D even and at most 256; causal needs Tq <= Tk
// (the queries are the last Tq positions).
char* nibble_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, int32_t causal,
                       double scale, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(kernels_available(), "the attention kernels need a CPU with AVX-512 (F, BW, VL, BF16)");
    TORCH_CHECK(q->dim() == 4 && k->dim() == 4 && v->dim() == 4, "attention takes [B, heads, T, D] tensors");
    TORCH_CHECK(q->scalar_type() == at::kBFloat16 && k->scalar_type() == at::kBFloat16 &&
                    v->scalar_type() == at::kBFloat16,
                "attention kernels take bfloat16 q, k, v");
    TORCH_CHECK(q->device().is_cpu() && k->device().is_cpu() && v->device().is_cpu(), "attention kernels run on the CPU");
    TORCH_CHECK(k->sizes() == v->sizes(), "k ", k->sizes(), " and v ", v->sizes(), " differ");
    TORCH_CHECK(q->size(0) == k->size(0) && q->size(3) == k->size(3), "q ", q->sizes(), " and k ", k->sizes(),
                " differ in batch or head size");
    TORCH_CHECK(k->size(1) >= 1 && q->size(1) % k->size(1) == 0, q->size(1), " query heads are no multiple of ",
                k->size(1), " key/value heads");
    TORCH_CHECK(q->size(3) % 2 == 0 && q->size(3) <= kMaxHeadDim, "attention kernels take even head sizes up to ",
                kMaxHeadDim, ", got ", q->size(3));
    TORCH_CHECK(!causal || q->size(2) <= k->size(2), "causal attention needs no more queries (", q->size(2),
                ") than keys (", k->size(2), ")");
    TORCH_CHECK(q->size(2) >= 1 && k->size(2) >= 1, "attention needs at least one query and one key");
    at::Tensor y = AttentionFn::apply(*q, *k, *v, causal != 0, scale);
    *result = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
