// torch's fused AdamW step (`torch.optim.AdamW(fused=True)`, transformers' default
// `adamw_torch_fused`) behind one C function: tch does not bind ATen's list-of-tensors ops, and
// calling the kernel itself is the only way to its exact bits (its vector and scalar paths round
// differently, and which elements take which depends on the thread count).

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

char* error_message(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

std::vector<at::Tensor> gather(const at::Tensor* const* ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

extern "C" {

void nibble_sft_free_error(char* err) { std::free(err); }

// One AdamW step over n parameters, as torch's `_fused_adamw` takes it: each parameter's grad,
// moments and f32 step count (incremented by the caller first, as torch's optimizer does).
// Returns nullptr, or a malloc'd error message.
char* nibble_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                         const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                         const at::Tensor* const* steps, int64_t n, double lr, double beta1, double beta2,
                         double weight_decay, double eps) {
  try {
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    auto s = gather(steps, n);
    std::vector<at::Tensor> max_v;
    at::_fused_adamw_(p, g, m, v, max_v, s, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, /*grad_scale=*/std::nullopt, /*found_inf=*/std::nullopt);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception in the fused AdamW step");
  }
}

}  // extern "C"
