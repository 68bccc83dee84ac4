// The fast path of the 4-bit codec and the 4-bit linear layer, as C functions over libtorch
// tensors (tch's `C_tensor` is a `torch::Tensor*`). Every bit follows `src/codec.rs`, the
// reference implementation; `tests/ops.rs` checks them against each other.
//
// Calling convention: each function returns nullptr on success or a malloc'd error message
// (free it with `nibble_quant_free_error`); output tensors are `new torch::Tensor`s that the
// caller owns (tch frees them with `at_free`). No C++ exception crosses this boundary.
//
// Speed: parallel over blocks with at::parallel_for (OpenMP); on x86-64 the quantize block loop
// is also compiled for AVX2 and the 16-bit dequantize uses SSSE3 pshufb lookups, both chosen at
// run time (no FMA: -ffp-contract=off keeps every rounding identical to codec.rs).

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

namespace {

using nibble::guarded;

// Quant types, as passed from Rust.
constexpr int32_t kNf4 = 0;
constexpr int32_t kFp4 = 1;

// Output dtypes, as passed from Rust.
constexpr int32_t kOutF32 = 0;
constexpr int32_t kOutF16 = 1;
constexpr int32_t kOutBf16 = 2;

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

template <typename T, int32_t QT>
using BlockFn = bool (*)(const T*, int64_t, uint8_t*, float*);

template <typename T, int32_t QT>
BlockFn<T, QT> pick_quantize_block() {
#if defined(__x86_64__) && defined(__GNUC__)
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
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      if (!quantize_block_fn(x + start, len, packed + start / 2, absmax + b)) {
        for (int64_t i = 0; i < len; ++i) {
          if (!std::isfinite(static_cast<float>(x[start + i]))) {
            bad.offer(start + i);
            break;
          }
        }
      }
    }
  });
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
#endif
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    O table[16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float am = absmax[b];
      for (int k = 0; k < 16; ++k) {
        table[k] = convert_out<OUT>(code[k] * am);
      }
      const uint8_t* p = packed + start / 2;
      O* o = static_cast<O*>(out_ptr) + start;
      const int64_t pairs = len / 2;
      int64_t done = 0;
#ifdef NIBBLE_X86
      if constexpr (OUT != kOutF32) {
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
void dequantize_4bit_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                          int32_t qt, at::Tensor& out) {
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
      dequantize_4bit_impl<kOutF32>(p, a, n, blocksize, qt, out.data_ptr());
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

// Linear4bit: y = x W^T (+ b) with W dequantized on the fly; only the packed weight and its
// absmax (tensors the layer holds anyway) are saved, and backward dequantizes again.
struct Linear4bitFn : public torch::autograd::Function<Linear4bitFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& bias, int64_t out_features,
                            int64_t in_features,
                            int64_t blocksize, int64_t qt) {
    at::Tensor w = dequantize_4bit_tensor(packed, absmax, out_features * in_features, blocksize,
                                          static_cast<int32_t>(qt), x.scalar_type())
                       .view({out_features, in_features});
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor y = has_bias ? at::linear(x, w, *bias) : at::linear(x, w);
    ctx->save_for_backward({packed, absmax});
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["qt"] = qt;
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
      at::Tensor w = dequantize_4bit_tensor(saved[0], saved[1], out_features * in_features,
                                            ctx->saved_data["blocksize"].toInt(),
                                            static_cast<int32_t>(ctx->saved_data["qt"].toInt()),
                                            g.scalar_type())
                         .view({out_features, in_features});
      // Same ops as autograd through at::linear: a 2-D matmul on the flattened batch.
      auto sizes = g.sizes().vec();
      sizes.back() = in_features;
      grad_x = at::mm(g.reshape({-1, out_features}), w).view(sizes);
    }
    at::Tensor grad_b;
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_b = g.reshape({-1, out_features}).sum(0);
    }
    return {grad_x, at::Tensor(), at::Tensor(), grad_b,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void nibble_quant_free_error(char* err) { std::free(err); }

// 4-bit quantization of any contiguous f32/f16/bf16 CPU tensor, flattened. On a non-finite
// input, returns no error but sets *bad_index to its flat index (else -1) and no tensors.
char* nibble_quantize_4bit(const at::Tensor* input, int64_t blocksize, int32_t qt,
                           at::Tensor** packed_out, at::Tensor** absmax_out, int64_t* bad_index) {
  return guarded([&] {
    *packed_out = nullptr;
    *absmax_out = nullptr;
    *bad_index = -1;
    check_blocksize(blocksize);
    TORCH_CHECK(qt == kNf4 || qt == kFp4, "unknown quant type ", qt);
    const at::Tensor& x = *input;
    check_cpu_contiguous(x, "input");
    const int64_t n = x.numel();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    at::Tensor packed = at::empty({(n + 1) / 2, 1}, at::TensorOptions().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, at::TensorOptions().dtype(at::kFloat));
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
      return;
    }
    *packed_out = new at::Tensor(std::move(packed));
    *absmax_out = new at::Tensor(std::move(absmax));
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

// Linear4bit forward through the autograd Function above: x [..., in] in the compute dtype,
// packed/absmax the 4-bit weight [out, in], bias [out] or null. The result carries a grad_fn
// whenever x (or bias) requires grad.
char* nibble_linear4bit_forward(const at::Tensor* x, const at::Tensor* packed,
                                const at::Tensor* absmax, const at::Tensor* bias,
                                int64_t out_features, int64_t in_features, int64_t blocksize,
                                int32_t qt, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(x->size(-1) == in_features, "input has ", x->size(-1),
                " features in its last dimension, the layer expects ", in_features);
    std::optional<at::Tensor> b;
    if (bias != nullptr) {
      b = *bias;
    }
    at::Tensor y = Linear4bitFn::apply(*x, *packed, *absmax, b, out_features, in_features,
                                       blocksize, static_cast<int64_t>(qt));
    *result = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
