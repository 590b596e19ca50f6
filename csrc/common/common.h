// Shared helpers for every codetr operator: host/device qualifiers, argument checks,
// and the accumulation-type mapping used by all kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__CUDACC__)
#define CODETR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CODETR_HOST_DEVICE inline
#endif

namespace codetr {

// Accumulation type: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// a * b rounded on its own. nvcc would otherwise fuse a product into a following add (FMA)
// and round differently from the CPU: assignments and NMS decisions must not depend on the
// device, and the CPU tests must execute the GPU's arithmetic.
CODETR_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CODETR_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Call on a CPU tensor just allocated, before anything writes to it. glibc serves buffers
// of 32 MiB and more (its largest mmap threshold) from fresh mmap pages every call: the
// first write faults them in one 4 KiB page at a time, the kernel zeroing each
// (torch.empty(2, 22223, 256).fill_(1), case A's 45 MB output: 15.5 ms, single-threaded).
// Asking for transparent huge pages (THP's "madvise" mode, the default of many
// distributions) faults them in 2 MiB at a time: 3.9 ms. Smaller buffers may be reused heap
// memory, where it did not pay (case C's 11 MB: f+b 59 vs 56 ms). Only a hint: a kernel
// without THP, or another allocator, ignores it.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = t.nbytes();
  if (!t.device().is_cpu() || bytes < (size_t{32} << 20)) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// Every check names the operator argument and what was expected, so a user sees
// "ms_deform_attn: value must be 4-d [N, S, M, D], got 3-d" rather than a crash.
#define CODETR_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, op, ":", __VA_ARGS__)

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  CODETR_CHECK_ARG(t.dim() == dim, op, " ", name, " must be ", dim, "-d ", shape, ", got ",
                   t.dim(), "-d tensor of shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  CODETR_CHECK_ARG(a.device() == b.device(), op, " ", name_b, " must be on the same device as ",
                   name_a, " (", a.device(), "), got ", b.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op,
                        const char* name) {
  CODETR_CHECK_ARG(t.scalar_type() == dtype, op, " ", name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  CODETR_CHECK_ARG(at::isFloatingType(t.scalar_type()), op, " ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

// Runs body(item, scratch) for item in [0, items) on at::parallel_for's threads, handing out
// items one at a time from a shared counter; init() is called once per thread and its result
// (scratch buffers) passed to body. at::parallel_for splits a range into one fixed chunk per
// thread, so on our shared machines a thread that gets descheduled held up the whole call;
// here the other threads take over its remaining items. Which thread runs an item does not
// change its result, so kernels stay deterministic.
//
// `work` is the call's total work and `grain` the work below which a second thread does not
// pay (both in the caller's unit, the grain measured per kernel): a call gets at most
// work / grain threads, so a small call runs inline and waits for no thread. (Before, every
// call started min(items, threads) threads and joined them all: on a loaded machine a
// decoder-sized call whose second thread was not scheduled took milliseconds instead of
// microseconds.) A call big enough for a team still joins it at OpenMP's barrier. Helpers
// from ATen's inter-op pool, which the caller need not join, were measured and rejected:
// under a competing load they won (decoder forward 2.1 vs 5.8 ms), but on a quiet machine
// they fought OpenMP's threads, which spin for a while after every ATen op, for the cores
// (decoder forward+backward 8.5 vs 5.2 ms); benchmarks/results/small_calls.json.
template <typename Init, typename Body>
void parallel_items(int64_t items, double work, double grain, const Init& init, const Body& body) {
  if (items <= 0) return;
  const double by_work = grain > 0 ? std::min(work / grain, 1e9) : 1e9;
  const int64_t workers = std::min<int64_t>(
      {items, at::get_num_threads(), std::max<int64_t>(1, static_cast<int64_t>(by_work))});
  if (workers == 1) {
    auto scratch = init();
    for (int64_t i = 0; i < items; ++i) body(i, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = init();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      body(i, scratch);
    }
  });
}

}  // namespace codetr
