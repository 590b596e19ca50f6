// Host-side argument validation and shape bookkeeping for roi_align, shared by the CPU and
// CUDA registrations.
#pragma once

#include "../common/common.h"

namespace codetr {
namespace roi_align {

struct Dims {
  int64_t N, C, H, W;  // input (forward) or grad_input (backward)
  int64_t K;           // number of RoIs
  int64_t PH, PW;      // pooled output size
};

// rois must be [K, 5] of input's dtype, or float32 when input is float16/bfloat16 (the
// coordinates and the arithmetic then stay in float32).
inline void check_rois(const char* op, const at::Tensor& rois, const at::Tensor& like,
                       const char* like_name) {
  check_dim(rois, 2, op, "rois", "[K, 5] (batch_index, x1, y1, x2, y2)");
  CODETR_CHECK_ARG(rois.size(1) == 5, op,
                   " rois must be [K, 5] (batch_index, x1, y1, x2, y2), got shape ", rois.sizes());
  check_same_device(like, rois, op, like_name, "rois");
  const auto vt = like.scalar_type();
  const auto rt = rois.scalar_type();
  const bool reduced = vt == at::kHalf || vt == at::kBFloat16;
  CODETR_CHECK_ARG(rt == vt || (reduced && rt == at::kFloat), op, " rois must have the dtype of ",
                   like_name, " (", vt, ") or float32 when ", like_name,
                   " is float16/bfloat16, got ", rt);
}

inline void check_pooled(const char* op, int64_t pooled_h, int64_t pooled_w,
                         int64_t sampling_ratio) {
  CODETR_CHECK_ARG(pooled_h > 0 && pooled_w > 0, op,
                   " output size (pooled_height, pooled_width) must be positive, got (", pooled_h,
                   ", ", pooled_w, ")");
  // <= 0 means adaptive; a huge fixed ratio is almost certainly a mistake that would
  // overflow the per-RoI sample count.
  CODETR_CHECK_ARG(sampling_ratio < (int64_t(1) << 20), op,
                   " sampling_ratio must be < 2^20 (or <= 0 for adaptive), got ", sampling_ratio);
}

// Batch indices (rois[:, 0]) must lie in [0, N) after torchvision's truncation toward zero.
// This reads the RoIs, so it runs only for CPU tensors: on CUDA it would force a host
// sync, and the kernels instead give a RoI with an invalid index a zero output and no
// gradient.
inline void check_batch_indices(const char* op, const at::Tensor& rois, int64_t N) {
  if (!rois.device().is_cpu() || rois.size(0) == 0) return;
  const auto b = rois.select(1, 0).to(at::kDouble).contiguous();
  const double* p = b.data_ptr<double>();
  for (int64_t k = 0; k < b.numel(); ++k) {
    // Written so that NaN fails it.
    CODETR_CHECK_ARG(p[k] > -1.0 && p[k] < static_cast<double>(N), op,
                     " rois[:, 0] must hold batch indices in [0, N) with N = ", N,
                     " (the input's batch size), got rois[", k, ", 0] = ", p[k]);
  }
}

inline Dims check_forward(const char* op, const at::Tensor& input, const at::Tensor& rois,
                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio) {
  check_dim(input, 4, op, "input", "[N, C, H, W]");
  check_floating(input, op, "input");
  check_rois(op, rois, input, "input");
  check_pooled(op, pooled_h, pooled_w, sampling_ratio);
  Dims d{input.size(0), input.size(1), input.size(2), input.size(3), rois.size(0), pooled_h,
         pooled_w};
  check_batch_indices(op, rois, d.N);
  return d;
}

inline Dims check_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& rois,
                           int64_t pooled_h, int64_t pooled_w, int64_t N, int64_t C, int64_t H,
                           int64_t W, int64_t sampling_ratio) {
  check_dim(grad_output, 4, op, "grad_output", "[K, C, pooled_height, pooled_width]");
  check_floating(grad_output, op, "grad_output");
  check_rois(op, rois, grad_output, "grad_output");
  check_pooled(op, pooled_h, pooled_w, sampling_ratio);
  CODETR_CHECK_ARG(N >= 0 && C >= 0 && H >= 0 && W >= 0, op,
                   " input sizes (batch_size, channels, height, width) must be non-negative, got (",
                   N, ", ", C, ", ", H, ", ", W, ")");
  const auto gs = grad_output.sizes();
  CODETR_CHECK_ARG(gs[0] == rois.size(0) && gs[1] == C && gs[2] == pooled_h && gs[3] == pooled_w,
                   op, " grad_output must be [K, C, pooled_height, pooled_width] = [",
                   rois.size(0), ", ", C, ", ", pooled_h, ", ", pooled_w, "], got ", gs);
  Dims d{N, C, H, W, rois.size(0), pooled_h, pooled_w};
  check_batch_indices(op, rois, d.N);
  return d;
}

}  // namespace roi_align
}  // namespace codetr
