// CPU launchers of the box operators: at::parallel_for over the shared per-pair arithmetic
// of box_ops_kernel.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

// The gradient of a pair is a chain of data-dependent selects (which box holds each max or
// min). GCC keeps any select that guards a floating-point operation as a branch, because
// the operation might trap, unless told that FP exceptions do not trap (clang's default,
// and what PyTorch's own kernels assume); the backward loops then stay scalar and branchy,
// ~10x slower. The flag changes no result: it only lets both sides of a select be
// evaluated. It applies to the code below, the shared kernel header included.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "box_ops.h"
#include "box_ops_kernel.h"

namespace codetr {
namespace boxes {
namespace {

// Pairs per parallel task: below this a problem runs on one thread (the fork costs more).
constexpr int64_t kPairsPerTask = 16384;

// boxes [B, K, 4] as a structure of arrays [B, 5, K]: x1, y1, x2, y2 and the area, so that
// a loop over boxes reads five contiguous streams and vectorizes.
template <typename T>
std::vector<T> to_soa(const T* boxes, int64_t B, int64_t K) {
  std::vector<T> soa(B * 5 * K);
  for (int64_t b = 0; b < B; ++b) {
    T* s = soa.data() + b * 5 * K;
    for (int64_t k = 0; k < K; ++k) {
      const T* box = boxes + (b * K + k) * 4;
      s[k] = box[0];
      s[K + k] = box[1];
      s[2 * K + k] = box[2];
      s[3 * K + k] = box[3];
      s[4 * K + k] = box_area(box[0], box[1], box[2], box[3]);
    }
  }
  return soa;
}

// out[b, n, m] = overlap(boxes1[b, n], boxes2[b, m]). Parallel over rows (b, n), in
// blocks of rows; the inner loop runs over the gts m of the row's image.
template <Overlap mode, typename T>
void pairwise_forward(const T* boxes1, const T* boxes2, int64_t B, int64_t N, int64_t M, T eps,
                      T* out) {
  const std::vector<T> soa = to_soa(boxes2, B, M);
  const int64_t grain = std::max<int64_t>(1, kPairsPerTask / M);
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* s = soa.data() + (r / N) * 5 * M;
      const T* __restrict x1 = s;
      const T* __restrict y1 = s + M;
      const T* __restrict x2 = s + 2 * M;
      const T* __restrict y2 = s + 3 * M;
      const T* __restrict area = s + 4 * M;
      const T* a = boxes1 + r * 4;
      const T ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
      const T area_a = box_area(ax1, ay1, ax2, ay2);
      T* __restrict o = out + r * M;
#pragma omp simd
      for (int64_t m = 0; m < M; ++m) {
        o[m] = overlap<mode>(ax1, ay1, ax2, ay2, area_a, x1[m], y1[m], x2[m], y2[m], area[m], eps);
      }
    }
  });
}

// out[r] = overlap(boxes1[r], boxes2[r]) over the B * N aligned pairs.
template <Overlap mode, typename T>
void aligned_forward(const T* boxes1, const T* boxes2, int64_t pairs, T eps, T* out) {
  at::parallel_for(0, pairs, kPairsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* a = boxes1 + r * 4;
      const T* b = boxes2 + r * 4;
      out[r] = overlap<mode>(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]), b[0], b[1],
                             b[2], b[3], box_area(b[0], b[1], b[2], b[3]), eps);
    }
  });
}

// Pairwise backward in two passes that each own their output rows, so no two threads
// write the same gradient and the result does not depend on the number of threads:
// rows (b, n) of boxes1 sum over m, then columns (b, m) of boxes2 sum over n (each pass
// recomputes the pair's derivative).
template <Overlap mode, typename T>
void pairwise_backward(const T* grad, const T* boxes1, const T* boxes2, int64_t B, int64_t N,
                       int64_t M, T eps, T* grad1, T* grad2) {
  const int64_t grain1 = std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(M, 1));
  at::parallel_for(0, B * N, grain1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* a = boxes1 + r * 4;
      const T* b_img = boxes2 + (r / N) * M * 4;
      T acc[4] = {0, 0, 0, 0}, ga[4], gb[4];
      for (int64_t m = 0; m < M; ++m) {
        overlap_backward<mode>(a, b_img + m * 4, eps, grad[r * M + m], ga, gb);
        for (int k = 0; k < 4; ++k) acc[k] += ga[k];
      }
      for (int k = 0; k < 4; ++k) grad1[r * 4 + k] = acc[k];
    }
  });
  const int64_t grain2 = std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(N, 1));
  at::parallel_for(0, B * M, grain2, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / M, m = c % M;
      const T* box2 = boxes2 + c * 4;
      T acc[4] = {0, 0, 0, 0}, ga[4], gb[4];
      for (int64_t n = 0; n < N; ++n) {
        overlap_backward<mode>(boxes1 + (b * N + n) * 4, box2, eps, grad[(b * N + n) * M + m], ga,
                               gb);
        for (int k = 0; k < 4; ++k) acc[k] += gb[k];
      }
      for (int k = 0; k < 4; ++k) grad2[c * 4 + k] = acc[k];
    }
  });
}

