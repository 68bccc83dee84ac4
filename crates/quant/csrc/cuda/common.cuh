// What the CUDA ops share: the code books and encoders of `src/codec.rs` as device functions,
// the block-scale reader (plain or double-quantized absmax), the output conversions, and the
// checks every extern "C" entry point makes. Every bit follows codec.rs; the GPU check script
// (scripts/gpu_check.sh) compares these kernels with it byte for byte.
//
// Bit-exactness rules on the device: nvcc is run with --fmad=false (no fused multiply-add may
// merge a product and a sum into one rounding), divisions are IEEE (no --use_fast_math), and the
// few places where a product meets a sum spell the rounding out with __fmul_rn / __fadd_rn.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mean.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../ffi.h"

namespace nibble::cuda {

// Quant types and output dtypes, as passed from Rust (same numbers as quant_ops.cpp).
constexpr int32_t kNf4 = 0;
constexpr int32_t kFp4 = 1;
constexpr int32_t kOutF32 = 0;
constexpr int32_t kOutF16 = 1;
constexpr int32_t kOutBf16 = 2;

constexpr int kWarp = 32;

// NF4 code values by nibble (bitsandbytes' table; same digits as codec.rs).
static __constant__ float kNf4Code[16] = {
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
static __constant__ float kFp4Code[16] = {
    0.0f / 12.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  12.0f / 12.0f,
    4.0f / 12.0f,  6.0f / 12.0f,     2.0f / 12.0f,  3.0f / 12.0f,
    -0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,    -2.0f / 12.0f, -3.0f / 12.0f,
};

// codec.rs `encode_nf4`: the same binary tree over the midpoints, strict `>` (a value on a
// midpoint takes the lower code; NaN fails every comparison and lands on code 0).
__device__ __forceinline__ uint8_t encode_nf4(float x) {
  if (x > 0.03979015f) {
    if (x > 0.38931254f) {
      if (x > 0.6427869f) {
        return x > 0.8614784f ? 0b1111 : 0b1110;
      }
      return x > 0.5016634f ? 0b1101 : 0b1100;
    }
    if (x > 0.20352125f) {
      return x > 0.29201377f ? 0b1011 : 0b1010;
    }
    return x > 0.12025525f ? 0b1001 : 0b1000;
  }
  if (x > -0.33967943f) {
    if (x > -0.13791173f) {
      return x > -0.045525018f ? 0b0111 : 0b0110;
    }
    return x > -0.2346074f ? 0b0101 : 0b0100;
  }
  if (x > -0.6106329f) {
    return x > -0.45999527f ? 0b0011 : 0b0010;
  }
  return x > -0.8480964f ? 0b0001 : 0b0000;
}

// codec.rs `encode_fp4`: sign bit for x < 0, then a tree over |x|.
__device__ __forceinline__ uint8_t encode_fp4(float x) {
  const uint8_t sign = x < 0.0f ? 0b1000 : 0;
  const float a = fabsf(x);
  uint8_t m;
  if (a > 0.29166667f) {
    if (a > 0.583333f) {
      m = a > 0.8333333f ? 0b0011 : 0b0010;
    } else {
      m = a > 0.4166667f ? 0b0101 : 0b0100;
    }
  } else if (a > 0.0859375f) {
    m = a > 0.20833333f ? 0b0111 : 0b0110;
  } else {
    m = a > 0.00260417f ? 0b0001 : 0b0000;
  }
  return m + sign;
}

template <int32_t QT>
__device__ __forceinline__ uint8_t encode_4bit(float x) {
  return QT == kNf4 ? encode_nf4(x) : encode_fp4(x);
}

// Inputs to f32 (exact for all three).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// f32 to the output type, rounding to nearest even (as c10::Half / c10::BFloat16 do).
template <typename O>
__device__ __forceinline__ O from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The block scale of 4-bit block `b`: a plain f32, or (double quantization) the 8-bit code read
// back as `map[codes[b]] * nested[b / 256] + offset`, two roundings, exactly as the CPU path's
// dequantize_blockwise_8bit computes it.
struct BlockScale {
  const float* plain;   // one f32 per block, or nullptr when nested
  const uint8_t* codes; // one 8-bit code per block (nested)
  const float* nested;  // one f32 per 256 codes (nested)
  const float* map;     // the 256-entry dynamic map (nested)
  float offset;         // added back after the product (nested)

  __device__ __forceinline__ float operator()(int64_t b) const {
    if (plain != nullptr) {
      return plain[b];
    }
    return __fadd_rn(__fmul_rn(map[codes[b]], nested[b / 256]), offset);
  }
};

// Block size of the nested (double) quantization: bitsandbytes' fixed choice, codec.rs's
// NESTED_BLOCKSIZE.
constexpr int64_t kNestedBlocksize = 256;

// Host-side checks shared by the entry points.
inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize ", blocksize, " is not supported");
}

inline void check_quant_type(int32_t qt) {
  TORCH_CHECK(qt == kNf4 || qt == kFp4, "unknown quant type ", qt);
}

inline void check_cuda_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), what, " is undefined");
  TORCH_CHECK(t.device().is_cuda(), what, " must be on a CUDA device, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), what, " is on ", b.device(), ", expected ", a.device());
}

inline at::ScalarType out_type_of(int32_t out) {
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

// The block-scale reader for plain (`nested == nullptr`) or double-quantized absmax, checked
// against the number of 4-bit blocks and the device of `like`.
inline BlockScale block_scale(const at::Tensor& like, const at::Tensor& absmax,
                              const at::Tensor* nested, const at::Tensor* map, float offset,
                              int64_t nblocks) {
  check_cuda_contiguous(absmax, "absmax");
  check_same_device(like, absmax, "absmax");
  TORCH_CHECK(absmax.numel() == nblocks, "absmax: expected ", nblocks, " elements, got ",
              absmax.numel());
  if (nested == nullptr) {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ",
                absmax.scalar_type());
    return BlockScale{absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, 0.0f};
  }
  TORCH_CHECK(map != nullptr, "double-quantized absmax needs its 8-bit map");
  TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax codes must be uint8, got ",
              absmax.scalar_type());
  check_cuda_contiguous(*nested, "nested absmax");
  check_cuda_contiguous(*map, "nested quant map");
  check_same_device(like, *nested, "nested absmax");
  check_same_device(like, *map, "nested quant map");
  const int64_t nested_blocks = (nblocks + kNestedBlocksize - 1) / kNestedBlocksize;
  TORCH_CHECK(nested->scalar_type() == at::kFloat && nested->numel() == nested_blocks,
              "nested absmax: expected ", nested_blocks, " float32 values, got ", nested->numel(),
              " of ", nested->scalar_type());
  TORCH_CHECK(map->scalar_type() == at::kFloat && map->numel() == 256,
              "nested quant map must be 256 float32 values");
  return BlockScale{nullptr, absmax.const_data_ptr<uint8_t>(), nested->const_data_ptr<float>(),
                    map->const_data_ptr<float>(), offset};
}

// Blocks of `threads` threads covering `work` items, at least one.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t g = (work + threads - 1) / threads;
  TORCH_CHECK(g <= 0x7fffffff, "tensor too large for one launch (", work, " work items)");
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace nibble::cuda
