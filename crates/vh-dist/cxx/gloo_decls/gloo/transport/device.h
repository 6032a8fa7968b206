// Declaration-only stand-in: the torch wheel ships no gloo headers. See docs/distributed.md.
//
// Both types are only held through std::shared_ptr / std::unique_ptr in ProcessGroupGloo.hpp.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo
