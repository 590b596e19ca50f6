// Per-pair box arithmetic shared by the CPU loops and the CUDA kernels (DESIGN.md section
// 3): IoU / IoF / GIoU of a pair (mmdetection's bbox_overlaps) and its gradient, the GIoU
// loss of a pair (torchvision's generalized_box_iou_loss) and its gradient, and the IoU
// that NMS compares with its threshold (torchvision's nms). The CPU tests execute exactly
// this math. Boxes are (x1, y1, x2, y2) in absolute pixels.
#pragma once

#include "../common/common.h"

namespace codetr {
namespace boxes {

enum class Overlap : int { kIoU = 0, kIoF = 1, kGIoU = 2 };

// std::max / std::min semantics, usable on the device; the CPU loops vectorize them to
// maxps / minps. max_(x, 0) lets NaN through, like torch.clamp(min=0).
template <typename T>
CODETR_HOST_DEVICE T max_(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
CODETR_HOST_DEVICE T min_(T a, T b) {
  return b < a ? b : a;
}


template <typename T>
CODETR_HOST_DEVICE T box_area(T x1, T y1, T x2, T y2) {
  return mul_rn(x2 - x1, y2 - y1);
}

// ---------------------------------------------------------------------------------------
// box_iou: mmdetection's bbox_overlaps, for one pair (a from boxes1, b from boxes2).
//   iou  = inter / max(area_a + area_b - inter, eps)
//   iof  = inter / max(area_a, eps)
//   giou = iou - (enclose - union) / enclose,  enclose = max(enclosing box area, eps)
// The eps clamps keep degenerate (zero-area) boxes finite. area_a, area_b come from
// box_area, computed once per box by the caller.
template <Overlap mode, typename T>
CODETR_HOST_DEVICE T overlap(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2,
                             T area_b, T eps) {
  const T w = max_(min_(ax2, bx2) - max_(ax1, bx1), T(0));
  const T h = max_(min_(ay2, by2) - max_(ay1, by1), T(0));
  const T inter = w * h;
  const T union_ = max_(mode == Overlap::kIoF ? area_a : area_a + area_b - inter, eps);
  const T iou = inter / union_;
  if (mode != Overlap::kGIoU) return iou;
  const T enclose_w = max_(max_(ax2, bx2) - min_(ax1, bx1), T(0));
  const T enclose_h = max_(max_(ay2, by2) - min_(ay1, by1), T(0));
  const T enclose = max_(enclose_w * enclose_h, eps);
  return iou - (enclose - union_) / enclose;
}

// Gradients of torch.maximum / torch.minimum / clamp(min=0), with autograd's rules: on a
// tie max and min split the gradient evenly, and clamp(x, min=0) passes it where x > 0
// (torch 2.x: none at x == 0). Selects between values computed up front, not branches:
// which box holds the max is data-dependent and unpredictable, and the CPU pair loops
// vectorize the selects (see the note on trapping math in box_ops_cpu.cpp).
template <typename T>
CODETR_HOST_DEVICE void max_backward(T a, T b, T g, T& ga, T& gb) {
  const T half = g * T(0.5);
  ga += a > b ? g : (a < b ? T(0) : half);
  gb += b > a ? g : (b < a ? T(0) : half);
}
template <typename T>
CODETR_HOST_DEVICE void min_backward(T a, T b, T g, T& ga, T& gb) {
  const T half = g * T(0.5);
  ga += a < b ? g : (a > b ? T(0) : half);
  gb += b < a ? g : (b > a ? T(0) : half);
}
// d max(x, eps) / dx for a tensor eps (mmdetection writes torch.max(union, eps)).
template <typename T>
CODETR_HOST_DEVICE T max_eps_gate(T x, T eps) {
  return x > eps ? T(1) : (x == eps ? T(0.5) : T(0));
}

// d box_area(x1, y1, x2, y2) * g, added to grad[4].
template <typename T>
CODETR_HOST_DEVICE void area_backward(T w, T h, T g, T* grad) {
  grad[0] -= g * h;
  grad[1] -= g * w;
  grad[2] += g * h;
  grad[3] += g * w;
}

// Gradient of overlap<mode>(a, b) times g, written to ga[4] and gb[4]; the same
// derivative as autograd of the pure-PyTorch reference (mmdetection's formula).
template <Overlap mode, typename T>
CODETR_HOST_DEVICE void overlap_backward(const T* a, const T* b, T eps, T g, T* out_a,
                                         T* out_b) {
  // Accumulated in registers and stored once (the CPU loops vectorize only then).
  T ga[4] = {T(0), T(0), T(0), T(0)}, gb[4] = {T(0), T(0), T(0), T(0)};
  const T w_raw = min_(a[2], b[2]) - max_(a[0], b[0]);
  const T h_raw = min_(a[3], b[3]) - max_(a[1], b[1]);
  const T w = max_(w_raw, T(0)), h = max_(h_raw, T(0));
  const T inter = w * h;
  const T aw = a[2] - a[0], ah = a[3] - a[1], bw = b[2] - b[0], bh = b[3] - b[1];
  const T area_a = aw * ah, area_b = bw * bh;
  const T union_raw = mode == Overlap::kIoF ? area_a : area_a + area_b - inter;
  const T union_ = max_(union_raw, eps);
  T g_inter = g / union_;
  T g_union = -g * inter / (union_ * union_);
  if (mode == Overlap::kGIoU) {
    // giou = iou - (enclose - union) / enclose
    const T ew_raw = max_(a[2], b[2]) - min_(a[0], b[0]);
    const T eh_raw = max_(a[3], b[3]) - min_(a[1], b[1]);
    const T ew = max_(ew_raw, T(0)), eh = max_(eh_raw, T(0));
    const T enclose_raw = ew * eh;
    const T enclose = max_(enclose_raw, eps);
    g_union += g / enclose;
    const T g_enclose = -g * union_ / (enclose * enclose) * max_eps_gate(enclose_raw, eps);
    const T g_ew = ew_raw > T(0) ? g_enclose * eh : T(0);
    const T g_eh = eh_raw > T(0) ? g_enclose * ew : T(0);
    max_backward(a[2], b[2], g_ew, ga[2], gb[2]);
    min_backward(a[0], b[0], -g_ew, ga[0], gb[0]);
    max_backward(a[3], b[3], g_eh, ga[3], gb[3]);
    min_backward(a[1], b[1], -g_eh, ga[1], gb[1]);
  }
  const T g_union_raw = g_union * max_eps_gate(union_raw, eps);
  area_backward(aw, ah, g_union_raw, ga);
  if (mode != Overlap::kIoF) {
    area_backward(bw, bh, g_union_raw, gb);
    g_inter -= g_union_raw;  // union = area_a + area_b - inter
  }
  const T g_w = w_raw > T(0) ? g_inter * h : T(0);
  const T g_h = h_raw > T(0) ? g_inter * w : T(0);
  min_backward(a[2], b[2], g_w, ga[2], gb[2]);
  max_backward(a[0], b[0], -g_w, ga[0], gb[0]);
  min_backward(a[3], b[3], g_h, ga[3], gb[3]);
  max_backward(a[1], b[1], -g_h, ga[1], gb[1]);
  for (int k = 0; k < 4; ++k) {
    out_a[k] = ga[k];
    out_b[k] = gb[k];
  }
}

// ---------------------------------------------------------------------------------------
// GIoU loss of one pair, torchvision's generalized_box_iou_loss term by term:
//   inter = (xk2 - xk1)(yk2 - yk1) where the boxes overlap strictly, else 0
//   iou = inter / (union + eps),  loss = 1 - (iou - (C - union) / (C + eps)),
// C the area of the smallest enclosing box.
template <typename T>
CODETR_HOST_DEVICE T giou_loss(const T* p, const T* t, T eps) {
  const T xk1 = max_(p[0], t[0]), yk1 = max_(p[1], t[1]);
  const T xk2 = min_(p[2], t[2]), yk2 = min_(p[3], t[3]);
  // torchvision: (xk2 - xk1) * (yk2 - yk1) where both are > 0, else 0. Written as a
  // product of clamped sides (the same value for finite boxes) rather than a branch or a
  // select, so that the CPU loop over pairs vectorizes.
  const T inter = max_(xk2 - xk1, T(0)) * max_(yk2 - yk1, T(0));
  const T union_ = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter;
  const T iou = inter / (union_ + eps);
  const T xc1 = min_(p[0], t[0]), yc1 = min_(p[1], t[1]);
  const T xc2 = max_(p[2], t[2]), yc2 = max_(p[3], t[3]);
  const T area_c = (xc2 - xc1) * (yc2 - yc1);
  return T(1) - (iou - (area_c - union_) / (area_c + eps));
}

// Gradient of giou_loss(p, t) times g, written to gp[4] and gt[4]: the derivative that
// autograd takes through torchvision's formula (including its tie rules).
template <typename T>
CODETR_HOST_DEVICE void giou_loss_backward(const T* p, const T* t, T eps, T g, T* out_p,
                                           T* out_t) {
  // Accumulated in registers and stored once (the CPU loop vectorizes only then).
  T gp[4] = {T(0), T(0), T(0), T(0)}, gt[4] = {T(0), T(0), T(0), T(0)};
  const T xk1 = max_(p[0], t[0]), yk1 = max_(p[1], t[1]);
  const T xk2 = min_(p[2], t[2]), yk2 = min_(p[3], t[3]);
  // 1 where the boxes overlap strictly (torchvision's mask), else 0; a factor rather than
  // a branch so that the CPU loop vectorizes (see giou_loss).
  const T overlaps = static_cast<T>((yk2 > yk1) & (xk2 > xk1));
  const T iw = xk2 - xk1, ih = yk2 - yk1;
  const T inter = iw * ih * overlaps;
  const T pw = p[2] - p[0], ph = p[3] - p[1], tw = t[2] - t[0], th = t[3] - t[1];
  const T union_ = pw * ph + tw * th - inter;
  const T xc1 = min_(p[0], t[0]), yc1 = min_(p[1], t[1]);
  const T xc2 = max_(p[2], t[2]), yc2 = max_(p[3], t[3]);
  const T cw = xc2 - xc1, ch = yc2 - yc1;
  const T inv_union = T(1) / (union_ + eps), inv_c = T(1) / (cw * ch + eps);
  // loss = 1 - inter / (union + eps) + (C - union) / (C + eps)
  const T g_union = g * inter * inv_union * inv_union - g * inv_c;
  const T g_inter = -g * inv_union - g_union;  // union = area_p + area_t - inter
  const T g_c = g * (union_ + eps) * inv_c * inv_c;
  area_backward(pw, ph, g_union, gp);
  area_backward(tw, th, g_union, gt);
  // No intersection gradient unless the boxes overlap strictly (torchvision's mask).
  const T g_iw = g_inter * ih * overlaps, g_ih = g_inter * iw * overlaps;
  min_backward(p[2], t[2], g_iw, gp[2], gt[2]);
  max_backward(p[0], t[0], -g_iw, gp[0], gt[0]);
  min_backward(p[3], t[3], g_ih, gp[3], gt[3]);
  max_backward(p[1], t[1], -g_ih, gp[1], gt[1]);
  const T g_cw = g_c * ch, g_ch = g_c * cw;
  max_backward(p[2], t[2], g_cw, gp[2], gt[2]);
  min_backward(p[0], t[0], -g_cw, gp[0], gt[0]);
  max_backward(p[3], t[3], g_ch, gp[3], gt[3]);
  min_backward(p[1], t[1], -g_ch, gp[1], gt[1]);
  for (int k = 0; k < 4; ++k) {
    out_p[k] = gp[k];
    out_t[k] = gt[k];
  }
}

// ---------------------------------------------------------------------------------------
// NMS: the IoU that torchvision's nms compares with its threshold, operation for
// operation (no eps: a degenerate pair gives 0/0 = NaN, which suppresses nothing), so that
// the kept indices are identical. area_a, area_b come from box_area.
template <typename T>
CODETR_HOST_DEVICE T nms_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2,
                             T area_b) {
  const T w = max_(T(0), min_(ax2, bx2) - max_(ax1, bx1));
  const T h = max_(T(0), min_(ay2, by2) - max_(ay1, by1));
  const T inter = mul_rn(w, h);
  return inter / (area_a + area_b - inter);
}

}  // namespace boxes
}  // namespace codetr
