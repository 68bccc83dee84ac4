// NF4/FP4 blockwise quantization on the GPU, the rules of codec.rs `quantize_4bit` (which are
// bitsandbytes' CUDA kernel's): absmax per block in f32, values scaled by multiplying with
// `1 / absmax`, mapped with strict `>` thresholds (ties to the lower code), element 2j in the high
// nibble of byte j, an odd count padded with the code of `0.0 * scale`.
//
// One warp per block: each lane takes pairs of elements (one output byte per pair), the warp
// reduces the absmax with shuffles, then each lane encodes its pairs. A non-finite input is
// reported by the smallest flat index holding one (atomicMin), as the CPU path reports it.

#include "common.cuh"

namespace nibble::cuda {
namespace {

constexpr int kWarpsPerCta = 8;

template <typename T, int32_t QT>
__global__ void quantize_4bit_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize,
                                     uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                     unsigned long long* __restrict__ first_bad) {
  const int lane = threadIdx.x % kWarp;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (block >= nblocks) {
    return;  // the whole warp leaves together
  }
  const int64_t start = block * blocksize;
  const int64_t len = min(blocksize, n - start);

  // absmax as the integer max of |x|'s bits (they order like |x|; inf and NaN sort above every
  // finite value), so one reduction also finds non-finite blocks.
  uint32_t m_bits = 0;
  for (int64_t i = lane; i < len; i += kWarp) {
    m_bits = max(m_bits, __float_as_uint(to_f32(x[start + i])) & 0x7fffffffu);
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    m_bits = max(m_bits, __shfl_xor_sync(0xffffffffu, m_bits, offset));
  }
  if (m_bits >= 0x7f800000u) {
    for (int64_t i = lane; i < len; i += kWarp) {
      if (!isfinite(to_f32(x[start + i]))) {
        atomicMin(first_bad, static_cast<unsigned long long>(start + i));
        break;
      }
    }
    return;
  }
  const float m = __uint_as_float(m_bits);
  if (lane == 0) {
    absmax[block] = m;
  }
  const float scale = __fdiv_rn(1.0f, m);
  const int64_t pairs = (len + 1) / 2;
  uint8_t* out = packed + start / 2;  // blocksize is even: a block never splits a byte
  for (int64_t j = lane; j < pairs; j += kWarp) {
    const float hi = to_f32(x[start + 2 * j]);
    const float lo = 2 * j + 1 < len ? to_f32(x[start + 2 * j + 1]) : 0.0f;
    out[j] = static_cast<uint8_t>((encode_4bit<QT>(__fmul_rn(hi, scale)) << 4) |
                                  encode_4bit<QT>(__fmul_rn(lo, scale)));
  }
}

template <typename T>
void launch(const at::Tensor& x, int64_t blocksize, int32_t qt, at::Tensor& packed,
            at::Tensor& absmax, at::Tensor& first_bad) {
  const int64_t n = x.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const unsigned grid = grid_for(nblocks, kWarpsPerCta);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  auto* bad = reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>());
  const T* xs = reinterpret_cast<const T*>(x.const_data_ptr());
  if (qt == kNf4) {
    quantize_4bit_kernel<T, kNf4><<<grid, kWarpsPerCta * kWarp, 0, stream>>>(
        xs, n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), bad);
  } else {
    quantize_4bit_kernel<T, kFp4><<<grid, kWarpsPerCta * kWarp, 0, stream>>>(
        xs, n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), bad);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace nibble::cuda

extern "C" {

// 4-bit quantization of a contiguous f32/f16/bf16 CUDA tensor, flattened: packed uint8
// [(n+1)/2, 1] and f32 absmax [blocks] on the same device. On a non-finite input, returns no
// error but sets *bad_index to its flat index (else -1) and no tensors (as the CPU op does).
char* nibble_cuda_quantize_4bit(const at::Tensor* input, int64_t blocksize, int32_t qt,
                                at::Tensor** packed_out, at::Tensor** absmax_out,
                                int64_t* bad_index) {
  using namespace nibble::cuda;
  return nibble::guarded([&] {
    *packed_out = nullptr;
    *absmax_out = nullptr;
    *bad_index = -1;
    check_blocksize(blocksize);
    check_quant_type(qt);
    const at::Tensor& x = *input;
    check_cuda_contiguous(x, "input");
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = x.numel();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const auto on = x.options();
    at::Tensor packed = at::empty({(n + 1) / 2, 1}, on.dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, on.dtype(at::kFloat));
    at::Tensor first_bad = at::full({1}, std::numeric_limits<int64_t>::max(), on.dtype(at::kLong));
    if (n > 0) {
      switch (x.scalar_type()) {
        case at::kFloat:
          launch<float>(x, blocksize, qt, packed, absmax, first_bad);
          break;
        case at::kHalf:
          launch<__half>(x, blocksize, qt, packed, absmax, first_bad);
          break;
        case at::kBFloat16:
          launch<__nv_bfloat16>(x, blocksize, qt, packed, absmax, first_bad);
          break;
        default:
          TORCH_CHECK(false, "cannot quantize ", x.scalar_type(),
                      " (use float32, float16 or bfloat16)");
      }
      // One 8-byte read back (a sync): the price of reporting bad input as the CPU path does.
      const int64_t first = first_bad.item<int64_t>();
      if (first != std::numeric_limits<int64_t>::max()) {
        *bad_index = first;
        return;
      }
    }
    *packed_out = new at::Tensor(std::move(packed));
    *absmax_out = new at::Tensor(std::move(absmax));
  });
}

}  // extern "C"
