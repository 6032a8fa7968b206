// oneDNN's linear over dense tensors (`mkldnn::_linear_pointwise`, the operator torch.compile's
// CPU backend calls) for Rust: tch binds `mkldnn_linear`, which takes oneDNN-layout inputs and
// so costs two conversions per call. Tensors arrive as tch's handles (`torch::Tensor*`); the
// result goes back as a new handle that Rust owns; errors come back as text, never as an
// exception crossing into Rust.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/List.h>

#include <cstddef>
#include <optional>
#include <stdexcept>

#include "shim_guard.h"

namespace {
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// Looked up once; `nullopt` in the optional when this libtorch does not register it.
const c10::TypedOperatorHandle<LinearPointwise>* op() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!found.has_value()) return std::nullopt;
    return found->typed<LinearPointwise>();
  }();
  return handle.has_value() ? &*handle : nullptr;
}
}  // namespace

// 1 when the operator is registered in this libtorch.
extern "C" int vh_linear_pointwise_available() { return op() != nullptr ? 1 : 0; }

// `x @ weight^T (+ bias)`; `bias` may be null. 0 on success with `*out` set.
extern "C" int vh_linear_pointwise(at::Tensor* x, at::Tensor* weight, at::Tensor* bias, at::Tensor** out,
                                   char* err, size_t len) {
  return vh_shim::guard("mkldnn::_linear_pointwise", err, len, [&] {
    auto handle = op();
    if (handle == nullptr) throw std::runtime_error("mkldnn::_linear_pointwise is not registered in this libtorch");
    std::optional<at::Tensor> b;
    if (bias != nullptr) b = *bias;
    at::Tensor y = handle->call(*x, *weight, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
    *out = new at::Tensor(std::move(y));
  });
}