template <Overlap mode, typename T>
void aligned_backward(const T* grad, const T* boxes1, const T* boxes2, int64_t pairs, T eps,
                      T* grad1, T* grad2) {
  at::parallel_for(0, pairs, kPairsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      overlap_backward<mode>(boxes1 + r * 4, boxes2 + r * 4, eps, grad[r], grad1 + r * 4,
                             grad2 + r * 4);
    }
  });
}

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2, c10::string_view mode,
                       bool aligned, double eps) {
  const IouDims d = check_box_iou("box_iou", boxes1, boxes2, mode, aligned);
  auto out = aligned ? at::empty({d.B, d.N}, boxes1.options())
                     : at::empty({d.B, d.N, d.M}, boxes1.options());
  if (out.numel() == 0) return out;
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "box_iou_cpu", [&] {
    dispatch_mode(d.mode, [&](auto tag) {
      constexpr Overlap m = decltype(tag)::value;
      const scalar_t e = static_cast<scalar_t>(eps);
      if (aligned) {
        aligned_forward<m>(b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), d.B * d.N, e,
                           out.data_ptr<scalar_t>());
      } else {
        pairwise_forward<m>(b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), d.B, d.N, d.M, e,
                            out.data_ptr<scalar_t>());
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_iou_backward_cpu(const at::Tensor& grad,
                                                        const at::Tensor& boxes1,
                                                        const at::Tensor& boxes2,
                                                        c10::string_view mode, bool aligned,
                                                        double eps) {
  const char* op = "box_iou_backward";
  const IouDims d = check_box_iou(op, boxes1, boxes2, mode, aligned);
  check_iou_grad(op, grad, boxes1, d, aligned);
  auto grad1 = at::zeros({d.B, d.N, 4}, boxes1.options());
  auto grad2 = at::zeros({d.B, d.M, 4}, boxes2.options());
  if (grad.numel() == 0) return {grad1, grad2};
  const auto g = grad.contiguous();
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "box_iou_backward_cpu", [&] {
    dispatch_mode(d.mode, [&](auto tag) {
      constexpr Overlap m = decltype(tag)::value;
      const scalar_t e = static_cast<scalar_t>(eps);
      if (aligned) {
        aligned_backward<m>(g.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(),
                            b2.data_ptr<scalar_t>(), d.B * d.N, e, grad1.data_ptr<scalar_t>(),
                            grad2.data_ptr<scalar_t>());
      } else {
        pairwise_backward<m>(g.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(),
                             b2.data_ptr<scalar_t>(), d.B, d.N, d.M, e, grad1.data_ptr<scalar_t>(),
                             grad2.data_ptr<scalar_t>());
      }
    });
  });
  return {grad1, grad2};
}

template <typename T>
void giou_loss_forward(const T* pred, const T* target, int64_t K, T eps, T* loss) {
  at::parallel_for(0, K, kPairsPerTask, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) loss[k] = giou_loss(pred + 4 * k, target + 4 * k, eps);
  });
}

template <typename T>
void giou_loss_backward_pairs(const T* grad, const T* pred, const T* target, int64_t K, T eps,
                              T* grad_pred, T* grad_target) {
  at::parallel_for(0, K, kPairsPerTask, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) {
      giou_loss_backward(pred + 4 * k, target + 4 * k, eps, grad[k], grad_pred + 4 * k,
                         grad_target + 4 * k);
    }
  });
}

at::Tensor giou_loss_cpu(const at::Tensor& pred, const at::Tensor& target, double eps) {
  const int64_t K = check_giou_loss("generalized_box_iou_loss", pred, target);
  auto loss = at::empty({K}, pred.options());
  if (K == 0) return loss;
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "giou_loss_cpu", [&] {
    giou_loss_forward(p.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), K,
                      static_cast<scalar_t>(eps), loss.data_ptr<scalar_t>());
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> giou_loss_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& pred,
                                                         const at::Tensor& target, double eps) {
  const char* op = "generalized_box_iou_loss_backward";
  const int64_t K = check_giou_loss(op, pred, target);
  check_loss_grad(op, grad, pred);
  auto grad_pred = at::empty({K, 4}, pred.options());
  auto grad_target = at::empty({K, 4}, target.options());
  if (K == 0) return {grad_pred, grad_target};
  const auto g = grad.contiguous();
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "giou_loss_backward_cpu", [&] {
    giou_loss_backward_pairs(g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                             t.data_ptr<scalar_t>(), K, static_cast<scalar_t>(eps),
                             grad_pred.data_ptr<scalar_t>(), grad_target.data_ptr<scalar_t>());
  });
  return {grad_pred, grad_target};
}

