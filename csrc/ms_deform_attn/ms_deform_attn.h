// Host-side argument validation and shape bookkeeping for ms_deform_attn, shared by the
// CPU and CUDA registrations.
#pragma once

#include "../common/common.h"

namespace codetr {
namespace msda {

struct Dims {
  int64_t N, S, M, D, Q, L, P;
};

// Validates every argument and returns the problem sizes. Value-dependent checks (sizes
// non-negative, S == sum H*W, level_start_index consistent) read spatial_shapes, so they
// run only for CPU tensors: on CUDA they would force a host sync, and the kernel instead
// skips any level that does not fit inside S, so it never reads out of bounds.
inline Dims check_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index,
                         const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  check_dim(value, 4, op, "value", "[N, S, M, D]");
  check_dim(spatial_shapes, 2, op, "spatial_shapes", "[L, 2]");
  check_dim(level_start_index, 1, op, "level_start_index", "[L]");
  check_dim(sampling_locations, 6, op, "sampling_locations", "[N, Q, M, L, P, 2]");
  check_dim(attention_weights, 5, op, "attention_weights", "[N, Q, M, L, P]");
  check_floating(value, op, "value");
  check_dtype(spatial_shapes, at::kLong, op, "spatial_shapes");
  check_dtype(level_start_index, at::kLong, op, "level_start_index");
  check_same_device(value, spatial_shapes, op, "value", "spatial_shapes");
  check_same_device(value, level_start_index, op, "value", "level_start_index");
  check_same_device(value, sampling_locations, op, "value", "sampling_locations");
  check_same_device(value, attention_weights, op, "value", "attention_weights");

  const auto vt = value.scalar_type();
  const auto ct = sampling_locations.scalar_type();
  const bool reduced = vt == at::kHalf || vt == at::kBFloat16;
  CODETR_CHECK_ARG(ct == vt || (reduced && ct == at::kFloat), op,
                   " sampling_locations must have the dtype of value (", vt,
                   ") or float32 when value is float16/bfloat16, got ", ct);
  CODETR_CHECK_ARG(attention_weights.scalar_type() == ct, op,
                   " attention_weights must have the dtype of sampling_locations (", ct, "), got ",
                   attention_weights.scalar_type());

  Dims d;
  d.N = value.size(0);
  d.S = value.size(1);
  d.M = value.size(2);
  d.D = value.size(3);
  d.L = spatial_shapes.size(0);
  d.Q = sampling_locations.size(1);
  d.P = sampling_locations.size(4);
  CODETR_CHECK_ARG(spatial_shapes.size(1) == 2, op, " spatial_shapes must be [L, 2] (H, W), got ",
                   spatial_shapes.sizes());
  CODETR_CHECK_ARG(level_start_index.size(0) == d.L, op, " level_start_index must be [L] with L = ",
                   d.L, " (rows of spatial_shapes), got ", level_start_index.sizes());
  const auto ls = sampling_locations.sizes();
  CODETR_CHECK_ARG(ls[0] == d.N && ls[2] == d.M && ls[3] == d.L && ls[5] == 2, op,
                   " sampling_locations must be [N, Q, M, L, P, 2] = [", d.N, ", Q, ", d.M, ", ",
                   d.L, ", P, 2], got ", ls);
  const auto as = attention_weights.sizes();
  CODETR_CHECK_ARG(as[0] == d.N && as[1] == d.Q && as[2] == d.M && as[3] == d.L && as[4] == d.P,
                   op, " attention_weights must be [N, Q, M, L, P] = [", d.N, ", ", d.Q, ", ", d.M,
                   ", ", d.L, ", ", d.P, "], got ", as);

  if (spatial_shapes.device().is_cpu()) {
    const auto shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous();
    const int64_t* sh = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < d.L; ++l) {
      CODETR_CHECK_ARG(sh[2 * l] >= 0 && sh[2 * l + 1] >= 0, op,
                       " spatial_shapes must hold non-negative (H, W), got (", sh[2 * l], ", ",
                       sh[2 * l + 1], ") at level ", l);
      CODETR_CHECK_ARG(st[l] == total, op, " level_start_index[", l, "] must be ", total,
                       " (cumulative H*W of the previous levels), got ", st[l]);
      total += sh[2 * l] * sh[2 * l + 1];
    }
    CODETR_CHECK_ARG(total == d.S, op, " value has S = ", d.S,
                     " positions but spatial_shapes sums to ", total);
  }
  return d;
}

inline void check_grad_output(const char* op, const at::Tensor& grad_output,
                              const at::Tensor& value, const Dims& d) {
  check_same_device(value, grad_output, op, "value", "grad_output");
  CODETR_CHECK_ARG(grad_output.scalar_type() == value.scalar_type(), op,
                   " grad_output must have the dtype of value (", value.scalar_type(), "), got ",
                   grad_output.scalar_type());
  CODETR_CHECK_ARG(grad_output.dim() == 3 && grad_output.size(0) == d.N &&
                       grad_output.size(1) == d.Q && grad_output.size(2) == d.M * d.D,
                   op, " grad_output must be [N, Q, M*D] = [", d.N, ", ", d.Q, ", ", d.M * d.D,
                   "], got ", grad_output.sizes());
}

}  // namespace msda
}  // namespace codetr
