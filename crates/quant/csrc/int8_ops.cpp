// LLM.int8() over libtorch: row-wise int8 quantization (the fast path of `src/int8.rs`) and the
// 8-bit linear layer's autograd Function. Both are built from ATen ops in the order
// bitsandbytes' torch-ops backend runs them, so every rounding is the same as its CPU path;
// `tests/ops.rs` checks the quantization against the Rust reference, `tests/linear.rs` the layer
// against bitsandbytes' numbers. Calling convention as in quant_ops.cpp.

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "ffi.h"

namespace {

using nibble::guarded;

// How the layer multiplies, as passed from Rust.
constexpr int32_t kDecomposed = 0;  // LLM.int8: int8 matmul plus outlier columns in float
constexpr int32_t kDequantized = 1;  // bitsandbytes' CPU training path: dequantize, then linear

// src/int8.rs: INV_127 and MM_DEQUANT_SCALE.
constexpr double kInv127 = 7.874015718698502e-3;
constexpr double kMmDequantScale = 6.200012e-05;

// Columns per exact float32 GEMM slice: |sum| <= 1024 * 128 * 128 = 2^24, so every partial sum
// of int8 products is an integer float32 holds exactly, whatever order the BLAS adds in.
constexpr int64_t kExactK = 1024;

// Row-wise int8 of a 2-D float tensor (any float dtype; compared with the threshold in that
// dtype, as torch compares): codes int8, SCB float32 [rows], outlier columns int64 (ascending).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rowwise(const at::Tensor& x,
                                                                double threshold) {
  TORCH_CHECK(x.dim() == 2, "expected a 2-D tensor, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "expected a float tensor, got ",
              x.scalar_type());
  at::Tensor a = x;
  at::Tensor cols = at::empty({0}, x.options().dtype(at::kLong));
  if (threshold > 0.0) {
    const at::Tensor outliers = a.abs().ge(threshold);
    cols = at::argwhere(outliers.any(0)).view({-1});
    a = a.masked_fill(outliers, 0);
  }
  if (x.size(1) == 0) {
    return {at::zeros(x.sizes(), x.options().dtype(at::kChar)),
            at::zeros({x.size(0)}, x.options().dtype(at::kFloat)), cols};
  }
  at::Tensor scb = std::get<0>(at::max(a.abs(), 1)).to(at::kFloat);
  // torch's `127.0 / t` is `t.reciprocal() * 127`.
  const at::Tensor scale = scb.unsqueeze(-1).reciprocal().mul(127.0);
  // A non-finite product (0 * inf in a zero row, x * inf for a subnormal absmax) is code 0.
  at::Tensor codes = at::round(a.mul(scale)).nan_to_num(0.0, 0.0, 0.0).to(at::kChar);
  if (cols.numel() > 0) {
    codes.index_fill_(1, cols, 0);
  }
  return {codes, scb, cols};
}

// bitsandbytes' int8_vectorwise_dequant: float32 (code * SCB) * (1/127).
at::Tensor dequantize_rowwise(const at::Tensor& codes, const at::Tensor& scb) {
  return codes.mul(scb.view({-1, 1})).mul(kInv127);
}

// The weight the backward (and the dequantizing forward) multiplies with, in `dtype`:
// code * (SCB * (1/127)), as bitsandbytes' MatMul8bitLt.backward computes it.
at::Tensor matmul_weight(const at::Tensor& codes, const at::Tensor& scb, at::ScalarType dtype) {
  return codes.to(dtype, /*non_blocking=*/false, /*copy=*/true).mul_(scb.unsqueeze(1).mul(kInv127));
}

