// Arithmetic of the two assigners (atss_assign, max_iou_assign), shared by the CPU loops and
// the CUDA kernels (DESIGN.md section 3): the CPU tests execute exactly this math.
//
// Bitwise agreement with the pure-PyTorch references (codetr/ops/atss_assign.py,
// max_iou_assign.py) is the goal: each expression is mmdetection's, evaluated in the same
// order, with torch's NaN propagation, and products are never contracted into FMAs (nvcc
// would otherwise fuse a * b + c; the host build targets x86-64 without FMA).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/common.h"

namespace codetr {
namespace assign {

// mmdetection's bbox_overlaps clamps the union at eps = 1e-6.
constexpr double kIouEps = 1e-6;
// mmdetection's ATSSAssigner: overlaps of non-positive anchors are -INF, INF = 1e8.
constexpr double kAtssInf = 100000000.0;
// ATSS: an anchor centre must lie inside the gt by more than this on all four sides.
constexpr double kAtssMinInside = 0.01;
// max_iou_assign: priors are processed in blocks of this many; a block keeps, per gt, its
// largest IoU, so the low-quality pass revisits only the blocks holding a gt's maximum.
constexpr int64_t kPriorBlock = 256;

// ---- exact scalar helpers ---------------------------------------------------------------


template <typename T>
CODETR_HOST_DEVICE bool is_nan(T x) {
  return x != x;
}

template <typename T>
CODETR_HOST_DEVICE T sqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);  // correctly rounded for float and double (no fast-math)
#else
  return std::sqrt(x);
#endif
}

// torch.max / torch.min of two tensors: NaN propagates.
template <typename T>
CODETR_HOST_DEVICE T nan_max(T a, T b) {
  return (is_nan(a) || a > b) ? a : b;
}
template <typename T>
CODETR_HOST_DEVICE T nan_min(T a, T b) {
  return (is_nan(a) || a < b) ? a : b;
}
// tensor.clamp(min=0): NaN propagates.
template <typename T>
CODETR_HOST_DEVICE T clamp_min0(T x) {
  return x < T(0) ? T(0) : x;
}

// ---- IoU ----------------------------------------------------------------------------------

template <typename T>
CODETR_HOST_DEVICE T box_area(T x1, T y1, T x2, T y2) {
  return mul_rn(x2 - x1, y2 - y1);
}

// mmdetection's bbox_overlaps for one pair (mode "iou"); symmetric in its two boxes, bit for
// bit, so it serves both IoU(prior, gt) (ATSS) and IoU(gt, prior) (MaxIoUAssigner).
template <typename T>
CODETR_HOST_DEVICE T box_iou(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2,
                             T area_b) {
  const T w = clamp_min0(nan_min(ax2, bx2) - nan_max(ax1, bx1));
  const T h = clamp_min0(nan_min(ay2, by2) - nan_max(ay1, by1));
  const T overlap = mul_rn(w, h);
  const T uni = nan_max(area_a + area_b - overlap, static_cast<T>(kIouEps));
  return overlap / uni;
}

// IoU of two xyxy boxes stored as 4 consecutive values.
template <typename T>
CODETR_HOST_DEVICE T box_iou(const T* a, const T* b) {
  return box_iou(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]), b[0], b[1], b[2], b[3],
                 box_area(b[0], b[1], b[2], b[3]));
}

// ---- ATSS ---------------------------------------------------------------------------------

// Centre coordinate of a box side pair: mmdetection's (x1 + x2) / 2.0.
template <typename T>
CODETR_HOST_DEVICE T centre(T lo, T hi) {
  return (lo + hi) / T(2);
}

// Squared centre distance, (px - gx)^2 + (py - gy)^2; mmdetection's distance is its sqrt.
template <typename T>
CODETR_HOST_DEVICE T sq_distance(T px, T py, T gx, T gy) {
  const T dx = px - gx, dy = py - gy;
  return mul_rn(dx, dx) + mul_rn(dy, dy);
}

