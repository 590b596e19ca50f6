// Host-side argument validation and bookkeeping of the assigners, shared by the CPU and CUDA
// registrations.
#pragma once

#include <algorithm>
#include <vector>

#include "../common/common.h"

namespace codetr {
namespace assign {

// The dtype the kernels compute in: float32 for half/bfloat16/float32 boxes, float64 when
// any box input is float64. max_iou is returned in it.
inline at::ScalarType compute_dtype(const at::Tensor& boxes, const at::Tensor& gt_boxes) {
  return at::promote_types(at::promote_types(boxes.scalar_type(), gt_boxes.scalar_type()),
                           at::kFloat);
}

// gt_boxes [B, G, 4] floating and gt_counts [B] int64 on the device of `boxes`.
inline void check_gts(const char* op, const at::Tensor& boxes, const char* boxes_name,
                      const at::Tensor& gt_boxes, const at::Tensor& gt_counts) {
  check_dim(gt_boxes, 3, op, "gt_boxes", "[B, G, 4]");
  CODETR_CHECK_ARG(gt_boxes.size(2) == 4, op, " gt_boxes must be [B, G, 4], got ",
                   gt_boxes.sizes());
  check_floating(gt_boxes, op, "gt_boxes");
  check_dim(gt_counts, 1, op, "gt_counts", "[B]");
  CODETR_CHECK_ARG(gt_counts.size(0) == gt_boxes.size(0), op, " gt_counts must be [B] with B = ",
                   gt_boxes.size(0), " (the batch of gt_boxes), got ", gt_counts.sizes());
  check_dtype(gt_counts, at::kLong, op, "gt_counts");
  check_same_device(boxes, gt_boxes, op, boxes_name, "gt_boxes");
  check_same_device(boxes, gt_counts, op, boxes_name, "gt_counts");
  // Reading the counts on CUDA would need a host sync: there the kernels clamp them to
  // [0, G] instead.
  if (gt_counts.device().is_cpu()) {
    const auto counts = gt_counts.contiguous();
    const int64_t* c = counts.data_ptr<int64_t>();
    const int64_t G = gt_boxes.size(1);
    for (int64_t b = 0; b < counts.numel(); ++b) {
      CODETR_CHECK_ARG(c[b] >= 0 && c[b] <= G, op, " gt_counts must lie in [0, G = ", G,
                       "], got gt_counts[", b, "] = ", c[b]);
    }
  }
}

// ATSS: validates the arguments and returns the level boundaries start[0..L] (start[L] = A).
inline std::vector<int64_t> check_atss(const at::Tensor& anchors,
                                       at::IntArrayRef num_anchors_per_level,
                                       const at::Tensor& gt_boxes, const at::Tensor& gt_counts,
                                       int64_t topk) {
  const char* op = "atss_assign";
  check_dim(anchors, 2, op, "anchors", "[A, 4]");
  CODETR_CHECK_ARG(anchors.size(1) == 4, op, " anchors must be [A, 4], got ", anchors.sizes());
  check_floating(anchors, op, "anchors");
  check_gts(op, anchors, "anchors", gt_boxes, gt_counts);
  CODETR_CHECK_ARG(topk > 0, op, " topk must be positive, got ", topk);
  std::vector<int64_t> start(1, 0);
  for (const int64_t n : num_anchors_per_level) {
    CODETR_CHECK_ARG(n >= 0, op, " num_anchors_per_level must be non-negative, got ",
                     num_anchors_per_level);
    start.push_back(start.back() + n);
  }
  CODETR_CHECK_ARG(start.back() == anchors.size(0), op,
                   " num_anchors_per_level must sum to A = ", anchors.size(0), ", got ",
                   num_anchors_per_level, " (sum ", start.back(), ")");
  return start;
}

// Candidates per gt: sum over levels of min(topk, A_l).
inline int64_t atss_num_candidates(const std::vector<int64_t>& start, int64_t topk) {
  int64_t C = 0;
  for (size_t l = 0; l + 1 < start.size(); ++l) C += std::min(topk, start[l + 1] - start[l]);
  return C;
}

// MaxIoUAssigner: priors [A, 4] (shared) or [B, A, 4].
inline void check_max_iou(const at::Tensor& priors, const at::Tensor& gt_boxes,
                          const at::Tensor& gt_counts) {
  const char* op = "max_iou_assign";
  CODETR_CHECK_ARG((priors.dim() == 2 || priors.dim() == 3) && priors.size(-1) == 4, op,
                   " priors must be [A, 4] or [B, A, 4], got ", priors.sizes());
  check_floating(priors, op, "priors");
  check_gts(op, priors, "priors", gt_boxes, gt_counts);
  CODETR_CHECK_ARG(priors.dim() == 2 || priors.size(0) == gt_boxes.size(0), op,
                   " priors must be [B, A, 4] with B = ", gt_boxes.size(0),
                   " (the batch of gt_boxes), got ", priors.sizes());
}

}  // namespace assign
}  // namespace codetr