// Greedy NMS over boxes sorted by decreasing score (stable: equal scores keep index
// order, like torchvision). Boxes are grouped by class (score order kept inside a class);
// each class is an independent greedy scan, and classes run in parallel. The scan visits
// the kept boxes in order; for each, a branch-free loop over the later boxes of its class
// (contiguous arrays) marks the ones it suppresses. Marking an already-suppressed box
// again changes nothing, which is what makes the loop branch-free and vectorizable.
template <typename T>
at::Tensor nms_kernel(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                      double iou_threshold) {
  const int64_t K = boxes.size(0);
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, 0, /*descending=*/true));
  const int64_t* ord = order.data_ptr<int64_t>();
  const auto b = boxes.contiguous();
  const T* box = b.data_ptr<T>();

  // pos[k]: rank in score order of the k-th box of the class-grouped sequence.
  std::vector<int64_t> pos(K);
  std::iota(pos.begin(), pos.end(), int64_t(0));
  std::vector<int64_t> segments = {0};  // class boundaries in the grouped sequence
  if (idxs != nullptr) {
    const auto cls_t = idxs->contiguous();
    const int64_t* cls = cls_t.data_ptr<int64_t>();
    std::vector<int64_t> cls_ranked(K);
    for (int64_t k = 0; k < K; ++k) cls_ranked[k] = cls[ord[k]];
    std::stable_sort(pos.begin(), pos.end(),
                     [&](int64_t i, int64_t j) { return cls_ranked[i] < cls_ranked[j]; });
    for (int64_t k = 1; k < K; ++k)
      if (cls_ranked[pos[k]] != cls_ranked[pos[k - 1]]) segments.push_back(k);
  }
  segments.push_back(K);

  // Coordinates in the grouped order, as a structure of arrays.
  std::vector<T> soa(5 * K);
  T* x1 = soa.data();
  T* y1 = x1 + K;
  T* x2 = y1 + K;
  T* y2 = x2 + K;
  T* area = y2 + K;
  for (int64_t k = 0; k < K; ++k) {
    const T* bx = box + 4 * ord[pos[k]];
    x1[k] = bx[0];
    y1[k] = bx[1];
    x2[k] = bx[2];
    y2[k] = bx[3];
    area[k] = box_area(bx[0], bx[1], bx[2], bx[3]);
  }
  // Suppression flags as wide as T, so that the compare-and-or loop vectorizes.
  using flag_t = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  std::vector<flag_t> removed(K, 0);
  const T threshold = threshold_below<T>(iou_threshold);
  const int64_t num_segments = static_cast<int64_t>(segments.size()) - 1;
  at::parallel_for(0, num_segments, 1, [&](int64_t s_begin, int64_t s_end) {
    for (int64_t s = s_begin; s < s_end; ++s) {
      const int64_t end = segments[s + 1];
      flag_t* __restrict rm = removed.data();
      for (int64_t i = segments[s]; i < end; ++i) {
        if (rm[i]) continue;
        const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
#pragma omp simd
        for (int64_t j = i + 1; j < end; ++j) {
          const T ovr = nms_iou(ix1, iy1, ix2, iy2, iarea, x1[j], y1[j], x2[j], y2[j], area[j]);
          rm[j] |= static_cast<flag_t>(ovr > threshold);
        }
      }
    }
  });

  // Kept boxes back in score order.
  std::vector<char> kept(K, 0);
  for (int64_t k = 0; k < K; ++k) kept[pos[k]] = !removed[k];
  const int64_t num_kept = std::count(kept.begin(), kept.end(), char(1));
  auto keep = at::empty({num_kept}, boxes.options().dtype(at::kLong));
  int64_t* out = keep.data_ptr<int64_t>();
  for (int64_t r = 0, n = 0; r < K; ++r)
    if (kept[r]) out[n++] = ord[r];
  return keep;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  const int64_t K = check_nms("nms", boxes, scores, nullptr);
  if (K == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cpu", [&] {
    keep = nms_kernel<scalar_t>(boxes, scores, nullptr, iou_threshold);
  });
  return keep;
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor& idxs, double iou_threshold) {
  const int64_t K = check_nms("batched_nms", boxes, scores, &idxs);
  if (K == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "batched_nms_cpu", [&] {
    keep = nms_kernel<scalar_t>(boxes, scores, &idxs, iou_threshold);
  });
  // torchvision's batched_nms switches to its per-class path above 4,000 coordinates on CPU.
  return order_like_torchvision(keep, boxes, scores, 4000);
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CPU, m) {
  m.impl("box_iou", &box_iou_cpu);
  m.impl("box_iou_backward", &box_iou_backward_cpu);
  m.impl("generalized_box_iou_loss", &giou_loss_cpu);
  m.impl("generalized_box_iou_loss_backward", &giou_loss_backward_cpu);
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
}

}  // namespace boxes
}  // namespace codetr
