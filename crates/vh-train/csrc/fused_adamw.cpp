// libtorch's fused AdamW (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)` calls) for
// Rust: tch binds no such operator. Tensors arrive as tch's handles (`torch::Tensor*`); errors
// come back as text, never as an exception crossing into Rust.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstddef>
#include <vector>

#include "shim_guard.h"

namespace {
std::vector<at::Tensor> gather(at::Tensor** handles, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*handles[i]);
  return out;
}
}  // namespace

extern "C" int vh_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                              at::Tensor** exp_avg_sqs, at::Tensor** state_steps, size_t n,
                              double lr, double beta1, double beta2, double weight_decay,
                              double eps, char* err, size_t len) {
  return vh_shim::guard("at::_fused_adamw_", err, len, [&] {
    // The optimiser's step runs outside autograd, as torch.optim's does.
    at::NoGradGuard no_grad;
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    auto s = gather(state_steps, n);
    // No amsgrad (so no max_exp_avg_sqs), no maximize, no grad scaling: torch's defaults.
    std::vector<at::Tensor> none;
    at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps, false, false);
  });
}
