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
