// The C ABI over libtorch's at::cuda::CUDAGraph that vh-cuda-graph calls. Every function catches
// every C++ exception and returns a code (0 ok, 1 error, 2 unavailable) with the message copied
// into the caller's buffer: no exception crosses into Rust, nothing aborts.
//
// Compiled only when the libtorch headers, libtorch_cuda and the CUDA runtime headers are found
// (see build.rs); otherwise stub.cpp provides the same functions, each answering "unavailable".

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

namespace {

// Only functions exported by libc10_cuda / libtorch_cuda are called (no guard classes with
// inline CUDA runtime calls), so the binaries need not link the CUDA runtime themselves.

// Makes `device` current and, while capturing, a side stream current on it; restores both.
struct StreamSwitch {
  c10::DeviceIndex previous_device = -1;
  std::optional<c10::cuda::CUDAStream> previous_stream;

  void enter(c10::DeviceIndex device, std::optional<c10::cuda::CUDAStream> stream) {
    previous_device = c10::cuda::ExchangeDevice(device);
    if (stream.has_value()) {
      previous_stream = c10::cuda::getCurrentCUDAStream(device);
      c10::cuda::setCurrentCUDAStream(*stream);
    }
  }

  void leave() {
    if (previous_stream.has_value()) {
      c10::cuda::setCurrentCUDAStream(*previous_stream);
      previous_stream.reset();
    }
    if (previous_device >= 0) {
      c10::cuda::SetDevice(previous_device);
      previous_device = -1;
    }
  }
};

struct Graph {
  at::cuda::CUDAGraph graph;
  // Held from capture_begin to capture_end: the device, and the side stream captured on.
  StreamSwitch capturing;
  bool in_capture = false;
  c10::DeviceIndex device = -1;
  bool captured = false;
};

int fail(const std::string& what, char* err, size_t len) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", what.c_str());
  }
  return 1;
}

template <typename F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what(), err, len);
  } catch (...) {
    return fail("unknown C++ exception", err, len);
  }
}

}  // namespace

extern "C" {

int vh_cg_available(void) { return 1; }

int vh_cg_device_count(int* count, char* err, size_t len) {
  return guarded(err, len, [&] { *count = static_cast<int>(c10::cuda::device_count()); });
}

int vh_cg_create(void** out, char* err, size_t len) {
  *out = nullptr;
  return guarded(err, len, [&] { *out = new Graph(); });
}

void vh_cg_destroy(void* handle) {
  if (handle == nullptr) return;
  auto* g = static_cast<Graph*>(handle);
  try {
    if (g->in_capture) {
      g->capturing.leave();
    }
    delete g;
  } catch (...) {
    // A destructor that throws leaves the graph leaked rather than the process aborted.
  }
}

int vh_cg_capture_begin(void* handle, int device, char* err, size_t len) {
  auto* g = static_cast<Graph*>(handle);
  int rc = guarded(err, len, [&] {
    if (g->captured || g->in_capture) {
      throw std::runtime_error("this graph is already captured (or capturing)");
    }
    g->device = static_cast<c10::DeviceIndex>(device);
    auto side = c10::cuda::getStreamFromPool(false, g->device);
    g->in_capture = true;
    g->capturing.enter(g->device, std::nullopt);
    // What is queued so far (the inputs, a warm-up step) must be done before the side stream
    // starts capturing, as torch.cuda.graph does.
    c10::cuda::device_synchronize();
    // Capture on a side stream from the pool (never the default stream), into the graph's own
    // private memory pool; thread-local mode, so other threads' CUDA calls are not disturbed.
    g->capturing.leave();
    g->capturing.enter(g->device, side);
    g->graph.capture_begin(at::cuda::MempoolId_t{0, 0}, cudaStreamCaptureModeThreadLocal);
  });
  if (rc != 0 && g->in_capture) {
    try {
      g->capturing.leave();
    } catch (...) {
    }
    g->in_capture = false;
  }
  return rc;
}

int vh_cg_capture_end(void* handle, char* err, size_t len) {
  auto* g = static_cast<Graph*>(handle);
  if (!g->in_capture) {
    return fail("capture_end without capture_begin", err, len);
  }
  int rc = guarded(err, len, [&] { g->graph.capture_end(); });
  if (rc != 0) {
    // An invalidated capture throws before the allocator stops routing this stream's
    // allocations to the graph's pool; stop it here (a second stop throws, and is ignored).
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(g->device, g->graph.pool());
    } catch (...) {
    }
  } else {
    g->captured = true;
  }
  try {
    g->capturing.leave();
  } catch (...) {
  }
  g->in_capture = false;
  return rc;
}

int vh_cg_replay(void* handle, char* err, size_t len) {
  auto* g = static_cast<Graph*>(handle);
  return guarded(err, len, [&] {
    if (!g->captured) {
      throw std::runtime_error("replay of a graph that was not captured");
    }
    StreamSwitch on_device;
    on_device.enter(g->device, std::nullopt);
    try {
      g->graph.replay();
    } catch (...) {
      on_device.leave();
      throw;
    }
    on_device.leave();
  });
}

int vh_cg_synchronize(int device, char* err, size_t len) {
  return guarded(err, len, [&] {
    StreamSwitch on_device;
    on_device.enter(static_cast<c10::DeviceIndex>(device), std::nullopt);
    try {
      c10::cuda::device_synchronize();
    } catch (...) {
      on_device.leave();
      throw;
    }
    on_device.leave();
  });
}

int vh_cg_memory_stats(int device, uint64_t* allocated_peak, uint64_t* reserved_peak, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated_peak = static_cast<uint64_t>(stats.allocated_bytes[aggregate].peak);
    *reserved_peak = static_cast<uint64_t>(stats.reserved_bytes[aggregate].peak);
  });
}

int vh_cg_reset_peak_memory(int device, char* err, size_t len) {
  return guarded(err, len, [&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

}  // extern "C"
