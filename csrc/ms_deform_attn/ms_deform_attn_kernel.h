// Per-sample arithmetic of multi-scale deformable attention, shared by the CPU loop and
// the CUDA kernel (DESIGN.md section 3): the CPU tests execute exactly this math.
//
// Convention (Deformable DETR, identical to grid_sample with align_corners=False and zero
// padding): a normalised location (x, y) in [0, 1] maps to the pixel coordinate
// (x * W - 0.5, y * H - 0.5); the value is bilinearly interpolated between the four
// neighbouring pixel centres, and corners outside the map contribute zero.
#pragma once

#include "../common/common.h"

namespace codetr {
namespace msda {

// floor for the coordinates that reach it (finite, >= -1): truncation, corrected for
// negative non-integers. Unlike std::floor it is inlined without SSE4.1 (no libm call).
template <typename T>
CODETR_HOST_DEVICE T floor_(T x) {
  const T t = static_cast<T>(static_cast<int64_t>(x));
  return t > x ? t - T(1) : t;
}

// One bilinear sample on one level. Corner c in {0: (h_low, w_low), 1: (h_low, w_high),
// 2: (h_high, w_low), 3: (h_high, w_high)}; `pixel[c]` is y * W + x within the level, or
// -1 when the corner lies outside the map (its weight is then 0).
template <typename acc_t>
struct Sample {
  int64_t pixel[4];
  acc_t weight[4];
  // Fractional parts and their complements, kept for the coordinate gradient.
  acc_t lh, lw, hh, hw;
  bool inside;  // false: no corner is inside the map, the sample contributes nothing
};

// Inlined on the host too: left as a call on the CPU kernels' rare path (a sample with a
// corner off an unpadded map), it made GCC keep the forward's sums in memory through the
// whole sample loop, since a call clobbers every vector register.
#if !defined(__CUDACC__) && defined(__GNUC__)
#define CODETR_MSDA_INLINE __attribute__((always_inline))
#else
#define CODETR_MSDA_INLINE
#endif

template <typename acc_t>
CODETR_HOST_DEVICE CODETR_MSDA_INLINE Sample<acc_t> make_sample(acc_t loc_x, acc_t loc_y,
                                                                int64_t H, int64_t W) {
  Sample<acc_t> s;
  const acc_t h_im = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w_im = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  // Written so that NaN coordinates fail the test (floor(NaN) -> int64 is undefined).
  // h_im == -1 is kept: the corner at row 0 then has weight 0 but a non-zero gradient,
  // exactly as in grid_sample.
  // A zero-size level has no corner on its map: nothing of it is inside.
  s.inside = (H > 0 && W > 0 && h_im >= acc_t(-1) && w_im >= acc_t(-1) &&
              h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W));
  if (!s.inside) {
    for (int c = 0; c < 4; ++c) {
      s.pixel[c] = -1;
      s.weight[c] = acc_t(0);
    }
    s.lh = s.lw = s.hh = s.hw = acc_t(0);
    return s;
  }
  const acc_t h_floor = floor_(h_im);
  const acc_t w_floor = floor_(w_im);
  const int64_t h_low = static_cast<int64_t>(h_floor);
  const int64_t w_low = static_cast<int64_t>(w_floor);
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  s.lh = h_im - h_floor;
  s.lw = w_im - w_floor;
  s.hh = acc_t(1) - s.lh;
  s.hw = acc_t(1) - s.lw;
  const bool top = h_low >= 0, bottom = h_high <= H - 1;
  const bool left = w_low >= 0, right = w_high <= W - 1;
  s.pixel[0] = (top && left) ? h_low * W + w_low : -1;
  s.pixel[1] = (top && right) ? h_low * W + w_high : -1;
  s.pixel[2] = (bottom && left) ? h_high * W + w_low : -1;
  s.pixel[3] = (bottom && right) ? h_high * W + w_high : -1;
  s.weight[0] = s.pixel[0] >= 0 ? s.hh * s.hw : acc_t(0);
  s.weight[1] = s.pixel[1] >= 0 ? s.hh * s.lw : acc_t(0);
  s.weight[2] = s.pixel[2] >= 0 ? s.lh * s.hw : acc_t(0);
  s.weight[3] = s.pixel[3] >= 0 ? s.lh * s.lw : acc_t(0);
  return s;
}

// Interpolated value of one channel, given the four corner values (0 outside the map).
template <typename acc_t>
CODETR_HOST_DEVICE acc_t interpolate(const Sample<acc_t>& s, acc_t v0, acc_t v1, acc_t v2,
                                     acc_t v3) {
  return s.weight[0] * v0 + s.weight[1] * v1 + s.weight[2] * v2 + s.weight[3] * v3;
}

// Gradients of one sample, given its four corner dot products over the channels,
//   dot[c] = sum_channels g * value[corner c]   (0 for a corner outside the map),
// g being the upstream gradient of the output row. With a the attention weight:
//   d out / d a          = sum_c weight[c] dot[c]                      (the interpolated value)
//   d out / d location x = a W (hh (dot[1] - dot[0]) + lh (dot[3] - dot[2]))
//   d out / d location y = a H (hw (dot[2] - dot[0]) + lw (dot[3] - dot[1]))
// (pixel = location * size - 0.5). Four sums over the channels instead of three that each
// need the corner differences per channel: the backward's channel loop is then four
// multiply-adds per channel besides the grad_value updates (a * weight[c] * g per corner).
template <typename acc_t>
struct SampleGrad {
  acc_t attn, x, y;
};

template <typename acc_t, typename size_t_>
CODETR_HOST_DEVICE SampleGrad<acc_t> sample_grad(const Sample<acc_t>& s, acc_t a,
                                                 const acc_t dot[4], size_t_ H, size_t_ W) {
  SampleGrad<acc_t> r;
  r.attn = s.weight[0] * dot[0] + s.weight[1] * dot[1] + s.weight[2] * dot[2] +
           s.weight[3] * dot[3];
  r.x = a * (s.hh * (dot[1] - dot[0]) + s.lh * (dot[3] - dot[2])) * static_cast<acc_t>(W);
  r.y = a * (s.hw * (dot[2] - dot[0]) + s.lw * (dot[3] - dot[1])) * static_cast<acc_t>(H);
  return r;
}

}  // namespace msda
}  // namespace codetr
