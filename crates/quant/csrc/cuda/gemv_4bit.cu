// Fused 4-bit matrix-vector product for batch-1 generation: y[o] = sum_i x[i] * W[o, i], W
// [out, in] stored as packed 4-bit codes (row-major, flattened, blockwise absmax plain or double
// quantized). W is never materialised: each weight is dequantized in registers exactly as
// dequantize_4bit would (`code * absmax` in f32, rounded to the compute dtype T), then multiplied
// with x in f32 and accumulated in f32; y is rounded to T once. That is `x @ dequant(W, T)^T`
// with f32 accumulation, as torch computes it, up to the order of the sum.
//
// One warp per output row; each lane reads 4 packed bytes (8 weights, one block scale) and the 8
// matching x values per step, so a warp streams 128 contiguous bytes of W per step. Rows whose
// length is not a multiple of 8 (or misaligned views) take a scalar path.

#include "common.cuh"

namespace nibble::cuda {
namespace {

constexpr int kWarpsPerCta = 4;
constexpr int kPerLane = 8;

template <typename T, int32_t QT>
__global__ void gemv_4bit_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                 BlockScale scale, int64_t out_features, int64_t in_features,
                                 int64_t blocksize, bool aligned, T* __restrict__ y) {
  __shared__ float code[16];
  if (threadIdx.x < 16) {
    code[threadIdx.x] = QT == kNf4 ? kNf4Code[threadIdx.x] : kFp4Code[threadIdx.x];
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (row >= out_features) {
    return;
  }
  const int64_t row_start = row * in_features;  // flat index of W[row, 0]
  float acc = 0.0f;
  if (aligned) {
    // in_features % 8 == 0: row_start is even and 4-byte aligned in `packed`.
    const uint32_t* w = reinterpret_cast<const uint32_t*>(packed + row_start / 2);
    for (int64_t u = lane; u < in_features / kPerLane; u += kWarp) {
      const uint32_t bytes = w[u];
      const float am = scale((row_start + u * kPerLane) / blocksize);
      const T* xs = x + u * kPerLane;
#pragma unroll
      for (int k = 0; k < kPerLane / 2; ++k) {
        const uint32_t byte = (bytes >> (8 * k)) & 0xffu;
        const float w_hi = to_f32(from_f32<T>(__fmul_rn(code[byte >> 4], am)));
        const float w_lo = to_f32(from_f32<T>(__fmul_rn(code[byte & 15u], am)));
        acc = __fmaf_rn(w_hi, to_f32(xs[2 * k]), acc);
        acc = __fmaf_rn(w_lo, to_f32(xs[2 * k + 1]), acc);
      }
    }
  } else {
    for (int64_t i = lane; i < in_features; i += kWarp) {
      const int64_t e = row_start + i;
      const uint8_t byte = packed[e / 2];
      const uint8_t nib = e % 2 == 0 ? byte >> 4 : byte & 15u;
      const float w = to_f32(from_f32<T>(__fmul_rn(code[nib], scale(e / blocksize))));
      acc = __fmaf_rn(w, to_f32(x[i]), acc);
    }
  }
  for (int s = kWarp / 2; s > 0; s /= 2) {
    acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, s));
  }
  if (lane == 0) {
    y[row] = from_f32<T>(acc);
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& packed, const BlockScale& scale,
            int64_t out_features, int64_t in_features, int64_t blocksize, int32_t qt,
            at::Tensor& y) {
  const T* xs = reinterpret_cast<const T*>(x.const_data_ptr());
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const bool aligned = in_features % kPerLane == 0 && reinterpret_cast<uintptr_t>(p) % 4 == 0;
  const unsigned grid = grid_for(out_features, kWarpsPerCta);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  T* ys = reinterpret_cast<T*>(y.data_ptr());
  if (qt == kNf4) {
    gemv_4bit_kernel<T, kNf4><<<grid, kWarpsPerCta * kWarp, 0, stream>>>(
        xs, p, scale, out_features, in_features, blocksize, aligned, ys);
  } else {
    gemv_4bit_kernel<T, kFp4><<<grid, kWarpsPerCta * kWarp, 0, stream>>>(
        xs, p, scale, out_features, in_features, blocksize, aligned, ys);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace nibble::cuda

extern "C" {

// y = x W^T for one input row: x has in_features elements (any shape [..., in] with one row),
// f32/f16/bf16 on a CUDA device; W [out, in] as packed codes and its block scales (plain f32
// absmax with `nested`/`map` null, or double quantized as in nibble_cuda_dequantize_4bit). The
// result has x's shape with the last dimension out_features, and x's dtype.
char* nibble_cuda_gemv_4bit(const at::Tensor* x, const at::Tensor* packed, const at::Tensor* absmax,
                            const at::Tensor* nested, const at::Tensor* map, float offset,
                            int64_t out_features, int64_t in_features, int64_t blocksize,
                            int32_t qt, at::Tensor** result) {
  using namespace nibble::cuda;
  return nibble::guarded([&] {
    *result = nullptr;
    check_blocksize(blocksize);
    check_quant_type(qt);
    check_cuda_contiguous(*x, "input");
    check_cuda_contiguous(*packed, "packed");
    check_same_device(*x, *packed, "packed");
    TORCH_CHECK(out_features >= 0 && in_features >= 0, "negative layer shape");
    TORCH_CHECK(x->dim() >= 1 && x->size(-1) == in_features && x->numel() == in_features,
                "gemv takes one input row of ", in_features, " features, got shape ", x->sizes());
    TORCH_CHECK(packed->scalar_type() == at::kByte, "packed must be uint8");
    const int64_t n = out_features * in_features;
    TORCH_CHECK(packed->numel() == (n + 1) / 2, "packed bytes: expected ", (n + 1) / 2,
                " elements, got ", packed->numel());
    const BlockScale scale =
        block_scale(*x, *absmax, nested, map, offset, (n + blocksize - 1) / blocksize);
    auto sizes = x->sizes().vec();
    sizes.back() = out_features;
    at::Tensor y = at::empty(sizes, x->options());
    if (out_features > 0) {
      const c10::cuda::CUDAGuard guard(x->device());
      switch (x->scalar_type()) {
        case at::kFloat:
          launch<float>(*x, *packed, scale, out_features, in_features, blocksize, qt, y);
          break;
        case at::kHalf:
          launch<__half>(*x, *packed, scale, out_features, in_features, blocksize, qt, y);
          break;
        case at::kBFloat16:
          launch<__nv_bfloat16>(*x, *packed, scale, out_features, in_features, blocksize, qt, y);
          break;
        default:
          TORCH_CHECK(false, "gemv computes in float32, float16 or bfloat16, got ",
                      x->scalar_type());
      }
    }
    *result = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
