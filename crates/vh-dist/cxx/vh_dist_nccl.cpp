// NCCL half of the shim (cargo feature `nccl`): the same group handle as Gloo, built on
// c10d::ProcessGroupNCCL from libtorch_cuda, with the CUDA and NCCL headers of the nvidia-*
// wheels that torch depends on. Collectives go through the shared entry points of vh_dist.cpp.

#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "vh_dist_common.hpp"

// As for Gloo: libtorch_cuda's own make_intrusive<ProcessGroupNCCL> (in ProcessGroupNCCL::split)
// allocates 0x458 bytes in torch 2.11.0+cu130; a mismatch means other headers than the build's.
static_assert(sizeof(c10d::ProcessGroupNCCL) == 0x458,
              "c10d::ProcessGroupNCCL layout differs from the one libtorch_cuda was built with");

extern "C" {

// Rendezvous, then an NCCL group on the keys of Python's default group for "cuda".
int vhd_init_nccl(const char* addr, int port, int rank, int world, int64_t timeout_ms,
                  vhd_pg** out, char** err) {
  *out = nullptr;
  return vhd::guarded(err, [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    auto [tcp, store] = vhd::connect_store(addr, port, rank, world, timeout, "cuda");
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
    *out = new vhd_pg{tcp, backend, timeout};
  });
}

}  // extern "C"
