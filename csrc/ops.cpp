// Every operator schema of codetr, declared once. CPU and CUDA kernels are registered
// separately in <op>/<op>_cpu.cpp and <op>/<op>_cuda.cu; fake (meta) kernels and
// autograd are registered from Python (codetr/ops).
#include <torch/library.h>

TORCH_LIBRARY(codetr, m) {
  // Multi-scale deformable attention (Deformable DETR).
  //   value [N, S, M, D], spatial_shapes [L, 2] int64 (H, W), level_start_index [L] int64,
  //   sampling_locations [N, Q, M, L, P, 2] normalised (x, y), attention_weights
  //   [N, Q, M, L, P]  ->  [N, Q, M*D]
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  //   -> (grad_value, grad_sampling_locations, grad_attention_weights)
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");

  // Box overlaps (mmdetection's bbox_overlaps): boxes1 [B, N, 4], boxes2 [B, M, 4] xyxy,
  // mode "iou" | "iof" | "giou"  ->  [B, N, M], or [B, N] when aligned (N == M)
  m.def("box_iou(Tensor boxes1, Tensor boxes2, str mode, bool aligned, float eps) -> Tensor");
  //   grad [B, N, M] or [B, N]  ->  (grad_boxes1 [B, N, 4], grad_boxes2 [B, M, 4])
  m.def(
      "box_iou_backward(Tensor grad, Tensor boxes1, Tensor boxes2, str mode, bool aligned, "
      "float eps) -> (Tensor, Tensor)");
  // GIoU loss per pair (torchvision's generalized_box_iou_loss, no reduction):
  //   pred [K, 4], target [K, 4] xyxy  ->  [K]
  m.def("generalized_box_iou_loss(Tensor pred, Tensor target, float eps) -> Tensor");
  //   grad [K]  ->  (grad_pred [K, 4], grad_target [K, 4])
  m.def(
      "generalized_box_iou_loss_backward(Tensor grad, Tensor pred, Tensor target, float eps) "
      "-> (Tensor, Tensor)");
  // Non-maximum suppression (torchvision's nms / batched_nms): boxes [K, 4] xyxy,
  // scores [K], idxs [K] int64  ->  kept indices [K'] int64, by decreasing score
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");

  // ATSS assignment (mmdetection's ATSSAssigner), batched over padded gts.
  //   anchors [A, 4] xyxy, num_anchors_per_level: A_l summing to A, gt_boxes [B, G, 4],
  //   gt_counts [B] int64  ->  (assigned [B, A] int64: 0 negative, k + 1 gt k;
  //   max_iou [B, A] float32, or float64 for float64 boxes)
  m.def(
      "atss_assign(Tensor anchors, int[] num_anchors_per_level, Tensor gt_boxes, "
      "Tensor gt_counts, int topk=9) -> (Tensor, Tensor)");
  // Max-IoU assignment (mmdetection's MaxIoUAssigner), batched over padded gts.
  //   priors [A, 4] or [B, A, 4], gt_boxes [B, G, 4], gt_counts [B] int64; negatives where
  //   neg_iou_lo <= max_iou < neg_iou_hi  ->  (assigned [B, A] int64: -1 ignored,
  //   0 negative, k + 1 gt k; max_iou [B, A] float32, or float64 for float64 boxes)
  m.def(
      "max_iou_assign(Tensor priors, Tensor gt_boxes, Tensor gt_counts, float pos_iou_thr, "
      "float neg_iou_lo, float neg_iou_hi, float min_pos_iou, bool match_low_quality, "
      "bool gt_max_assign_all) -> (Tensor, Tensor)");

  // RoIAlign (Mask R-CNN), torchvision.ops.roi_align's semantics.
  //   input [N, C, H, W], rois [K, 5] (batch_index, x1, y1, x2, y2)
  //   -> [K, C, pooled_height, pooled_width]
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  //   grad_output [K, C, pooled_height, pooled_width] -> grad_input [batch_size, channels,
  //   height, width] (the RoIs get no gradient)
  m.def(
      "roi_align_backward(Tensor grad_output, Tensor rois, float spatial_scale, "
      "int pooled_height, int pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
      "SymInt width, int sampling_ratio, bool aligned) -> Tensor");
}
