// Shared helpers for every codetr operator: host/device qualifiers, argument checks,
// and the accumulation-type mapping used by all kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#if defined(__CUDACC__)
#define CODETR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CODETR_HOST_DEVICE inline
#endif

namespace codetr {

// Accumulation type: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Every check names the operator argument and what was expected, so a user sees
// "ms_deform_attn: value must be 4-d [N, S, M, D], got 3-d" rather than a crash.
#define CODETR_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

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

}  // namespace codetr
