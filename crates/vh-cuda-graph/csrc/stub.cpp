// Built instead of shim.cpp where the libtorch CUDA headers or libraries, or the CUDA runtime
// headers, were not found: the same C ABI, every call answering "unavailable" (code 2).

#include <cstddef>
#include <cstdint>
#include <cstdio>

#ifndef VH_CG_REASON
#define VH_CG_REASON "built without CUDA support"
#endif

namespace {
int unavailable(char* err, size_t len) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "CUDA graphs unavailable: %s", VH_CG_REASON);
  }
  return 2;
}
}  // namespace

extern "C" {
int vh_cg_available(void) { return 0; }
int vh_cg_device_count(int* count, char* err, size_t len) {
  *count = 0;
  return unavailable(err, len);
}
int vh_cg_create(void** out, char* err, size_t len) {
  *out = nullptr;
  return unavailable(err, len);
}
void vh_cg_destroy(void*) {}
int vh_cg_capture_begin(void*, int, char* err, size_t len) { return unavailable(err, len); }
int vh_cg_capture_end(void*, char* err, size_t len) { return unavailable(err, len); }
int vh_cg_replay(void*, char* err, size_t len) { return unavailable(err, len); }
int vh_cg_synchronize(int, char* err, size_t len) { return unavailable(err, len); }
int vh_cg_memory_stats(int, uint64_t* a, uint64_t* r, char* err, size_t len) {
  *a = 0;
  *r = 0;
  return unavailable(err, len);
}
int vh_cg_reset_peak_memory(int, char* err, size_t len) { return unavailable(err, len); }
}
