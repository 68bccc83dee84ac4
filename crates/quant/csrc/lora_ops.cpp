// The low-rank update of an f32 LoRA adapter on a CPU, fused into one autograd Function with
// AVX-512 kernels for its rank-r products.
//
// Why: an adapter's six products per step (x A^T, (.) B^T forward; g B, g^T a, g_a^T x, g_a A
// backward) have one side only r wide (8-64). MKL runs such shapes at 40-80 GFLOP/s on two
// cores where a large f32 GEMM reaches 150-190 (these kernels: 180-225 on an AVX-512 Zen 4, r =
// 16, 512 rows, 768 and 2048 wide), and around them PEFT's order adds passes over
// the layer's input and output: the input's f32 copy, the update's rounding to 16 bits and its
// sum with the base output, and backward the gradient's f32 copy and the input gradient's
// rounding. Here each product is one pass that reads 16-bit operands directly, and the forward's
// last one writes `base + update` in the base's dtype (docs/benchmarks.md, issue 23).
//
// Numerics: the same f32 products, summed in another order than MKL's (fused multiply-adds, one
// running sum per output); the update is rounded to the base dtype before the sum, as PEFT does.
// The scaling multiplies the r-wide intermediate (exact for a power of two, PEFT's order
// otherwise rounds the scaled output instead). So: float noise from PEFT's bits, never more;
// nibble takes this path only where the `cpu_matmul` policy is not `native`.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/torch.h>

#include "ffi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NIBBLE_LORA_X86 1
#endif

#include <algorithm>
#include <cstdint>

namespace {

using nibble::guarded;

// The widest rank the kernels take (four 16-lane chunks).
constexpr int64_t kMaxRank = 64;

#ifdef NIBBLE_LORA_X86
#define NIBBLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define NIBBLE_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline

NIBBLE_AVX512_INLINE __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

NIBBLE_AVX512_INLINE __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Round to bf16, nearest even (NaN becomes 0x7fc0, as c10::BFloat16 rounds it).
NIBBLE_AVX512_INLINE __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

NIBBLE_AVX512_INLINE __m512 from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

NIBBLE_AVX512_INLINE void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

NIBBLE_AVX512_INLINE void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, to_bf16(v));
}

inline __mmask16 tail_mask(int64_t len) {
  return len >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << len) - 1);
}

// Columns of Y converted to f32 at once in `contract`, so the inner loop broadcasts from memory.
constexpr int64_t kContractTile = 256;

// acc[RB x C] += tile[:RB, :len] W[:len, :r] (W row-major with row stride r, r split in C chunks
// of 16 lanes, the last masked). The running sums come in and go out through `acc_mem`, and
// live in registers only inside: carried across the caller's tile conversion, GCC 12 keeps
// them in memory and stores all of them after every multiply-add (2.6x slower).
template <int RB, int C>
NIBBLE_AVX512_INLINE void contract_tile(const float (*tile)[kContractTile], const float* w, int64_t len,
                                        int64_t r, const __mmask16* mask, float* acc_mem) {
  __m512 acc[RB * C];
#pragma GCC unroll 64
  for (int i = 0; i < RB * C; ++i) {
    acc[i] = _mm512_load_ps(acc_mem + 16 * i);
  }
  for (int64_t j = 0; j < len; ++j, w += r) {
    __m512 wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      wv[c] = load16(w + 16 * c, mask[c]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const __m512 yv = _mm512_set1_ps(tile[i][j]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        acc[i * C + c] = _mm512_fmadd_ps(yv, wv[c], acc[i * C + c]);
      }
    }
  }
#pragma GCC unroll 64
  for (int i = 0; i < RB * C; ++i) {
    _mm512_store_ps(acc_mem + 16 * i, acc[i]);
  }
}