// a [M, K] int8 times b [N, K] int8, transposed: the exact int32 product, by float32 GEMMs over
// slices of K that cannot round.
at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& b) {
  const int64_t k = a.size(1);
  if (k == 0) {
    return at::zeros({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  }
  at::Tensor acc;
  for (int64_t k0 = 0; k0 < k; k0 += kExactK) {
    const int64_t len = std::min(kExactK, k - k0);
    at::Tensor part =
        at::mm(a.narrow(1, k0, len).to(at::kFloat), b.narrow(1, k0, len).to(at::kFloat).t())
            .to(at::kInt);
    acc = acc.defined() ? acc.add_(part) : part;
  }
  return acc;
}

// y = x W^T (+ b) for a row-wise int8 weight, in x's dtype. Saves only the codes and SCB (tensors
// the layer holds anyway); backward rebuilds the dequantized weight.
struct Linear8bitFn : public torch::autograd::Function<Linear8bitFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& codes, const at::Tensor& scb,
                            const std::optional<at::Tensor>& bias, double threshold,
                            int64_t mode, bool upcast) {
    const int64_t out_features = codes.size(0);
    const int64_t in_features = codes.size(1);
    const bool has_bias = bias.has_value() && bias->defined();
    // upcast: x is 16-bit on a CPU without native 16-bit GEMMs; the float matmuls run in f32 on
    // the same 16-bit values and round once to x's dtype.
    const auto mm_dtype = upcast ? at::kFloat : x.scalar_type();
    at::Tensor y;
    if (mode == kDequantized) {
      // MatMul8bitFp: a plain linear on the dequantized weight, which dies with this call.
      const at::Tensor w = matmul_weight(codes, scb, x.scalar_type()).to(mm_dtype);
      const at::Tensor xm = x.to(mm_dtype);
      y = (has_bias ? at::linear(xm, w, bias->to(mm_dtype)) : at::linear(xm, w)).to(x.scalar_type());
    } else {
      const at::Tensor a = x.reshape({-1, in_features});
      // MatMul8bitLt: activations quantized row-wise in float16, outlier columns set aside.
      auto [ca, sca, cols] = quantize_rowwise(a.to(at::kHalf), threshold);
      const at::Tensor product = int8_matmul(ca, codes);
      y = product.mul(sca.unsqueeze(-1).mul(scb.unsqueeze(0))).mul(kMmDequantScale);
      if (has_bias) {
        y.add_(*bias);
      }
      y = y.to(x.scalar_type());
      if (cols.numel() > 0) {
        // The outlier columns in x's own dtype against the dequantized weight columns.
        const at::Tensor sub_a = a.index_select(1, cols).to(mm_dtype);
        const at::Tensor sub_b = dequantize_rowwise(codes.index_select(1, cols), scb)
                                     .to(x.scalar_type())
                                     .to(mm_dtype)
                                     .t();
        y = y.to(mm_dtype).addmm(sub_a, sub_b).to(x.scalar_type());
      }
    }
    ctx->save_for_backward({codes, scb});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["upcast"] = upcast;
    auto sizes = x.sizes().vec();
    sizes.back() = out_features;
    return y.view(sizes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& codes = saved[0];
    const at::Tensor& scb = saved[1];
    const int64_t out_features = codes.size(0);
    const int64_t in_features = codes.size(1);
    const at::Tensor& g = grads[0];
    const at::Tensor g2 = g.reshape({-1, out_features});
    const auto mm_dtype = ctx->saved_data["upcast"].toBool() ? at::kFloat : g.scalar_type();
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      // bitsandbytes' formula: grad_y @ (CB * (SCB / 127)), in the input's dtype (the output's).
      const at::Tensor w = matmul_weight(codes, scb, g.scalar_type()).to(mm_dtype);
      auto sizes = g.sizes().vec();
      sizes.back() = in_features;
      grad_x = at::mm(g2.to(mm_dtype), w).to(g.scalar_type()).view(sizes);
    }
    at::Tensor grad_b;
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_b = g2.to(mm_dtype).sum(0).to(g.scalar_type());
    }
    return {grad_x, at::Tensor(), at::Tensor(), grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_weight(const at::Tensor& codes, const at::Tensor& scb) {
  TORCH_CHECK(codes.defined() && codes.dim() == 2 && codes.scalar_type() == at::kChar,
              "weight codes must be a 2-D int8 tensor");
  TORCH_CHECK(scb.defined() && scb.dim() == 1 && scb.scalar_type() == at::kFloat &&
                  scb.size(0) == codes.size(0),
              "SCB must be float32 with one value per weight row (", codes.size(0), "), got ",
              scb.sizes());
}

}  // namespace

extern "C" {

// Row-wise int8 of a 2-D float tensor; see quantize_rowwise above.
char* nibble_int8_quantize_rowwise(const at::Tensor* x, double threshold, at::Tensor** codes_out,
                                   at::Tensor** scb_out, at::Tensor** cols_out) {
  return guarded([&] {
    *codes_out = nullptr;
    *scb_out = nullptr;
    *cols_out = nullptr;
    auto [codes, scb, cols] = quantize_rowwise(*x, threshold);
    *codes_out = new at::Tensor(std::move(codes));
    *scb_out = new at::Tensor(std::move(scb));
    *cols_out = new at::Tensor(std::move(cols));
  });
}

// (code * SCB) * (1/127) as float32 (matmul = 0), or code * (SCB * (1/127)) in float32 (0),
// float16 (1) or bfloat16 (2) (matmul = 1).
char* nibble_int8_dequantize(const at::Tensor* codes, const at::Tensor* scb, int32_t matmul,
                             int32_t out, at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    check_weight(*codes, *scb);
    TORCH_CHECK(out >= 0 && out <= 2, "unknown output dtype code ", out);
    constexpr at::ScalarType kOut[3] = {at::kFloat, at::kHalf, at::kBFloat16};
    at::Tensor t = matmul != 0 ? matmul_weight(*codes, *scb, kOut[out])
                               : dequantize_rowwise(*codes, *scb);
    *result = new at::Tensor(std::move(t));
  });
}

// Linear8bit forward through the autograd Function above: x [..., in] (float32, float16 or
// bfloat16), codes int8 [out, in], SCB float32 [out], bias [out] in x's dtype or null.
char* nibble_linear8bit_forward(const at::Tensor* x, const at::Tensor* codes, const at::Tensor* scb,
                                const at::Tensor* bias, double threshold, int32_t mode,
                                at::Tensor** result) {
  return guarded([&] {
    *result = nullptr;
    check_weight(*codes, *scb);
    // Bit 1 of `mode` asks for f32 matmuls on a 16-bit input (see Linear8bitFn).
    const bool upcast = (mode & 2) != 0;
    mode &= 1;
    TORCH_CHECK(mode == kDecomposed || mode == kDequantized, "unknown int8 matmul mode ", mode);
    TORCH_CHECK(x->dim() >= 1 && x->size(-1) == codes->size(1), "input has ",
                x->dim() == 0 ? 0 : x->size(-1),
                " features in its last dimension, the layer expects ", codes->size(1));
    std::optional<at::Tensor> b;
    if (bias != nullptr) {
      b = *bias;
    }
    at::Tensor y =
        Linear8bitFn::apply(*x, *codes, *scb, b, threshold, static_cast<int64_t>(mode), upcast);
    *result = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
