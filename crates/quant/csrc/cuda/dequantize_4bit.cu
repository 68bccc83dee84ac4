// NF4/FP4 dequantization on the GPU to f32, f16 or bf16: `code[nibble] * absmax[block]` in f32,
// then rounded to nearest even, exactly as codec.rs `dequantize_4bit` and the CPU op. The block
// scale is read as stored: a plain f32 absmax, or the double-quantized one (8-bit code, nested
// absmax, offset) decoded on the fly, so no f32 absmax tensor is ever materialised.
//
// Each thread turns 4 packed bytes into 8 outputs (one 16-byte store for 16-bit outputs, two for
// f32), so a warp reads 128 contiguous bytes and writes 512 (or 1024): the kernel is a streaming
// copy with a table lookup, bound by memory bandwidth. 8 elements never straddle a block
// (blocksizes are multiples of 32). A misaligned view or a ragged tail takes the scalar path.

#include "common.cuh"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // elements (4 packed bytes)

template <typename O>
struct alignas(16) Eight {
  O v[kPerThread];
};

template <typename O, int32_t QT>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, BlockScale scale,
                                       int64_t n, int64_t blocksize, bool aligned,
                                       O* __restrict__ out) {
  // The 16 code values in shared memory: a lookup with 16 distinct indices across a warp is a
  // broadcast per bank, where constant memory would serialise it.
  __shared__ float code[16];
  if (threadIdx.x < 16) {
    code[threadIdx.x] = QT == kNf4 ? kNf4Code[threadIdx.x] : kFp4Code[threadIdx.x];
  }
  __syncthreads();

  const int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = unit * kPerThread;
  if (first >= n) {
    return;
  }
  const float am = scale(first / blocksize);
  if (aligned && first + kPerThread <= n) {
    const uint32_t bytes = reinterpret_cast<const uint32_t*>(packed)[unit];
    Eight<O> o;
#pragma unroll
    for (int k = 0; k < kPerThread / 2; ++k) {
      const uint32_t byte = (bytes >> (8 * k)) & 0xffu;  // little-endian: byte k of the four
      o.v[2 * k] = from_f32<O>(__fmul_rn(code[byte >> 4], am));
      o.v[2 * k + 1] = from_f32<O>(__fmul_rn(code[byte & 15u], am));
    }
    *reinterpret_cast<Eight<O>*>(out + first) = o;
    return;
  }
  const int64_t last = min(first + kPerThread, n);
  for (int64_t i = first; i < last; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t nib = i % 2 == 0 ? byte >> 4 : byte & 15u;
    out[i] = from_f32<O>(__fmul_rn(code[nib], am));
  }
}

template <typename O>
void launch(const at::Tensor& packed, const BlockScale& scale, int64_t n, int64_t blocksize,
            int32_t qt, at::Tensor& out) {
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  O* o = reinterpret_cast<O*>(out.data_ptr());
  const bool aligned = reinterpret_cast<uintptr_t>(p) % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(o) % alignof(Eight<O>) == 0;
  const unsigned grid = grid_for((n + kPerThread - 1) / kPerThread, kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index());
  if (qt == kNf4) {
    dequantize_4bit_kernel<O, kNf4><<<grid, kThreads, 0, stream>>>(p, scale, n, blocksize, aligned, o);
  } else {
    dequantize_4bit_kernel<O, kFp4><<<grid, kThreads, 0, stream>>>(p, scale, n, blocksize, aligned, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Dequantize into `out` (contiguous CUDA f32/f16/bf16; its element count is the number of 4-bit
// values). `nested`/`map` null: `absmax` is f32; else `absmax` holds the uint8 codes.
void dequantize_4bit_into(const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor* nested, const at::Tensor* map, float offset,
                          int64_t blocksize, int32_t qt, at::Tensor& out) {
  check_blocksize(blocksize);
  check_quant_type(qt);
  check_cuda_contiguous(out, "out");
  check_cuda_contiguous(packed, "packed");
  check_same_device(out, packed, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed bytes: expected ", (n + 1) / 2,
              " elements, got ", packed.numel());
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const BlockScale scale = block_scale(out, absmax, nested, map, offset, nblocks);
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  switch (out.scalar_type()) {
    case at::kFloat:
      launch<float>(packed, scale, n, blocksize, qt, out);
      break;
    case at::kHalf:
      launch<__half>(packed, scale, n, blocksize, qt, out);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(packed, scale, n, blocksize, qt, out);
      break;
    default:
      TORCH_CHECK(false, "cannot dequantize to ", out.scalar_type(),
                  " (use float32, float16 or bfloat16)");
  }
}

}  // namespace nibble::cuda

extern "C" {

// Dequantize n 4-bit values on the GPU to float32 (0), float16 (1) or bfloat16 (2), giving a
// 1-D tensor on the device of `packed`. Plain absmax: `absmax` f32, `nested` and `map` null.
// Double quant: `absmax` the uint8 codes, `nested` the f32 nested absmax, `map` the 256-entry
// map, `offset` the mean that was subtracted.
char* nibble_cuda_dequantize_4bit(const at::Tensor* packed, const at::Tensor* absmax,
                                  const at::Tensor* nested, const at::Tensor* map, float offset,
                                  int64_t n, int64_t blocksize, int32_t qt, int32_t out,
                                  at::Tensor** result) {
  using namespace nibble::cuda;
  return nibble::guarded([&] {
    *result = nullptr;
    TORCH_CHECK(n >= 0, "element count ", n, " is negative");
    check_cuda_contiguous(*packed, "packed");
    at::Tensor o = at::empty({n}, packed->options().dtype(out_type_of(out)));
    dequantize_4bit_into(*packed, *absmax, nested, map, offset, blocksize, qt, o);
    *result = new at::Tensor(std::move(o));
  });
}

// Same, into an existing contiguous CUDA tensor (f32/f16/bf16) whose element count is the
// number of 4-bit values; its shape is kept.
char* nibble_cuda_dequantize_4bit_into(const at::Tensor* packed, const at::Tensor* absmax,
                                       const at::Tensor* nested, const at::Tensor* map,
                                       float offset, int64_t blocksize, int32_t qt,
                                       at::Tensor* out) {
  return nibble::guarded([&] {
    nibble::cuda::dequantize_4bit_into(*packed, *absmax, nested, map, offset, blocksize, qt, *out);
  });
}

}  // extern "C"