// Candidate order: nearer first, NaN after every number, equal distances by lower index.
template <typename T>
CODETR_HOST_DEVICE bool nearer(T da, int64_t ia, T db, int64_t ib) {
  const bool na = is_nan(da), nb = is_nan(db);
  if (na || nb) return na ? (nb && ia < ib) : true;
  return da < db || (da == db && ia < ib);
}

// A bounded max-heap (under `nearer`) of the k nearest anchors seen so far: its root is the
// farthest kept, the one a nearer newcomer replaces.
template <typename T>
CODETR_HOST_DEVICE void heap_sift_up(T* dist, int64_t* idx, int64_t i) {
  while (i > 0) {
    const int64_t parent = (i - 1) / 2;
    if (!nearer(dist[parent], idx[parent], dist[i], idx[i])) return;
    const T d = dist[i];
    dist[i] = dist[parent];
    dist[parent] = d;
    const int64_t a = idx[i];
    idx[i] = idx[parent];
    idx[parent] = a;
    i = parent;
  }
}

template <typename T>
CODETR_HOST_DEVICE void heap_sift_down(T* dist, int64_t* idx, int64_t n) {
  int64_t i = 0;
  while (true) {
    const int64_t l = 2 * i + 1, r = l + 1;
    int64_t far = i;
    if (l < n && nearer(dist[far], idx[far], dist[l], idx[l])) far = l;
    if (r < n && nearer(dist[far], idx[far], dist[r], idx[r])) far = r;
    if (far == i) return;
    const T d = dist[i];
    dist[i] = dist[far];
    dist[far] = d;
    const int64_t a = idx[i];
    idx[i] = idx[far];
    idx[far] = a;
    i = far;
  }
}

// Squared distances above this cannot belong to an anchor at distance <= d: sqrt rounds to
// nearest, so sqrt(x) <= d needs x <= (d + ulp(d) / 2)^2 <= d^2 (1 + 1.01 eps); the
// relative margin 8 eps also covers the rounding of d * d, and the smallest normal number
// added covers a d * d that underflows. Infinite or NaN for an infinite or NaN d, which
// screens nothing out.
template <typename T>
CODETR_HOST_DEVICE T screen_bound(T d) {
  return mul_rn(mul_rn(d, d), T(1) + T(8) * std::numeric_limits<T>::epsilon()) +
         std::numeric_limits<T>::min();
}

// mmdetection's per-level candidate selection for one gt: the k = min(topk, end - begin)
// anchors of [begin, end) whose centres (cx, cy) are nearest to the gt centre (gx, gy),
// in the `nearer` order (a strict total order, so the set is unique whatever the scan
// order). Writes their indices (in heap order) to idx[0, k) and distances to dist[0, k);
// returns k.
//
// Anchors are visited in groups of kScreen consecutive ones, the groups in a scrambled
// order (golden-ratio stride): anchors usually come as a row-major grid, and a plain scan
// approaches the gt row after row, each row replacing the heap; scrambled, the first groups
// already span the level, the root distance shrinks at once, and almost every group is
// rejected by a branch-free screen on squared distances (vectorised on CPU). Only a group
// holding an anchor with squared distance <= screen_bound(root distance) takes the exact
// path (sqrt, `nearer`).
template <typename T>
CODETR_HOST_DEVICE int64_t select_nearest(const T* cx, const T* cy, int64_t begin, int64_t end,
                                          int64_t topk, T gx, T gy, T* dist, int64_t* idx) {
  constexpr int64_t kScreen = 16;
  const int64_t n = end - begin;
  const int64_t k = n < topk ? n : topk;
  if (k <= 0) return 0;
  const int64_t groups = (n + kScreen - 1) / kScreen;
  // A stride coprime with the number of groups visits each group once.
  int64_t stride = static_cast<int64_t>(0.6180339887 * static_cast<double>(groups)) | 1;
  while (true) {
    int64_t x = groups, y = stride;
    while (y != 0) {
      const int64_t r = x % y;
      x = y;
      y = r;
    }
    if (x == 1) break;
    stride += 2;
  }
  int64_t size = 0;  // heap entries so far
  T bound = std::numeric_limits<T>::infinity();
  int64_t group = 0;
  for (int64_t t = 0; t < groups; ++t) {
    const int64_t a0 = begin + group * kScreen;
    const int64_t m = end - a0 < kScreen ? end - a0 : kScreen;
    group += stride;
    if (group >= groups) group %= groups;
    int hit = 0;
    for (int64_t j = 0; j < m; ++j) hit |= !(sq_distance(cx[a0 + j], cy[a0 + j], gx, gy) > bound);
    if (!hit) continue;
    for (int64_t a = a0; a < a0 + m; ++a) {
      const T sq = sq_distance(cx[a], cy[a], gx, gy);
      if (sq > bound) continue;
      const T d = sqrt_(sq);
      if (size < k) {
        dist[size] = d;
        idx[size] = a;
        heap_sift_up(dist, idx, size);
        if (++size < k) continue;
      } else {
        if (!nearer(d, a, dist[0], idx[0])) continue;
        dist[0] = d;
        idx[0] = a;
        heap_sift_down(dist, idx, k);
      }
      bound = screen_bound(dist[0]);
    }
  }
  return k;
}

