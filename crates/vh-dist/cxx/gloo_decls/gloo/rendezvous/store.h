// Declaration-only stand-in: the torch wheel ships no gloo headers. See docs/distributed.md.
//
// c10d::ProcessGroupGloo::GlooStore derives from this and overrides these four methods; the shim
// never constructs a GlooStore (libtorch_cpu does, with the real class), so only the names matter.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) = 0;
};
} // namespace rendezvous
} // namespace gloo
