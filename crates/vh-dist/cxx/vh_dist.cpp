// C ABI over PyTorch's own c10d (TCPStore + ProcessGroupGloo) for the vh-dist crate.
//
// Every entry point catches every exception and turns it into an error code plus a malloc'ed
// message, because an exception unwinding into Rust frames is undefined behaviour. Tensors are
// passed as `at::Tensor*`, which is what tch's `C_tensor` pointers are (torch-sys' libtch
// typedefs `tensor` as `torch::Tensor*`); results are returned as `new at::Tensor`, which tch's
// `Tensor::from_ptr` takes ownership of.

// The wheel is built with Gloo (libtorch_cpu exports c10d::ProcessGroupGloo); its header hides the
// class unless the build says so.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

// The shim is compiled against declaration-only gloo headers (see docs/distributed.md); the
// class layout must still be the one libtorch_cpu was built with. libtorch_cpu's own
// `make_intrusive<ProcessGroupGloo>` (in ProcessGroupGloo::split) allocates 0x1e8 bytes (objdump of libtorch_cpu.so, torch 2.11.0): if a
// future wheel changes the class, this stops the build instead of corrupting the heap.
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8,
              "c10d::ProcessGroupGloo layout differs from the one libtorch_cpu was built with");

namespace {

enum Code : int {
  kOk = 0,
  kStore = 1,     // c10::DistStoreError: rendezvous key-value store (includes its timeouts)
  kNetwork = 2,   // c10::DistNetworkError: sockets, a peer closed the connection
  kBackend = 3,   // c10::DistBackendError: the collective backend failed
  kTorch = 4,     // other c10::Error (bad tensor, bad argument)
  kOther = 5,     // any other std::exception
  kUnknown = 6,   // anything not derived from std::exception
};

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) {
    std::memcpy(p, s.c_str(), s.size() + 1);
  }
  return p;
}

// Runs `f`, mapping exceptions to a code; most-derived classes are caught first.
template <typename F>
int guarded(char** err, F&& f) {
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

}  // namespace

struct vhd_pg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

extern "C" {

void vhd_free_string(char* s) { std::free(s); }

// Rendezvous through a TCPStore at addr:port (rank 0 hosts it and waits for `world` clients),
// then builds a Gloo group whose store keys are those Python's default group uses
// ("default_pg" / "0/" / "cpu/"), so a Python `init_process_group("gloo")` rank can join.
int vhd_init(const char* addr, int port, int rank, int world, int64_t timeout_ms, vhd_pg** out,
             char** err) {
  *out = nullptr;
  return guarded(err, [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
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
    store = c10::make_intrusive<c10d::PrefixStore>("cpu/", store);
    // create_default picks the transport device as Python's constructor does (GLOO_SOCKET_IFNAME,
    // else this host's name, else loopback) without the shim touching any gloo type.
    auto gloo_opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gloo_opts);
    *out = new vhd_pg{tcp, backend, timeout};
  });
}

void vhd_free(vhd_pg* pg) {
  // Destructors of c10d objects may throw (e.g. a store already gone); never let that escape.
  try {
    delete pg;
  } catch (...) {
  }
}

// Sums `t` in place across ranks.
int vhd_all_reduce_sum(vhd_pg* pg, at::Tensor* t, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = pg->timeout;
    pg->backend->allreduce(ts, opts)->wait(pg->timeout);
  });
}

// Overwrites `t` on every rank with root's `t`.
int vhd_broadcast(vhd_pg* pg, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    opts.timeout = pg->timeout;
    pg->backend->broadcast(ts, opts)->wait(pg->timeout);
  });
}

int vhd_barrier(vhd_pg* pg, char** err) {
  return guarded(err, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = pg->timeout;
    pg->backend->barrier(opts)->wait(pg->timeout);
  });
}

// Gathers every rank's `t` into `outs[0..world)` (new tensors owned by the caller).
int vhd_all_gather(vhd_pg* pg, at::Tensor* t, int world, at::Tensor** outs, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> inputs{*t};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int i = 0; i < world; ++i) {
      outputs[0].push_back(at::empty_like(*t, at::MemoryFormat::Contiguous));
    }
    c10d::AllgatherOptions opts;
    opts.timeout = pg->timeout;
    pg->backend->allgather(outputs, inputs, opts)->wait(pg->timeout);
    for (int i = 0; i < world; ++i) {
      outs[i] = new at::Tensor(outputs[0][i]);
    }
  });
}

}  // extern "C"