// Statistics and positives of one gt (box `gt`, 4 values) over its C candidates cand[0, C)
// (anchor indices into anchors [A, 4] and centres cx, cy). Writes, per candidate, its IoU
// when it is positive and -1 otherwise (IoUs are >= 0, or NaN, never positive).
//
// Threshold = mean + unbiased std of the candidates' IoUs, accumulated in double; with a
// single candidate the std is 0 / 0 = NaN, so no candidate is positive, as in mmdetection
// (torch.std of one sample is NaN).
template <typename T>
CODETR_HOST_DEVICE void atss_gt_positives(const T* anchors, const T* cx, const T* cy,
                                          const int64_t* cand, int64_t C, const T* gt,
                                          T* cand_iou) {
  if (C <= 0) return;
  double sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    cand_iou[c] = box_iou(anchors + 4 * cand[c], gt);
    sum += static_cast<double>(cand_iou[c]);
  }
  const double mean = sum / static_cast<double>(C);
  double m2 = 0;
  for (int64_t c = 0; c < C; ++c) {
    const double dev = static_cast<double>(cand_iou[c]) - mean;
    m2 += mul_rn(dev, dev);
  }
  const double threshold = mean + sqrt_(m2 / static_cast<double>(C - 1));
  const T min_inside = static_cast<T>(kAtssMinInside);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t a = cand[c];
    const bool inside = cx[a] - gt[0] > min_inside && cy[a] - gt[1] > min_inside &&
                        gt[2] - cx[a] > min_inside && gt[3] - cy[a] > min_inside;
    const bool positive = static_cast<double>(cand_iou[c]) >= threshold && inside;
    if (!positive) cand_iou[c] = T(-1);
  }
}

// ---- MaxIoUAssigner -----------------------------------------------------------------------

// Whether (v, i) beats (best, best_i) in torch.max's order: NaN above every number (the
// lowest-index NaN first), then larger values, then lower indices. Associative and
// commutative, so any reduction order gives torch's (first-index) maximum.
template <typename T>
CODETR_HOST_DEVICE bool beats(T v, int64_t i, T best, int64_t best_i) {
  const bool nv = is_nan(v), nb = is_nan(best);
  if (nv || nb) return nv && (!nb || i < best_i);
  return v > best || (v == best && i < best_i);
}

// mmdetection's assignment of a prior from its largest IoU m (reached first by gt `arg`):
// -1 ignored, 0 negative where neg_lo <= m < neg_hi, arg + 1 where m >= pos_thr (positives
// override negatives). A NaN m stays ignored.
template <typename T>
CODETR_HOST_DEVICE int64_t max_iou_label(T m, int64_t arg, T pos_thr, T neg_lo, T neg_hi) {
  int64_t label = -1;
  if (m >= neg_lo && m < neg_hi) label = 0;
  if (m >= pos_thr) label = arg + 1;
  return label;
}

}  // namespace assign
}  // namespace codetr