// Z[n, :r] = sum_k Y[n, k] W[k, :r] for RB rows from n0: W is [K, r] row-major f32, r split in C
// chunks of 16 lanes (the last masked).
template <typename In, int RB, int C>
NIBBLE_AVX512 void contract_rows(const In* y, const float* w, float* z, int64_t n0, int64_t k_dim,
                                 int64_t r) {
  alignas(64) float acc[RB * C * 16] = {};
  __mmask16 mask[C];
  for (int c = 0; c < C; ++c) {
    mask[c] = tail_mask(r - 16 * c);
  }
  alignas(64) float tile[RB][kContractTile];
  for (int64_t k0 = 0; k0 < k_dim; k0 += kContractTile) {
    const int64_t len = std::min(kContractTile, k_dim - k0);
    for (int i = 0; i < RB; ++i) {
      const In* row = y + (n0 + i) * k_dim + k0;
      for (int64_t j = 0; j < len; j += 16) {
        const __mmask16 m = tail_mask(len - j);
        _mm512_mask_storeu_ps(&tile[i][j], m, load16(row + j, m));
      }
    }
    contract_tile<RB, C>(tile, w + k0 * r, len, r, mask, acc);
  }
  for (int i = 0; i < RB; ++i) {
    for (int c = 0; c < C; ++c) {
      store16(z + (n0 + i) * r + 16 * c, _mm512_load_ps(acc + 16 * (i * C + c)), mask[c]);
    }
  }
}

template <typename In, int C>
NIBBLE_AVX512 void contract_c(const In* y, const float* w, float* z, int64_t n, int64_t k_dim,
                              int64_t r) {
  constexpr int RB = C == 1 ? 8 : (C == 2 ? 6 : 4);
  const int64_t blocks = n / RB;
  at::parallel_for(0, blocks + 1, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b < blocks) {
        contract_rows<In, RB, C>(y, w, z, b * RB, k_dim, r);
      } else {
        for (int64_t i = blocks * RB; i < n; ++i) {
          contract_rows<In, 1, C>(y, w, z, i, k_dim, r);
        }
      }
    }
  });
}

// Z [n, r] = Y [n, k] @ W [k, r].
template <typename In>
void contract(const In* y, const float* w, float* z, int64_t n, int64_t k_dim, int64_t r) {
  switch ((r + 15) / 16) {
    case 1: return contract_c<In, 1>(y, w, z, n, k_dim, r);
    case 2: return contract_c<In, 2>(y, w, z, n, k_dim, r);
    case 3: return contract_c<In, 3>(y, w, z, n, k_dim, r);
    default: return contract_c<In, 4>(y, w, z, n, k_dim, r);
  }
}

// What `expand` writes: the product, or `base + product` with the product rounded to the
// output's dtype first (PEFT's `result + update.to(result.dtype)`).
enum class Epilogue { Store, AddToBase };

// Out[n, o] (= Base[n, o] +) sum_k X[n, k] W[k, o] for RB rows from n0, o over 16-lane blocks:
// X is [n, r] f32, W [r, O] row-major f32.
template <typename Out, int RB, Epilogue E>
NIBBLE_AVX512 void expand_rows(const float* x, const float* w, const Out* base, Out* out,
                               int64_t n0, int64_t r, int64_t o_dim) {
  for (int64_t o = 0; o < o_dim; o += 16) {
    const __mmask16 m = tail_mask(o_dim - o);
    __m512 acc[RB];
    for (int i = 0; i < RB; ++i) {
      acc[i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < r; ++k) {
      const __m512 wv = load16(w + k * o_dim + o, m);
      for (int i = 0; i < RB; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[(n0 + i) * r + k]), wv, acc[i]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      const int64_t at = (n0 + i) * o_dim + o;
      __m512 v = acc[i];
      if constexpr (E == Epilogue::AddToBase) {
        if constexpr (std::is_same_v<Out, c10::BFloat16>) {
          v = from_bf16(to_bf16(v));
        }
        v = _mm512_add_ps(load16(base + at, m), v);
      }
      store16(out + at, v, m);
    }
  }
}

template <typename Out, Epilogue E>
void expand(const float* x, const float* w, const Out* base, Out* out, int64_t n, int64_t r,
            int64_t o_dim) {
  constexpr int RB = 8;
  const int64_t blocks = n / RB;
  at::parallel_for(0, blocks + 1, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (b < blocks) {
        expand_rows<Out, RB, E>(x, w, base, out, b * RB, r, o_dim);
      } else {
        for (int64_t i = blocks * RB; i < n; ++i) {
          expand_rows<Out, 1, E>(x, w, base, out, i, r, o_dim);
        }
      }
    }
  });
}

