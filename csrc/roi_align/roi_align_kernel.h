// Per-RoI and per-sample arithmetic of RoIAlign (Mask R-CNN, He et al. 2017), shared by
// the CPU loops and the CUDA kernels (DESIGN.md section 3): the CPU tests execute exactly
// this math.
//
// Semantics are torchvision.ops.roi_align's, operation for operation (so that float32 and
// float64 results agree with it bit for bit on the CPU):
//   - a RoI (b, x1, y1, x2, y2) is scaled by spatial_scale and, when aligned, shifted by
//     -0.5 pixel; without `aligned` its width and height are forced to at least 1;
//   - each of the pooled_height x pooled_width bins averages grid_h x grid_w bilinear
//     samples at the centres of a regular sub-grid; grid = sampling_ratio when > 0, else
//     ceil(roi_size / pooled_size) (adaptive), and the average divides by
//     max(grid_h * grid_w, 1);
//   - a sample outside [-1, H] x [-1, W] contributes 0; inside, a coordinate <= 0 is
//     clamped to 0 and one in the last pixel row/column sticks to it (no interpolation
//     with the zero padding beyond).
#pragma once

#include "../common/common.h"

namespace codetr {
namespace roi_align {

// Where one RoI's samples lie, in pixel coordinates of the feature map.
template <typename T>
struct Geometry {
  int64_t batch;     // image index; -1 when rois[k, 0] is not in [0, N) (nothing is sampled)
  T start_h, start_w;  // top-left corner of the RoI
  T bin_h, bin_w;      // bin size
  int64_t grid_h, grid_w;  // samples per bin along each axis (0: the bin is empty)
  T count;             // divisor of the average: max(grid_h * grid_w, 1)
};

// Adaptive grid size, ceil(extent / pooled), as an integer. Non-finite or non-positive
// extents give 0 samples (where torchvision's float->int cast would be undefined).
template <typename T>
CODETR_HOST_DEVICE int64_t adaptive_grid(T extent, int64_t pooled) {
  const T g = ceil(extent / static_cast<T>(pooled));
  // Written so that NaN fails the test. The upper bound only keeps the cast defined: a
  // RoI needing 2^30 samples per bin side would not finish anyway.
  return (g > T(0) && g < T(1 << 30)) ? static_cast<int64_t>(g) : 0;
}

// rois_k points at one row (b, x1, y1, x2, y2); N is the batch size of the input.
template <typename T>
CODETR_HOST_DEVICE Geometry<T> make_geometry(const T* rois_k, T spatial_scale, int64_t N,
                                             int64_t pooled_h, int64_t pooled_w,
                                             int64_t sampling_ratio, bool aligned) {
  Geometry<T> g;
  // torchvision truncates the batch index to int; the range test comes first so that the
  // cast is defined (NaN fails it).
  const T b = rois_k[0];
  g.batch = (b > T(-1) && b < static_cast<T>(N)) ? static_cast<int64_t>(b) : -1;
  // No rounding of the RoI: this is the point of RoIAlign.
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = rois_k[1] * spatial_scale - offset;
  g.start_h = rois_k[2] * spatial_scale - offset;
  const T end_w = rois_k[3] * spatial_scale - offset;
  const T end_h = rois_k[4] * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {
    // Legacy mode: malformed RoIs are forced to 1x1 (NaN stays NaN, as in std::max(NaN, 1)).
    roi_w = roi_w < T(1) ? T(1) : roi_w;
    roi_h = roi_h < T(1) ? T(1) : roi_h;
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_h, pooled_h);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_w, pooled_w);
  const int64_t n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i (of `grid`) in bin p along one axis: the centre of the i-th
// sub-cell, evaluated in torchvision's order of operations.
template <typename T>
CODETR_HOST_DEVICE T sample_coord(T start, T bin, int64_t p, int64_t i, int64_t grid) {
  return start + static_cast<T>(p) * bin + (static_cast<T>(i) + T(0.5)) * bin / static_cast<T>(grid);
}

// Bilinear weights of one sample: `pos[c]` is y * W + x of corner c in {0: (y_low, x_low),
// 1: (y_low, x_high), 2: (y_high, x_low), 3: (y_high, x_high)}. When !valid the sample
// contributes nothing (pos and w are then 0).
template <typename T>
struct Bilinear {
  int64_t pos[4];
  T w[4];
  bool valid;
};

template <typename T>
CODETR_HOST_DEVICE Bilinear<T> bilinear(T y, T x, int64_t H, int64_t W) {
  Bilinear<T> s;
  // Written as !(in range) so that NaN coordinates are rejected too; an empty map has no
  // sample.
  s.valid = H > 0 && W > 0 && y >= T(-1) && y <= static_cast<T>(H) && x >= T(-1) &&
            x <= static_cast<T>(W);
  if (!s.valid) {
    for (int c = 0; c < 4; ++c) {
      s.pos[c] = 0;
      s.w[c] = T(0);
    }
    return s;
  }
  if (y <= T(0)) y = T(0);
  if (x <= T(0)) x = T(0);
  int64_t y_low = static_cast<int64_t>(y);
  int64_t x_low = static_cast<int64_t>(x);
  int64_t y_high, x_high;
  // In the last row/column the sample sticks to it (weight 1 on the border pixel).
  if (y_low >= H - 1) {
    y_high = y_low = H - 1;
    y = static_cast<T>(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= W - 1) {
    x_high = x_low = W - 1;
    x = static_cast<T>(x_low);
  } else {
    x_high = x_low + 1;
  }
  const T ly = y - static_cast<T>(y_low);
  const T lx = x - static_cast<T>(x_low);
  const T hy = T(1) - ly, hx = T(1) - lx;
  s.w[0] = hy * hx;
  s.w[1] = hy * lx;
  s.w[2] = ly * hx;
  s.w[3] = ly * lx;
  s.pos[0] = y_low * W + x_low;
  s.pos[1] = y_low * W + x_high;
  s.pos[2] = y_high * W + x_low;
  s.pos[3] = y_high * W + x_high;
  return s;
}

// One sample's contribution to a bin of one channel (forward), in torchvision's order.
template <typename T, typename scalar_t>
CODETR_HOST_DEVICE T interpolate(const Bilinear<T>& s, const scalar_t* plane) {
  return s.w[0] * static_cast<T>(plane[s.pos[0]]) + s.w[1] * static_cast<T>(plane[s.pos[1]]) +
         s.w[2] * static_cast<T>(plane[s.pos[2]]) + s.w[3] * static_cast<T>(plane[s.pos[3]]);
}

// Gradient that corner c of a sample receives from its bin's upstream gradient g
// (backward), in torchvision's order: g * w / count.
template <typename T>
CODETR_HOST_DEVICE T corner_grad(T g, T w, T count) {
  return g * w / count;
}

}  // namespace roi_align
}  // namespace codetr
