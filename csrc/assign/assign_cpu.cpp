// CPU launchers of the assigners: at::parallel_for over the shared arithmetic of
// assign_kernel.h. Neither builds a [A, G] matrix.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "assign.h"
#include "assign_kernel.h"

namespace codetr {
namespace assign {
namespace {

// ---- ATSS -------------------------------------------------------------------------------

// Pass 1, parallel over the (image, gt) pairs that are not padding: per level the nearest
// anchors, then the gt's threshold and positives (cand, cand_iou: [B, G, C]).
// Pass 2, parallel over images: each positive candidate, in gt order, takes its anchor when
// its IoU is strictly larger than the anchor's best so far, so ties go to the first gt and
// the result does not depend on the number of threads.
template <typename T>
void atss_kernel(const T* anchors, int64_t A, const std::vector<int64_t>& start, const T* gts,
                 const int64_t* counts, int64_t B, int64_t G, int64_t topk, int64_t C,
                 int64_t* assigned, T* max_iou) {
  // Small passes run inline (grain sizes): a parallel region costs more than they do.
  std::vector<T> cx(A), cy(A);
  at::parallel_for(0, A, 1 << 18, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      cx[a] = centre(anchors[4 * a], anchors[4 * a + 2]);
      cy[a] = centre(anchors[4 * a + 1], anchors[4 * a + 3]);
    }
  });
  std::vector<int64_t> items;  // b * G + g of the real gts: padding costs nothing
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < counts[b]; ++g) items.push_back(b * G + g);
  std::vector<int64_t> cand(items.size() * C);
  std::vector<T> cand_iou(items.size() * C);
  const int64_t L = static_cast<int64_t>(start.size()) - 1;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> dist(C);
    for (int64_t i = begin; i < end; ++i) {
      const T* gt = gts + 4 * items[i];
      const T gx = centre(gt[0], gt[2]), gy = centre(gt[1], gt[3]);
      int64_t* cand_i = cand.data() + i * C;
      int64_t n = 0;
      for (int64_t l = 0; l < L; ++l)
        n += select_nearest(cx.data(), cy.data(), start[l], start[l + 1], topk, gx, gy,
                            dist.data() + n, cand_i + n);
      atss_gt_positives(anchors, cx.data(), cy.data(), cand_i, C, gt, cand_iou.data() + i * C);
    }
  });
  // items are sorted by image then gt: image b's occupy [first[b], first[b + 1]).
  std::vector<int64_t> first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + counts[b];
  // Parallel over images only when their outputs are large enough to be worth a region.
  at::parallel_for(0, B, std::max<int64_t>(1, (int64_t(1) << 17) / A), [&](int64_t begin,
                                                                        int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* as = assigned + b * A;
      T* mi = max_iou + b * A;
      std::fill(as, as + A, int64_t(0));
      // mmdetection: an image without gts gets max_overlaps 0, negatives otherwise -INF.
      std::fill(mi, mi + A, counts[b] == 0 ? T(0) : static_cast<T>(-kAtssInf));
      for (int64_t i = first[b]; i < first[b + 1]; ++i) {
        const int64_t g = items[i] - b * G;
        for (int64_t c = i * C; c < (i + 1) * C; ++c) {
          const T v = cand_iou[c];
          const int64_t a = cand[c];
          if (v >= T(0) && v > mi[a]) {
            mi[a] = v;
            as[a] = g + 1;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> atss_assign_cpu(const at::Tensor& anchors,
                                                   at::IntArrayRef num_anchors_per_level,
                                                   const at::Tensor& gt_boxes,
                                                   const at::Tensor& gt_counts, int64_t topk) {
  const auto start = check_atss(anchors, num_anchors_per_level, gt_boxes, gt_counts, topk);
  const auto dtype = compute_dtype(anchors, gt_boxes);
  const int64_t B = gt_boxes.size(0), G = gt_boxes.size(1), A = anchors.size(0);
  auto assigned = at::zeros({B, A}, anchors.options().dtype(at::kLong));
  auto max_iou = at::zeros({B, A}, anchors.options().dtype(dtype));
  if (B == 0 || A == 0 || G == 0) return {assigned, max_iou};
  const auto a = anchors.to(dtype).contiguous();
  const auto g = gt_boxes.to(dtype).contiguous();
  const auto counts = gt_counts.contiguous();
  const int64_t C = atss_num_candidates(start, topk);
  AT_DISPATCH_FLOATING_TYPES(dtype, "atss_assign_cpu", [&] {
    atss_kernel<scalar_t>(a.data_ptr<scalar_t>(), A, start, g.data_ptr<scalar_t>(),
                          counts.data_ptr<int64_t>(), B, G, topk, C,
                          assigned.data_ptr<int64_t>(), max_iou.data_ptr<scalar_t>());
  });
  return {assigned, max_iou};
}

// ---- MaxIoUAssigner -----------------------------------------------------------------------

struct MaxIouParams {
  double pos_thr, neg_lo, neg_hi, min_pos_iou;
  bool match_low_quality, gt_max_assign_all;
};

// Pass 1, parallel over (image, block of kPriorBlock priors): for each gt, the IoUs of the
// block's priors go to a small buffer from which the per-prior maximum (over gts, first gt on
// ties) and the block's per-gt maximum (over priors, first prior on ties) are taken; the
// [A, G] IoUs are never stored. Then the per-gt maxima over blocks, and the low-quality
// step, which recomputes IoUs only in the blocks whose maximum for a gt is that gt's.
template <typename T>
void max_iou_kernel(const T* priors, bool shared_priors, int64_t A, const T* gts,
                    const int64_t* counts, int64_t B, int64_t G, const MaxIouParams& p,
                    int64_t* assigned, T* max_iou) {
  constexpr int64_t kBlk = kPriorBlock;
  const int64_t nblk = (A + kBlk - 1) / kBlk;
  const T pos_thr = static_cast<T>(p.pos_thr), neg_lo = static_cast<T>(p.neg_lo),
          neg_hi = static_cast<T>(p.neg_hi), min_pos = static_cast<T>(p.min_pos_iou);
  const bool need_arg = p.match_low_quality && !p.gt_max_assign_all;
  // Block maxima per gt, [B, nblk, G], only needed for the low-quality step.
  std::vector<T> blk_max(p.match_low_quality ? B * nblk * G : 0);
  std::vector<int64_t> blk_arg(need_arg ? B * nblk * G : 0);
  auto prior_ptr = [&](int64_t b, int64_t j) { return priors + ((shared_priors ? 0 : b * A) + j) * 4; };

  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T x1[kBlk], y1[kBlk], x2[kBlk], y2[kBlk], area[kBlk], iou[kBlk], rmax[kBlk];
    int32_t rarg[kBlk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nblk, blk = item % nblk;
      const int64_t j0 = blk * kBlk, n = std::min(kBlk, A - j0);
      const int64_t count = counts[b];
      int64_t* as = assigned + b * A + j0;
      T* mi = max_iou + b * A + j0;
      if (count == 0) {  // mmdetection: no gts, every prior negative with max_overlaps 0
        std::fill(as, as + n, int64_t(0));
        std::fill(mi, mi + n, T(0));
        continue;
      }
      const T* P = prior_ptr(b, j0);
      for (int64_t j = 0; j < n; ++j) {
        x1[j] = P[4 * j];
        y1[j] = P[4 * j + 1];
        x2[j] = P[4 * j + 2];
        y2[j] = P[4 * j + 3];
        area[j] = box_area(x1[j], y1[j], x2[j], y2[j]);
      }
      for (int64_t g = 0; g < count; ++g) {
        const T* gt = gts + (b * G + g) * 4;
        const T gx1 = gt[0], gy1 = gt[1], gx2 = gt[2], gy2 = gt[3];
        const T garea = box_area(gx1, gy1, gx2, gy2);
        for (int64_t j = 0; j < n; ++j)
          iou[j] = box_iou(gx1, gy1, gx2, gy2, garea, x1[j], y1[j], x2[j], y2[j], area[j]);
        // Per prior: torch.max over gts keeps the first maximum and the first NaN.
        if (g == 0) {
          for (int64_t j = 0; j < n; ++j) {
            rmax[j] = iou[j];
            rarg[j] = 0;
          }
        } else {
          const int32_t g32 = static_cast<int32_t>(g);
          for (int64_t j = 0; j < n; ++j) {
            // Bitwise operators: no short circuit, so the loop vectorises.
            const bool take = (rmax[j] == rmax[j]) & (is_nan(iou[j]) | (iou[j] > rmax[j]));
            rmax[j] = take ? iou[j] : rmax[j];
            rarg[j] = take ? g32 : rarg[j];
          }
        }
        if (!p.match_low_quality) continue;
        // Per gt over this block's priors: a vectorised max, then (rarely needed) the
        // first index reaching it; NaNs take the exact ordered scan.
        T m = iou[0];
        int any_nan = 0;  // an int |-reduction vectorises where a bool || does not
#pragma omp simd reduction(max : m) reduction(| : any_nan)
        for (int64_t j = 0; j < n; ++j) {
          m = iou[j] > m ? iou[j] : m;
          any_nan |= static_cast<int>(is_nan(iou[j]));
        }
        int64_t arg = 0;
        if (any_nan) {
          m = iou[0];
          for (int64_t j = 1; j < n; ++j)
            if (beats(iou[j], j, m, arg)) m = iou[j], arg = j;
        } else if (need_arg) {
          while (iou[arg] != m) ++arg;
        }
        blk_max[(b * nblk + blk) * G + g] = m;
        if (need_arg) blk_arg[(b * nblk + blk) * G + g] = j0 + arg;
      }
      for (int64_t j = 0; j < n; ++j) {
        mi[j] = rmax[j];
        as[j] = max_iou_label(rmax[j], static_cast<int64_t>(rarg[j]), pos_thr, neg_lo, neg_hi);
      }
    }
  });
  if (!p.match_low_quality) return;

  // Per gt over all priors: combine the block maxima (torch.max: first prior on ties).
  std::vector<T> gt_max(B * G);
  std::vector<int64_t> gt_arg(B * G, 0);
  at::parallel_for(0, B * G, std::max<int64_t>(1, (int64_t(1) << 16) / nblk), [&](int64_t begin,
                                                                               int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      if (g >= counts[b]) continue;
      T m = blk_max[b * nblk * G + g];
      int64_t arg = need_arg ? blk_arg[b * nblk * G + g] : 0;
      for (int64_t blk = 1; blk < nblk; ++blk) {
        const T v = blk_max[(b * nblk + blk) * G + g];
        const int64_t i = need_arg ? blk_arg[(b * nblk + blk) * G + g] : blk * kBlk;
        if (beats(v, i, m, arg)) m = v, arg = i;
      }
      gt_max[bg] = m;
      gt_arg[bg] = arg;
    }
  });

  if (!p.gt_max_assign_all) {
    // mmdetection: assigned[gt_argmax[i]] = i + 1 for each qualifying gt, in gt order.
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < counts[b]; ++g)
        if (gt_max[b * G + g] >= min_pos) assigned[b * A + gt_arg[b * G + g]] = g + 1;
    return;
  }
  // mmdetection: assigned[overlaps[i] == gt_max[i]] = i + 1 for each qualifying gt, in gt
  // order, so a prior goes to the last such gt: scan the block's candidate gts backwards.
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> gts_here;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nblk, blk = item % nblk;
      gts_here.clear();
      for (int64_t g = 0; g < counts[b]; ++g) {
        const T m = gt_max[b * G + g];
        if (m >= min_pos && blk_max[item * G + g] == m) gts_here.push_back(g);
      }
      if (gts_here.empty()) continue;
      const int64_t j0 = blk * kBlk, n = std::min(kBlk, A - j0);
      for (int64_t j = j0; j < j0 + n; ++j) {
        const T* pr = prior_ptr(b, j);
        const T parea = box_area(pr[0], pr[1], pr[2], pr[3]);
        for (auto it = gts_here.rbegin(); it != gts_here.rend(); ++it) {
          const T* gt = gts + (b * G + *it) * 4;
          const T v = box_iou(gt[0], gt[1], gt[2], gt[3], box_area(gt[0], gt[1], gt[2], gt[3]),
                              pr[0], pr[1], pr[2], pr[3], parea);
          if (v == gt_max[b * G + *it]) {
            assigned[b * A + j] = *it + 1;
            break;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_iou_assign_cpu(
    const at::Tensor& priors, const at::Tensor& gt_boxes, const at::Tensor& gt_counts,
    double pos_iou_thr, double neg_iou_lo, double neg_iou_hi, double min_pos_iou,
    bool match_low_quality, bool gt_max_assign_all) {
  check_max_iou(priors, gt_boxes, gt_counts);
  const auto dtype = compute_dtype(priors, gt_boxes);
  const int64_t B = gt_boxes.size(0), G = gt_boxes.size(1), A = priors.size(-2);
  auto assigned = at::zeros({B, A}, priors.options().dtype(at::kLong));
  auto max_iou = at::zeros({B, A}, priors.options().dtype(dtype));
  if (B == 0 || A == 0 || G == 0) return {assigned, max_iou};
  CODETR_CHECK_ARG(G < (int64_t(1) << 31), "max_iou_assign", " gt_boxes must have G < 2^31, got ",
                   G);
  const auto pr = priors.to(dtype).contiguous();
  const auto g = gt_boxes.to(dtype).contiguous();
  const auto counts = gt_counts.contiguous();
  const MaxIouParams p{pos_iou_thr, neg_iou_lo, neg_iou_hi, min_pos_iou, match_low_quality,
                       gt_max_assign_all};
  AT_DISPATCH_FLOATING_TYPES(dtype, "max_iou_assign_cpu", [&] {
    max_iou_kernel<scalar_t>(pr.data_ptr<scalar_t>(), priors.dim() == 2, A,
                             g.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), B, G, p,
                             assigned.data_ptr<int64_t>(), max_iou.data_ptr<scalar_t>());
  });
  return {assigned, max_iou};
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CPU, m) {
  m.impl("atss_assign", &atss_assign_cpu);
  m.impl("max_iou_assign", &max_iou_assign_cpu);
}

}  // namespace assign
}  // namespace codetr