// Z [k0 .. k0 + KB, o .. o + 16] = X [n, k0 .. k0 + KB]^T @ Y [n, o .. o + 16]. KB is a constant so
// the KB running sums stay in registers (with a run-time count GCC 12 keeps them in memory).
template <typename In, int KB>
NIBBLE_AVX512 void reduce_tile(const float* x, const In* y, float* z, int64_t n, int64_t r, int64_t o_dim,
                               int64_t o, int64_t k0) {
  const __mmask16 m = tail_mask(o_dim - o);
  __m512 acc[KB];
#pragma GCC unroll 16
  for (int k = 0; k < KB; ++k) {
    acc[k] = _mm512_setzero_ps();
  }
  const In* yi = y + o;
  const float* xi = x + k0;
  for (int64_t i = 0; i < n; ++i, yi += o_dim, xi += r) {
    const __m512 yv = load16(yi, m);
#pragma GCC unroll 16
    for (int k = 0; k < KB; ++k) {
      acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(xi[k]), yv, acc[k]);
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < KB; ++k) {
    store16(z + (k0 + k) * o_dim + o, acc[k], m);
  }
}

// Z [r, O] = X [n, r]^T @ Y [n, O], over 16-lane blocks of O, up to 16 rows of Z at a time (a
// rank's remainder below 16 in power-of-two pieces).
template <typename In>
NIBBLE_AVX512 void reduce_block(const float* x, const In* y, float* z, int64_t n, int64_t r, int64_t o_dim,
                                int64_t o) {
  int64_t k0 = 0;
  for (; k0 + 16 <= r; k0 += 16) {
    reduce_tile<In, 16>(x, y, z, n, r, o_dim, o, k0);
  }
  if (r - k0 >= 8) {
    reduce_tile<In, 8>(x, y, z, n, r, o_dim, o, k0);
    k0 += 8;
  }
  if (r - k0 >= 4) {
    reduce_tile<In, 4>(x, y, z, n, r, o_dim, o, k0);
    k0 += 4;
  }
  if (r - k0 >= 2) {
    reduce_tile<In, 2>(x, y, z, n, r, o_dim, o, k0);
    k0 += 2;
  }
  if (r - k0 >= 1) {
    reduce_tile<In, 1>(x, y, z, n, r, o_dim, o, k0);
  }
}

template <typename In>
void reduce(const float* x, const In* y, float* z, int64_t n, int64_t r, int64_t o_dim) {
  const int64_t blocks = (o_dim + 15) / 16;
  at::parallel_for(0, blocks, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      reduce_block<In>(x, y, z, n, r, o_dim, 16 * b);
    }
  });
}
#endif

bool kernels_available() {
#ifdef NIBBLE_LORA_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// Dispatch on the 16-bit or f32 activations' dtype.
template <typename F>
void with_dtype(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    TORCH_CHECK(t == at::kFloat, "LoRA kernels take bfloat16 or float32 activations, got ", t);
    f(float{});
  }
}

#ifdef NIBBLE_LORA_X86
at::Tensor contract_t(const at::Tensor& y, const at::Tensor& w) {
  const int64_t n = y.size(0), k = y.size(1), r = w.size(1);
  at::Tensor z = at::empty({n, r}, y.options().dtype(at::kFloat));
  with_dtype(y.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    contract<In>(y.const_data_ptr<In>(), w.const_data_ptr<float>(), z.mutable_data_ptr<float>(), n, k, r);
  });
  return z;
}

