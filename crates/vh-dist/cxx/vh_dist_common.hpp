// Shared by the Gloo and NCCL halves of the shim: the group handle and exception guard.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace vhd {

enum Code : int {
  kOk = 0,
  kStore = 1,     // c10::DistStoreError: rendezvous key-value store (includes its timeouts)
  kNetwork = 2,   // c10::DistNetworkError: sockets, a peer closed the connection
  kBackend = 3,   // c10::DistBackendError: the collective backend failed
  kTorch = 4,     // other c10::Error (bad tensor, bad argument)
  kOther = 5,     // any other std::exception
  kUnknown = 6,   // anything not derived from std::exception
};

inline char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) {
    std::memcpy(p, s.c_str(), s.size() + 1);
  }
  return p;
}

// Runs `f`, mapping exceptions to a code; most-derived classes are caught first.
template <typename F>
inline int guarded(char** err, F&& f) {
  try {
    f();
    return kOk;
  } catch (const c10::DistStoreError& e) {
    *err = dup(e.what_without_backtrace());
    return kStore;
  } catch (const c10::DistNetworkError& e) {
    *err = dup(e.what_without_backtrace());
    return kNetwork;
  } catch (const c10::DistBackendError& e) {
    *err = dup(e.what_without_backtrace());
    return kBackend;
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
    return kTorch;
  } catch (const std::exception& e) {
    *err = dup(e.what());
    return kOther;
  } catch (...) {
    *err = dup("unknown C++ exception");
    return kUnknown;
  }
}

// Rendezvous through a TCPStore at addr:port (rank 0 hosts it and waits for `world` clients).
// Returns the TCPStore and the store seen by Python's default group's backend for `device`:
// init_process_group wraps the store as PrefixStore("default_pg") / "0/" (the first group's
// name) / "<device>/", so a Python rank and a Rust rank meet on the same keys.
inline std::pair<c10::intrusive_ptr<c10d::Store>, c10::intrusive_ptr<c10d::Store>> connect_store(
    const char* addr, int port, int rank, int world, std::chrono::milliseconds timeout,
    const char* device) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = rank == 0;
  opts.numWorkers = static_cast<std::size_t>(world);
  opts.waitWorkers = true;
  opts.timeout = timeout;
  // Python's env:// rendezvous asks for a multi-tenant store; matching it lets several groups
  // of one process share the port.
  opts.multiTenant = true;
  c10::intrusive_ptr<c10d::Store> tcp = c10::make_intrusive<c10d::TCPStore>(addr, opts);
  c10::intrusive_ptr<c10d::Store> store =
      c10::make_intrusive<c10d::PrefixStore>("default_pg", tcp);
  store = c10::make_intrusive<c10d::PrefixStore>("0/", store);
  store = c10::make_intrusive<c10d::PrefixStore>(std::string(device) + "/", store);
  return {tcp, store};
}

}  // namespace vhd

struct vhd_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

