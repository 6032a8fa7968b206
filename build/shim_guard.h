// Shared by the optional C++ shims over libtorch (vh-core's oneDNN linear, vh-train's fused
// AdamW): every entry point returns 0 on success, or 1 with a NUL-terminated message in `err`,
// so that no C++ exception crosses into Rust.
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>
#include <string>

namespace vh_shim {

// Copies `what` into `err` (`len` bytes, truncated, always NUL-terminated).
inline void write_error(const char* what, char* err, size_t len) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

// Runs `body`; an exception becomes return code 1 and its message in `err`. `op` names the
// libtorch operator for an exception that carries no message.
template <typename F>
int guard(const char* op, char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, len);
  } catch (...) {
    write_error((std::string("unknown C++ exception in ") + op).c_str(), err, len);
  }
  return 1;
}

}  // namespace vh_shim