template <Epilogue E>
at::Tensor expand_t(const at::Tensor& x, const at::Tensor& w, at::ScalarType out_type,
                    const at::Tensor* base) {
  const int64_t n = x.size(0), r = x.size(1), o = w.size(1);
  at::Tensor out = at::empty({n, o}, x.options().dtype(out_type));
  with_dtype(out_type, [&](auto tag) {
    using Out = decltype(tag);
    const Out* b = base == nullptr ? nullptr : base->const_data_ptr<Out>();
    expand<Out, E>(x.const_data_ptr<float>(), w.const_data_ptr<float>(), b, out.mutable_data_ptr<Out>(), n, r, o);
  });
  return out;
}

at::Tensor reduce_t(const at::Tensor& x, const at::Tensor& y) {
  const int64_t n = x.size(0), r = x.size(1), o = y.size(1);
  at::Tensor z = at::empty({r, o}, x.options());
  with_dtype(y.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    reduce<In>(x.const_data_ptr<float>(), y.const_data_ptr<In>(), z.mutable_data_ptr<float>(), n, r, o);
  });
  return z;
}
#endif

// `base + ((x A^T) s) B^T`, the update rounded to x's dtype before the sum; saves x (16-bit or
// f32, as the caller has it), the r-wide scaled intermediate and the factors.
struct LoraUpdateFn : public torch::autograd::Function<LoraUpdateFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& base, const at::Tensor& a, const at::Tensor& b,
                            double scaling) {
#ifdef NIBBLE_LORA_X86
    const int64_t in = a.size(1), out = b.size(0);
    const at::Tensor x2 = x.reshape({-1, in}).contiguous();
    const at::Tensor base2 = base.reshape({-1, out}).contiguous();
    at::Tensor down = contract_t(x2, a.t().contiguous());
    if (scaling != 1.0) {
      down.mul_(scaling);
    }
    at::Tensor y = expand_t<Epilogue::AddToBase>(down, b.t().contiguous(), base.scalar_type(), &base2);
    ctx->save_for_backward({x2, down, a, b});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return y.view(base.sizes());
#else
    TORCH_CHECK(false, "the LoRA kernels need x86-64");
#endif
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
#ifdef NIBBLE_LORA_X86
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x2 = saved[0];
    const at::Tensor& down = saved[1];
    const at::Tensor& a = saved[2];
    const at::Tensor& b = saved[3];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const int64_t out = b.size(0);
    const at::Tensor g = grads[0].reshape({-1, out}).to(x2.scalar_type()).contiguous();
    at::Tensor grad_x, grad_a, grad_b;
    if (ctx->needs_input_grad(3)) {
      grad_b = reduce_t(down, g).t().contiguous();
    }
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(2)) {
      at::Tensor g_down = contract_t(g, b);
      if (scaling != 1.0) {
        g_down.mul_(scaling);
      }
      if (ctx->needs_input_grad(2)) {
        grad_a = reduce_t(g_down, x2);
      }
      if (ctx->needs_input_grad(0)) {
        grad_x = expand_t<Epilogue::Store>(g_down, a, x2.scalar_type(), nullptr)
                     .view(ctx->saved_data["x_sizes"].toIntVector());
      }
    }
    return {grad_x, grads[0], grad_a, grad_b, at::Tensor()};
#else
    TORCH_CHECK(false, "the LoRA kernels need x86-64");
#endif
  }
};

}  // namespace

extern "C" {

// One rank-r product on its own (what the floor times, and tests check): op 0 `a [m, k] @ b [k,
// r]` (a bf16 or f32), op 1 `a [m, r] @ b [r, n]` (f32, result f32), op 2 `a^T @ b` for a [k, r]
// f32 and b [k, n] (bf16 or f32), r <= 64.
char* nibble_lora_rank_product(int32_t op, const at::Tensor* a, const at::Tensor* b,
                               at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(kernels_available(), "the LoRA kernels need a CPU with AVX-512 (F, BW, VL)");
    TORCH_CHECK(a->dim() == 2 && b->dim() == 2 && a->device().is_cpu() && b->device().is_cpu(),
                "rank products take 2-D CPU tensors");
    const at::Tensor x = a->contiguous(), y = b->contiguous();
#ifdef NIBBLE_LORA_X86
    at::Tensor z;
    switch (op) {
      case 0:
        TORCH_CHECK(x.size(1) == y.size(0) && y.size(1) >= 1 && y.size(1) <= kMaxRank &&
                        y.scalar_type() == at::kFloat,
                    "contract: a [m, k] @ b [k, r <= 64] f32");
        z = contract_t(x, y);
        break;
      case 1:
        TORCH_CHECK(x.size(1) == y.size(0) && x.size(1) >= 1 && x.size(1) <= kMaxRank &&
                        x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat,
                    "expand: a [m, r <= 64] f32 @ b [r, n] f32");
        z = expand_t<Epilogue::Store>(x, y, at::kFloat, nullptr);
        break;
      case 2:
        TORCH_CHECK(x.size(0) == y.size(0) && x.size(1) >= 1 && x.size(1) <= kMaxRank &&
                        x.scalar_type() == at::kFloat,
                    "reduce: a [k, r <= 64] f32, b [k, n]");
        z = reduce_t(x, y);
        break;
      default:
        TORCH_CHECK(false, "unknown rank product ", op);
    }
    *result = new at::Tensor(std::move(z));
#endif
  });
}

// 1 where this CPU runs the LoRA kernels (AVX-512 F, BW and VL), else 0.
int32_t nibble_lora_kernels_available() { return kernels_available() ? 1 : 0; }

// LoraUpdateFn: `base + ((x.to(f32) A^T) * scaling) B^T` in base's dtype, for f32 factors A
// [r, in], B [out, r] (r <= 64) and x, base of one dtype (bfloat16 or float32) on the CPU.
char* nibble_lora_update(const at::Tensor* x, const at::Tensor* base, const at::Tensor* a,
                         const at::Tensor* b, double scaling, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    TORCH_CHECK(kernels_available(), "the LoRA kernels need a CPU with AVX-512 (F, BW, VL)");
    TORCH_CHECK(a->dim() == 2 && b->dim() == 2 && a->size(0) == b->size(1),
                "LoRA factors must be A [r, in] and B [out, r], got ", a->sizes(), " and ", b->sizes());
    TORCH_CHECK(a->size(0) >= 1 && a->size(0) <= kMaxRank, "LoRA kernels take ranks 1 to ", kMaxRank,
                ", got ", a->size(0));
    TORCH_CHECK(a->scalar_type() == at::kFloat && b->scalar_type() == at::kFloat,
                "LoRA kernels take float32 factors");
    TORCH_CHECK(x->scalar_type() == base->scalar_type(), "input ", x->scalar_type(), " and base output ",
                base->scalar_type(), " must share a dtype");
    TORCH_CHECK(x->device().is_cpu() && base->device().is_cpu() && a->device().is_cpu() && b->device().is_cpu(),
                "LoRA kernels run on the CPU");
    TORCH_CHECK(x->size(-1) == a->size(1), "input has ", x->size(-1), " features, A expects ", a->size(1));
    TORCH_CHECK(base->size(-1) == b->size(0), "base output has ", base->size(-1), " features, B gives ",
                b->size(0));
    TORCH_CHECK(x->numel() / a->size(1) == base->numel() / b->size(0), "input and base output rows differ");
    at::Tensor y = LoraUpdateFn::apply(*x, *base, *a, *b, scaling);
    *result = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
