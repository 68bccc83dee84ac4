// Blockwise 8-bit quantization on the GPU with a sorted 256-entry map, as double quantization
// uses it (the absmax values minus their mean, nested blocksize 256, the signed dynamic map):
// the rules of codec.rs `quantize_blockwise_8bit` and `encode_8bit` (bitsandbytes' CUDA
// kernel's search), and its inverse. The offset is torch's own `mean()` of the input on the
// device, as bitsandbytes takes it.
//
// One warp per block; the map sits in shared memory for the searches.

#include "common.cuh"

namespace nibble::cuda {
namespace {

constexpr int kWarpsPerCta = 8;

// codec.rs `encode_8bit`: seven halving steps from the middle of the sorted map, then the nearer
// of the two bracketing codes (ties to the code on the side of the last pivot).
__device__ __forceinline__ uint8_t encode_8bit(const float* code, float x) {
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
  if (x > val) {
    const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return static_cast<uint8_t>(x > mid ? upper_pivot : pivot);
  }
  const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
  return static_cast<uint8_t>(x < mid ? lower_pivot : pivot);
}

// Smallest i with x[i] - offset not finite, into *first_bad (atomicMin).
__global__ void first_non_finite_kernel(const float* __restrict__ x, int64_t n, float offset,
                                        unsigned long long* __restrict__ first_bad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && !isfinite(__fsub_rn(x[i], offset))) {
    atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

__global__ void quantize_8bit_kernel(const float* __restrict__ x, int64_t n, float offset,
                                     const float* __restrict__ map, int64_t blocksize,
                                     uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    code[i] = map[i];
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (block >= nblocks) {
    return;
  }
  const int64_t start = block * blocksize;
  const int64_t len = min(blocksize, n - start);
  float m = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) {
    m = fmaxf(m, fabsf(__fsub_rn(x[start + i], offset)));
  }
  for (int s = kWarp / 2; s > 0; s /= 2) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, s));
  }
  if (lane == 0) {
    absmax[block] = m;
  }
  const float scale = __fdiv_rn(1.0f, m);
  for (int64_t i = lane; i < len; i += kWarp) {
    codes[start + i] = encode_8bit(code, __fmul_rn(__fsub_rn(x[start + i], offset), scale));
  }
}

__global__ void dequantize_8bit_kernel(const uint8_t* __restrict__ codes,
                                       const float* __restrict__ absmax,
                                       const float* __restrict__ map, int64_t n, int64_t blocksize,
                                       float offset, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    out[i] = __fadd_rn(__fmul_rn(map[codes[i]], absmax[i / blocksize]), offset);
  }
}

// The first flat index of x whose x - offset is not finite, or -1 (one read back).
int64_t first_non_finite(const at::Tensor& x, float offset, cudaStream_t stream) {
  const int64_t n = x.numel();
  at::Tensor first = at::full({1}, std::numeric_limits<int64_t>::max(), x.options().dtype(at::kLong));
  first_non_finite_kernel<<<grid_for(n, 256), 256, 0, stream>>>(
      x.const_data_ptr<float>(), n, offset,
      reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t i = first.item<int64_t>();
  return i == std::numeric_limits<int64_t>::max() ? -1 : i;
}

void check_map(const at::Tensor& x, const at::Tensor& code) {
  check_cuda_contiguous(code, "code");
  check_same_device(x, code, "code");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "code must be 256 float32 values");
}

}  // namespace
}  // namespace nibble::cuda

extern "C" {

// Blockwise 8-bit quantization of a contiguous f32 CUDA tensor minus an offset. With
// use_mean != 0 the offset is torch's `input.mean()` on the device, else `*offset`; either way
// `*offset` holds the one used. A non-finite x or x - offset is reported by *bad_index (else -1),
// with no tensors, as in nibble_quantize_8bit.
char* nibble_cuda_quantize_8bit(const at::Tensor* input, const at::Tensor* code, int64_t blocksize,
                                int32_t use_mean, float* offset, at::Tensor** codes_out,
                                at::Tensor** absmax_out, int64_t* bad_index) {
  using namespace nibble::cuda;
  return nibble::guarded([&] {
    *codes_out = nullptr;
    *absmax_out = nullptr;
    *bad_index = -1;
    check_blocksize(blocksize);
    const at::Tensor& x = *input;
    check_cuda_contiguous(x, "input");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "input must be float32, got ", x.scalar_type());
    check_map(x, *code);
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    const int64_t n = x.numel();
    if (n > 0) {
      *bad_index = first_non_finite(x, 0.0f, stream);
      if (*bad_index >= 0) {
        return;
      }
    }
    if (use_mean != 0) {
      *offset = n == 0 ? std::numeric_limits<float>::quiet_NaN() : x.mean().item<float>();
    }
    const float off = *offset;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    at::Tensor q = at::empty({n}, x.options().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
    if (n > 0) {
      *bad_index = first_non_finite(x, off, stream);
      if (*bad_index >= 0) {
        return;
      }
      quantize_8bit_kernel<<<grid_for(nblocks, kWarpsPerCta), kWarpsPerCta * kWarp, 0, stream>>>(
          x.const_data_ptr<float>(), n, off, code->const_data_ptr<float>(), blocksize,
          q.data_ptr<uint8_t>(), absmax.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    *codes_out = new at::Tensor(std::move(q));
    *absmax_out = new at::Tensor(std::move(absmax));
  });
}

// Inverse of nibble_cuda_quantize_8bit: f32 `code[q] * absmax[block] + offset` (two roundings).
char* nibble_cuda_dequantize_8bit(const at::Tensor* codes, const at::Tensor* absmax,
                                  const at::Tensor* code, int64_t blocksize, float offset,
                                  at::Tensor** result) {
  using namespace nibble::cuda;
  return nibble::guarded([&] {
    *result = nullptr;
    check_blocksize(blocksize);
    check_cuda_contiguous(*codes, "codes");
    check_cuda_contiguous(*absmax, "nested absmax");
    check_same_device(*codes, *absmax, "nested absmax");
    check_map(*codes, *code);
    TORCH_CHECK(codes->scalar_type() == at::kByte, "codes must be uint8");
    TORCH_CHECK(absmax->scalar_type() == at::kFloat, "nested absmax must be float32");
    const int64_t n = codes->numel();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    TORCH_CHECK(absmax->numel() == nblocks, "nested absmax: expected ", nblocks,
                " elements, got ", absmax->numel());
    const c10::cuda::CUDAGuard guard(codes->device());
    at::Tensor out = at::empty({n}, codes->options().dtype(at::kFloat));
    if (n > 0) {
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(codes->device().index());
      dequantize_8bit_kernel<<<grid_for(n, 256), 256, 0, stream>>>(
          codes->const_data_ptr<uint8_t>(), absmax->const_data_ptr<float>(),
          code->const_data_ptr<float>(), n, blocksize, offset, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    *result = new at::Tensor(std::move(out));
  });
}

}  // extern "C"
