// Host-side argument validation and small host helpers for the box operators (box_iou,
// generalized_box_iou_loss, nms, batched_nms), shared by the CPU and CUDA registrations.
#pragma once

#include <c10/util/string_view.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../common/common.h"
#include "box_ops_kernel.h"

namespace codetr {
namespace boxes {

// Half/bfloat16 boxes are converted to float32 by the Python wrappers: box statistics are
// always computed in fp32 or fp64.
inline void check_box_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  CODETR_CHECK_ARG(s == at::kFloat || s == at::kDouble, op, " ", name,
                   " must be float32 or float64 (the Python wrapper converts float16/bfloat16 "
                   "and integer boxes to float32), got ", s);
}

// boxes: `dim`-d with 4 coordinates in the last dimension.
inline void check_boxes(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                        const char* shape) {
  check_dim(t, dim, op, name, shape);
  CODETR_CHECK_ARG(t.size(dim - 1) == 4, op, " ", name, " must be ", shape,
                   " with 4 coordinates (x1, y1, x2, y2) in the last dimension, got shape ",
                   t.sizes());
  check_box_dtype(t, op, name);
}

inline Overlap parse_mode(c10::string_view mode) {
  if (mode == "iou") return Overlap::kIoU;
  if (mode == "iof") return Overlap::kIoF;
  CODETR_CHECK_ARG(mode == "giou", "box_iou", " mode must be \"iou\", \"iof\" or \"giou\", got \"",
                   std::string(mode), "\"");
  return Overlap::kGIoU;
}

// Calls f(std::integral_constant<Overlap, mode>{}) so that the kernels are specialised per
// mode (no branch on the mode inside the pair loop).
template <typename F>
void dispatch_mode(Overlap mode, F&& f) {
  switch (mode) {
    case Overlap::kIoU:
      f(std::integral_constant<Overlap, Overlap::kIoU>{});
      break;
    case Overlap::kIoF:
      f(std::integral_constant<Overlap, Overlap::kIoF>{});
      break;
    case Overlap::kGIoU:
      f(std::integral_constant<Overlap, Overlap::kGIoU>{});
      break;
  }
}

struct IouDims {
  int64_t B, N, M;
  Overlap mode;
};

// boxes1 [B, N, 4], boxes2 [B, M, 4] (the Python wrapper broadcasts the batch shapes).
inline IouDims check_box_iou(const char* op, const at::Tensor& boxes1, const at::Tensor& boxes2,
                             c10::string_view mode, bool aligned) {
  check_boxes(boxes1, 3, op, "boxes1", "[B, N, 4]");
  check_boxes(boxes2, 3, op, "boxes2", "[B, M, 4]");
  check_same_device(boxes1, boxes2, op, "boxes1", "boxes2");
  CODETR_CHECK_ARG(boxes2.scalar_type() == boxes1.scalar_type(), op,
                   " boxes2 must have the dtype of boxes1 (", boxes1.scalar_type(), "), got ",
                   boxes2.scalar_type());
  CODETR_CHECK_ARG(boxes2.size(0) == boxes1.size(0), op, " boxes2 must be [B, M, 4] with B = ",
                   boxes1.size(0), " (batch of boxes1), got shape ", boxes2.sizes());
  IouDims d{boxes1.size(0), boxes1.size(1), boxes2.size(1), parse_mode(mode)};
  CODETR_CHECK_ARG(!aligned || d.N == d.M, op,
                   " boxes2 must hold as many boxes as boxes1 when aligned=True (N = ", d.N,
                   "), got M = ", d.M);
  return d;
}

// grad: [B, N, M], or [B, N] when aligned; same dtype and device as the boxes.
inline void check_iou_grad(const char* op, const at::Tensor& grad, const at::Tensor& boxes1,
                           const IouDims& d, bool aligned) {
  check_same_device(boxes1, grad, op, "boxes1", "grad");
  CODETR_CHECK_ARG(grad.scalar_type() == boxes1.scalar_type(), op,
                   " grad must have the dtype of boxes1 (", boxes1.scalar_type(), "), got ",
                   grad.scalar_type());
  const bool ok = aligned ? (grad.dim() == 2 && grad.size(0) == d.B && grad.size(1) == d.N)
                          : (grad.dim() == 3 && grad.size(0) == d.B && grad.size(1) == d.N &&
                             grad.size(2) == d.M);
  CODETR_CHECK_ARG(ok, op, " grad must be ", aligned ? "[B, N]" : "[B, N, M]", " = [", d.B, ", ",
                   d.N, aligned ? "" : ", ", aligned ? "" : std::to_string(d.M), "], got ",
                   grad.sizes());
}

// pred [K, 4], target [K, 4]; returns K.
inline int64_t check_giou_loss(const char* op, const at::Tensor& pred, const at::Tensor& target) {
  check_boxes(pred, 2, op, "pred", "[K, 4]");
  check_boxes(target, 2, op, "target", "[K, 4]");
  check_same_device(pred, target, op, "pred", "target");
  CODETR_CHECK_ARG(target.scalar_type() == pred.scalar_type(), op,
                   " target must have the dtype of pred (", pred.scalar_type(), "), got ",
                   target.scalar_type());
  CODETR_CHECK_ARG(target.size(0) == pred.size(0), op, " target must be [K, 4] with K = ",
                   pred.size(0), " (rows of pred), got shape ", target.sizes());
  return pred.size(0);
}

inline void check_loss_grad(const char* op, const at::Tensor& grad, const at::Tensor& pred) {
  check_same_device(pred, grad, op, "pred", "grad");
  CODETR_CHECK_ARG(grad.scalar_type() == pred.scalar_type(), op,
                   " grad must have the dtype of pred (", pred.scalar_type(), "), got ",
                   grad.scalar_type());
  CODETR_CHECK_ARG(grad.dim() == 1 && grad.size(0) == pred.size(0), op, " grad must be [K] = [",
                   pred.size(0), "], got ", grad.sizes());
}

// boxes [K, 4], scores [K] of the dtype of boxes, idxs [K] int64 (when defined).
inline int64_t check_nms(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                         const at::Tensor* idxs) {
  check_boxes(boxes, 2, op, "boxes", "[K, 4]");
  check_dim(scores, 1, op, "scores", "[K]");
  check_same_device(boxes, scores, op, "boxes", "scores");
  CODETR_CHECK_ARG(scores.scalar_type() == boxes.scalar_type(), op,
                   " scores must have the dtype of boxes (", boxes.scalar_type(), "), got ",
                   scores.scalar_type());
  const int64_t K = boxes.size(0);
  CODETR_CHECK_ARG(scores.size(0) == K, op, " scores must be [K] with K = ", K,
                   " (rows of boxes), got ", scores.sizes());
  if (idxs != nullptr) {
    check_dim(*idxs, 1, op, "idxs", "[K]");
    check_same_device(boxes, *idxs, op, "boxes", "idxs");
    check_dtype(*idxs, at::kLong, op, "idxs");
    CODETR_CHECK_ARG(idxs->size(0) == K, op, " idxs must be [K] with K = ", K,
                     " (rows of boxes), got ", idxs->sizes());
  }
  return K;
}

// The largest T not above `threshold`: for every T value v, v > threshold (compared in
// double, as torchvision does) iff v > threshold_below<T>(threshold) (compared in T), so
// the pair loop stays in T and still decides exactly like torchvision.
template <typename T>
T threshold_below(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

// The order torchvision's batched_nms returns. Up to `per_class_above` box coordinates
// (numel of boxes; 4,000 on CPU, 100,000 on CUDA) it runs one nms on offset boxes, whose
// order is a stable descending sort of the scores: `keep` is already in that order. Above
// it, torchvision runs nms per class and re-sorts the kept indices (taken in ascending
// order) with PyTorch's default, unstable descending sort; equal scores may then come in
// another order, which this reproduces with the same call.
inline at::Tensor order_like_torchvision(const at::Tensor& keep, const at::Tensor& boxes,
                                         const at::Tensor& scores, int64_t per_class_above) {
  if (boxes.numel() <= per_class_above) return keep;
  const at::Tensor ascending = std::get<0>(keep.sort());
  const at::Tensor order = std::get<1>(scores.index_select(0, ascending).sort(0, true));
  return ascending.index_select(0, order);
}

}  // namespace boxes
}  // namespace codetr
