// oneDNN's linear over dense tensors (`mkldnn::_linear_pointwise`, the operator torch.compile's
// CPU backend calls) for Rust: tch binds `mkldnn_linear`, which takes oneDNN-layout inputs and
// so costs two conversions per call. Tensors arrive as tch's handles (`torch::Tensor*`); the
// result goes back as a new handle that Rust owns; errors come back as text, never as an
// exception crossing into Rust.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/List.h>

#include <cstddef>
#include <optional>
#include <stdexcept>

#include "shim_guard.h"

namespace {
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// Looked up once; `nullopt` in the optional when this libtorch does not register it.
const c10::TypedOperatorHandle<LinearPointwise>* op() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!found.has_value()) return std::nullopt;
    return found->typed<LinearPointwise>();
  }();
  return handle.has_value() ? &*handle : nullptr;
}
}  // namespace

// 1 when the operator is registered in this libtorch.
extern "C" int vh_linear_pointwise_available() { return op() != nullptr ? 1 : 0; }

// `x @ weight^T (+ bias)`; `bias` may be null. 0 on success with `*out` set.
extern "C" int vh_linear_pointwise(at::Tensor* x, at::Tensor* weight, at::Tensor* bias, at::Tensor** out,
                                   char* err, size_t len) {
  return vh_shim::guard("mkldnn::_linear_pointwise", err, len, [&] {
    auto handle = op();
    if (handle == nullptr) throw std::runtime_error("mkldnn::_linear_pointwise is not registered in this libtorch");
    std::optional<at::Tensor> b;
    if (bias != nullptr) b = *bias;
    at::Tensor y = handle->call(*x, *weight, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
    *out = new at::Tensor(std::move(y));
  });
}

// ---------------------------------------------------------------------------------------------
// `x @ weight^T (+ bias)` for a few rows of f32 (a decode step's products), AVX2 + FMA.
//
// With 1 to 8 rows a product is a stream over the weight: each weight element feeds at most 8
// multiply-adds. MKL packs the whole weight on every call and oneDNN's kernel reaches about a
// third of the memory bandwidth there (2-core AMD EPYC, torch 2.11: a 424 MB weight by 8 rows
// in 42 ms; this kernel 26). Each output is a dot product of a weight row with an input row:
// blocks of 3 weight rows meet groups of up to 4 input rows (12 accumulators), every input row
// group reuses the block from L1, and the next blocks are prefetched. Threads split the output
// features through ATen's own pool.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <immintrin.h>

namespace {
constexpr int kFeatures = 3;       // weight rows per block
constexpr long kPrefetchBlocks = 4;  // how far ahead the next weight rows are fetched

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// out[r * ldo + f] = sum_k x[r * k_dim + k] * w[f * k_dim + k] (+ bias[f]) for R rows and F
// weight rows; `bias` may be null; `prefetch` (or null) is a later block to pull into cache.
template <int R, int F>
__attribute__((target("avx2,fma"))) inline void dot_block(const float* x, long k_dim, const float* w,
                                                          const float* bias, float* out, long ldo,
                                                          const float* prefetch) {
  __m256 acc[R][F];
  for (int r = 0; r < R; r++)
    for (int f = 0; f < F; f++) acc[r][f] = _mm256_setzero_ps();
  long k = 0;
  for (; k + 8 <= k_dim; k += 8) {
    __m256 wv[F];
    for (int f = 0; f < F; f++) wv[f] = _mm256_loadu_ps(w + f * k_dim + k);
    if (prefetch != nullptr && (k & 15) == 0)
      for (int f = 0; f < F; f++) _mm_prefetch(reinterpret_cast<const char*>(prefetch + f * k_dim + k), _MM_HINT_T0);
    for (int r = 0; r < R; r++) {
      __m256 xv = _mm256_loadu_ps(x + r * k_dim + k);
      for (int f = 0; f < F; f++) acc[r][f] = _mm256_fmadd_ps(wv[f], xv, acc[r][f]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int f = 0; f < F; f++) {
      float s = horizontal_sum(acc[r][f]);
      for (long t = k; t < k_dim; t++) s += w[f * k_dim + t] * x[r * k_dim + t];
      // The bias after the whole sum, as `y.add_(bias)` would: one rounding, the same result,
      // and no second pass over the output on the decode step.
      out[r * ldo + f] = bias != nullptr ? s + bias[f] : s;
    }
}

// Every input row against F weight rows, in groups of 4 rows.
template <int F>
__attribute__((target("avx2,fma"))) void feature_block(const float* x, long rows, long k_dim, const float* w,
                                                       const float* bias, float* out, long n,
                                                       const float* prefetch) {
  long r = 0;
  for (; r + 4 <= rows; r += 4)
    dot_block<4, F>(x + r * k_dim, k_dim, w, bias, out + r * n, n, r == 0 ? prefetch : nullptr);
  const float* pf = r == 0 ? prefetch : nullptr;
  switch (rows - r) {
    case 3: dot_block<3, F>(x + r * k_dim, k_dim, w, bias, out + r * n, n, pf); break;
    case 2: dot_block<2, F>(x + r * k_dim, k_dim, w, bias, out + r * n, n, pf); break;
    case 1: dot_block<1, F>(x + r * k_dim, k_dim, w, bias, out + r * n, n, pf); break;
    default: break;
  }
}

__attribute__((target("avx2,fma"))) void small_rows_range(const float* x, long rows, long k_dim, const float* w,
                                                          const float* bias, long n, float* out, long begin,
                                                          long end) {
  long j = begin;
  for (; j + kFeatures <= end; j += kFeatures) {
    long ahead = j + kPrefetchBlocks * kFeatures;
    const float* pf = ahead + kFeatures <= n ? w + ahead * k_dim : nullptr;
    feature_block<kFeatures>(x, rows, k_dim, w + j * k_dim, bias == nullptr ? nullptr : bias + j, out + j, n, pf);
  }
  for (; j < end; j++)
    feature_block<1>(x, rows, k_dim, w + j * k_dim, bias == nullptr ? nullptr : bias + j, out + j, n, nullptr);
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
}  // namespace

// The most rows `vh_small_rows_linear` takes.
extern "C" int vh_small_rows_linear_max_rows() { return 8; }

// 1 when this CPU has AVX2 and FMA, which the small-rows kernel needs.
extern "C" int vh_small_rows_linear_available() { return cpu_has_avx2_fma() ? 1 : 0; }

// `x @ weight^T (+ bias)` for x [rows, in] with 1 to 8 rows, weight [out, in] contiguous, bias
// [out] or null, all f32 on CPU (the caller checks kinds and devices). 0 on success.
extern "C" int vh_small_rows_linear(at::Tensor* x, at::Tensor* weight, at::Tensor* bias, at::Tensor** out,
                                    char* err, size_t len) {
  return vh_shim::guard("small-rows linear", err, len, [&] {
    if (!cpu_has_avx2_fma()) throw std::runtime_error("this CPU lacks AVX2 or FMA");
    const at::Tensor input = x->contiguous();
    const at::Tensor& w = *weight;
    if (input.dim() != 2 || w.dim() != 2 || !w.is_contiguous() || input.size(1) != w.size(1))
      throw std::runtime_error("expected x [rows, in] and a contiguous weight [out, in]");
    const long rows = input.size(0), k_dim = input.size(1), n = w.size(0);
    if (rows < 1 || rows > 8) throw std::runtime_error("the small-rows kernel takes 1 to 8 rows");
    at::Tensor b;
    if (bias != nullptr) {
      b = bias->contiguous();
      if (b.dim() != 1 || b.size(0) != n) throw std::runtime_error("expected a bias [out]");
    }
    at::Tensor y = at::empty({rows, n}, input.options());
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const float* xp = input.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    // Split the features among threads only where each part streams at least 64 KB of weight.
    const long blocks = (n + kFeatures - 1) / kFeatures;
    const long grain = std::max<long>(1, 16384 / std::max<long>(1, kFeatures * k_dim));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      small_rows_range(xp, rows, k_dim, wp, bp, n, yp, b0 * kFeatures, std::min<long>(n, b1 * kFeatures));
    });
    *out = new at::Tensor(std::move(y));
  });
}
