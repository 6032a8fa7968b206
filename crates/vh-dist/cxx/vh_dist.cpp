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
// `make_intrusive<ProcessGroupGloo>` (in ProcessGroupGloo::split) allocates 0x1e8 bytes
// (objdump of libtorch_cpu.so, torch 2.11.0): if a future wheel changes the class, this stops
// the build instead of corrupting the heap.
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8,
              "c10d::ProcessGroupGloo layout differs from the one libtorch_cpu was built with");

#include "vh_dist_common.hpp"

extern "C" {

void vhd_free_string(char* s) { std::free(s); }

// Rendezvous (see vhd::connect_store), then a Gloo group on the keys of Python's default group,
// so a Python `init_process_group("gloo")` rank can join.
int vhd_init(const char* addr, int port, int rank, int world, int64_t timeout_ms, vhd_pg** out,
             char** err) {
  *out = nullptr;
  return vhd::guarded(err, [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    auto [tcp, store] = vhd::connect_store(addr, port, rank, world, timeout, "cpu");
    // create_default fills in the transport devices (from GLOO_SOCKET_IFNAME, else the default
    // device) inside libtorch_cpu, so the shim never touches a gloo type.
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
  return vhd::guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = pg->timeout;
    pg->backend->allreduce(ts, opts)->wait(pg->timeout);
  });
}

// Overwrites `t` on every rank with root's `t`.
int vhd_broadcast(vhd_pg* pg, at::Tensor* t, int root, char** err) {
  return vhd::guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    opts.timeout = pg->timeout;
    pg->backend->broadcast(ts, opts)->wait(pg->timeout);
  });
}

int vhd_barrier(vhd_pg* pg, char** err) {
  return vhd::guarded(err, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = pg->timeout;
    pg->backend->barrier(opts)->wait(pg->timeout);
  });
}

// Gathers every rank's `t` into `outs[0..world)` (new tensors owned by the caller).
int vhd_all_gather(vhd_pg* pg, at::Tensor* t, int world, at::Tensor** outs, char** err) {
  return vhd::guarded(err, [&] {
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
