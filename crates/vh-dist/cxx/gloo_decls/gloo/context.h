// Declaration-only stand-in: the torch wheel ships no gloo headers. See docs/distributed.md.
//
// ProcessGroupGloo.hpp only holds gloo::Context through std::shared_ptr, so the layout of
// c10d::ProcessGroupGloo does not depend on it. Its inline setTimeout override names
// Context::setTimeout, which must therefore be declared; the shim never calls it (the override is
// emitted only with the class's vtable, inside libtorch_cpu).
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
