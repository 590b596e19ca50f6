// CUDA launchers of the assigners: grid-stride kernels over the shared arithmetic of
// assign_kernel.h. No host syncs (gt_counts are clamped to [0, G] on the device instead of
// being checked), 64-bit indices, the caller's device and current stream. Neither op builds
// a [A, G] matrix.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "assign.h"
#include "assign_kernel.h"

namespace codetr {
namespace assign {
namespace {

constexpr int kThreads = 256;
static_assert(kPriorBlock == kThreads, "max_iou_assign: one CUDA block per prior block");

inline unsigned int num_blocks(int64_t work) {
  // Grid-stride loops cover any remainder; the cap keeps the grid within limits.
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20)));
}

__device__ __forceinline__ int64_t clamp_count(int64_t c, int64_t G) {
  return c < 0 ? 0 : (c > G ? G : c);
}

// ---- ATSS -------------------------------------------------------------------------------

// Level boundaries travel as a kernel argument (no host-to-device copy).
constexpr int kMaxLevels = 16;
struct Levels {
  int64_t L;
  int64_t start[kMaxLevels + 1];
};

template <typename T>
__global__ void centres_kernel(const T* __restrict__ anchors, int64_t A, T* __restrict__ cx,
                               T* __restrict__ cy) {
  for (int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; a < A;
       a += int64_t(blockDim.x) * gridDim.x) {
    cx[a] = centre(anchors[4 * a], anchors[4 * a + 2]);
    cy[a] = centre(anchors[4 * a + 1], anchors[4 * a + 3]);
  }
}

// One thread per (image, gt): per level the nearest anchors (heap kept in cand / cand_dist,
// [B, G, C]), then the gt's threshold and positives (cand_iou: IoU or -1).
template <typename T>
__global__ void atss_candidates_kernel(const T* __restrict__ anchors, const T* __restrict__ cx,
                                       const T* __restrict__ cy, Levels lv,
                                       const T* __restrict__ gts,
                                       const int64_t* __restrict__ counts, int64_t B, int64_t G,
                                       int64_t topk, int64_t C, int64_t* __restrict__ cand,
                                       T* __restrict__ cand_dist, T* __restrict__ cand_iou) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * G;
       i += int64_t(blockDim.x) * gridDim.x) {
    if (i % G >= clamp_count(counts[i / G], G)) continue;
    const T* gt = gts + 4 * i;
    const T gx = centre(gt[0], gt[2]), gy = centre(gt[1], gt[3]);
    int64_t n = 0;
    for (int64_t l = 0; l < lv.L; ++l)
      n += select_nearest(cx, cy, lv.start[l], lv.start[l + 1], topk, gx, gy,
                          cand_dist + i * C + n, cand + i * C + n);
    atss_gt_positives(anchors, cx, cy, cand + i * C, C, gt, cand_iou + i * C);
  }
}

// Order-preserving key of a non-negative IoU (0 = no positive yet); v + 0 turns a -0 IoU
// (a product of -0 and a positive side) into +0, whose bits order correctly.
__device__ __forceinline__ unsigned long long iou_key(float v) {
  return static_cast<unsigned long long>(__float_as_uint(v + 0.0f)) + 1ull;
}
__device__ __forceinline__ unsigned long long iou_key(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v + 0.0)) + 1ull;
}
__device__ __forceinline__ float iou_from_key(unsigned long long k, float) {
  return __uint_as_float(static_cast<unsigned int>(k - 1ull));
}
__device__ __forceinline__ double iou_from_key(unsigned long long k, double) {
  return __longlong_as_double(static_cast<long long>(k - 1ull));
}

// Resolution of anchors positive for several gts, deterministically: pass 0 takes the
// largest IoU per anchor (atomicMax on its key), pass 1 the lowest gt reaching it.
template <typename T>
__global__ void atss_resolve_kernel(int pass, const int64_t* __restrict__ cand,
                                    const T* __restrict__ cand_iou,
                                    const int64_t* __restrict__ counts, int64_t B, int64_t G,
                                    int64_t C, int64_t A, unsigned long long* __restrict__ key,
                                    unsigned long long* __restrict__ first_gt) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * G * C;
       t += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = t / C, b = i / G, g = i % G;
    if (g >= clamp_count(counts[b], G)) continue;
    const T v = cand_iou[t];
    if (!(v >= T(0))) continue;  // not positive
    const int64_t slot = b * A + cand[t];
    if (pass == 0) {
      atomicMax(key + slot, iou_key(v));
    } else if (iou_key(v) == key[slot]) {
      atomicMin(first_gt + slot, static_cast<unsigned long long>(g));
    }
  }
}

template <typename T>
__global__ void atss_finalize_kernel(const unsigned long long* __restrict__ key,
                                     const unsigned long long* __restrict__ first_gt,
                                     const int64_t* __restrict__ counts, int64_t B, int64_t G,
                                     int64_t A, int64_t* __restrict__ assigned,
                                     T* __restrict__ max_iou) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * A;
       t += int64_t(blockDim.x) * gridDim.x) {
    const unsigned long long k = key[t];
    if (k != 0ull) {
      assigned[t] = static_cast<int64_t>(first_gt[t]) + 1;
      max_iou[t] = iou_from_key(k, T(0));
    } else {
      assigned[t] = 0;
      // mmdetection: an image without gts gets max_overlaps 0, negatives otherwise -INF.
      max_iou[t] = clamp_count(counts[t / A], G) == 0 ? T(0) : static_cast<T>(-kAtssInf);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> atss_assign_cuda(const at::Tensor& anchors,
                                                    at::IntArrayRef num_anchors_per_level,
                                                    const at::Tensor& gt_boxes,
                                                    const at::Tensor& gt_counts, int64_t topk) {
  const auto start = check_atss(anchors, num_anchors_per_level, gt_boxes, gt_counts, topk);
  const int64_t L = static_cast<int64_t>(start.size()) - 1;
  CODETR_CHECK_ARG(L <= kMaxLevels, "atss_assign", " num_anchors_per_level may hold at most ",
                   kMaxLevels, " levels on CUDA, got ", L);
  c10::cuda::CUDAGuard guard(anchors.device());
  const auto dtype = compute_dtype(anchors, gt_boxes);
  const int64_t B = gt_boxes.size(0), G = gt_boxes.size(1), A = anchors.size(0);
  auto assigned = at::zeros({B, A}, anchors.options().dtype(at::kLong));
  auto max_iou = at::zeros({B, A}, anchors.options().dtype(dtype));
  if (B == 0 || A == 0 || G == 0) return {assigned, max_iou};
  Levels lv;
  lv.L = L;
  for (int64_t l = 0; l <= L; ++l) lv.start[l] = start[l];
  const auto a = anchors.to(dtype).contiguous();
  const auto g = gt_boxes.to(dtype).contiguous();
  const auto counts = gt_counts.contiguous();
  const int64_t C = atss_num_candidates(start, topk);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "atss_assign_cuda", [&] {
    auto centres = at::empty({2, A}, a.options());
    auto cand = at::empty({B, G, C}, a.options().dtype(at::kLong));
    auto cand_dist = at::empty({B, G, C}, a.options());
    auto cand_iou = at::empty({B, G, C}, a.options());
    // Keys start at 0 (no positive), first gts at the largest unsigned value.
    auto key = at::zeros({B, A}, a.options().dtype(at::kLong));
    auto first_gt = at::full({B, A}, -1, a.options().dtype(at::kLong));
    auto* key_p = reinterpret_cast<unsigned long long*>(key.data_ptr<int64_t>());
    auto* first_p = reinterpret_cast<unsigned long long*>(first_gt.data_ptr<int64_t>());
    scalar_t* cx = centres.data_ptr<scalar_t>();
    centres_kernel<scalar_t><<<num_blocks(A), kThreads, 0, stream>>>(a.data_ptr<scalar_t>(), A,
                                                                     cx, cx + A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    atss_candidates_kernel<scalar_t><<<num_blocks(B * G), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), cx, cx + A, lv, g.data_ptr<scalar_t>(),
        counts.data_ptr<int64_t>(), B, G, topk, C, cand.data_ptr<int64_t>(),
        cand_dist.data_ptr<scalar_t>(), cand_iou.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int pass = 0; pass < 2; ++pass) {
      atss_resolve_kernel<scalar_t><<<num_blocks(B * G * C), kThreads, 0, stream>>>(
          pass, cand.data_ptr<int64_t>(), cand_iou.data_ptr<scalar_t>(),
          counts.data_ptr<int64_t>(), B, G, C, A, key_p, first_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    atss_finalize_kernel<scalar_t><<<num_blocks(B * A), kThreads, 0, stream>>>(
        key_p, first_p, counts.data_ptr<int64_t>(), B, G, A, assigned.data_ptr<int64_t>(),
        max_iou.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {assigned, max_iou};
}

// ---- MaxIoUAssigner -----------------------------------------------------------------------

template <typename T>
struct MaxIouArgs {
  T pos_thr, neg_lo, neg_hi, min_pos;
  bool match_low_quality, gt_max_assign_all;
};

// One block per (block of kThreads priors, image), one thread per prior: loops over the
// gts, keeping the prior's maximum (first gt on ties) and reducing each gt's IoUs over the
// block's priors (warp shuffles, then shared memory) into blk_max / blk_arg [B, nblk, G].
template <typename T>
__global__ void max_iou_pass1_kernel(const T* __restrict__ priors, bool shared_priors, int64_t A,
                                     const T* __restrict__ gts,
                                     const int64_t* __restrict__ counts, int64_t G, int64_t nblk,
                                     MaxIouArgs<T> p, int64_t* __restrict__ assigned,
                                     T* __restrict__ max_iou, T* __restrict__ blk_max,
                                     int64_t* __restrict__ blk_arg) {
  constexpr int kWarps = kThreads / 32;
  __shared__ T s_val[kWarps];
  __shared__ int64_t s_idx[kWarps];
  const int64_t blk = blockIdx.x, b = blockIdx.y;
  const int64_t j = blk * kThreads + threadIdx.x;
  const bool valid = j < A;
  const int64_t count = clamp_count(counts[b], G);
  if (count == 0) {  // mmdetection: no gts, every prior negative with max_overlaps 0
    if (valid) {
      assigned[b * A + j] = 0;
      max_iou[b * A + j] = T(0);
    }
    return;
  }
  T px1 = 0, py1 = 0, px2 = 0, py2 = 0;
  if (valid) {
    const T* pr = priors + ((shared_priors ? 0 : b * A) + j) * 4;
    px1 = pr[0], py1 = pr[1], px2 = pr[2], py2 = pr[3];
  }
  const T parea = box_area(px1, py1, px2, py2);
  T rmax = 0;
  int64_t rarg = 0;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t g = 0; g < count; ++g) {
    const T* gt = gts + (b * G + g) * 4;
    const T v = box_iou(gt[0], gt[1], gt[2], gt[3], box_area(gt[0], gt[1], gt[2], gt[3]), px1,
                        py1, px2, py2, parea);
    if (g == 0 || (!is_nan(rmax) && (is_nan(v) || v > rmax))) {
      rmax = v;
      rarg = g;
    }
    if (!p.match_low_quality) continue;
    // Absent priors (past A) enter as (-inf, max index), which never beats a real IoU.
    T m = valid ? v : -std::numeric_limits<T>::infinity();
    int64_t mi = valid ? j : std::numeric_limits<int64_t>::max();
    for (int offset = 16; offset > 0; offset /= 2) {
      const T om = __shfl_xor_sync(0xffffffffu, m, offset);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, mi, offset);
      if (beats(om, oi, m, mi)) m = om, mi = oi;
    }
    if (lane == 0) {
      s_val[warp] = m;
      s_idx[warp] = mi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kWarps; ++w)
        if (beats(s_val[w], s_idx[w], m, mi)) m = s_val[w], mi = s_idx[w];
      blk_max[(b * nblk + blk) * G + g] = m;
      blk_arg[(b * nblk + blk) * G + g] = mi;
    }
    __syncthreads();
  }
  if (valid) {
    max_iou[b * A + j] = rmax;
    assigned[b * A + j] = max_iou_label(rmax, rarg, p.pos_thr, p.neg_lo, p.neg_hi);
  }
}

// One thread per (image, gt): torch.max over all priors from the block maxima.
template <typename T>
__global__ void max_iou_gt_max_kernel(const T* __restrict__ blk_max,
                                      const int64_t* __restrict__ blk_arg,
                                      const int64_t* __restrict__ counts, int64_t B, int64_t G,
                                      int64_t nblk, T* __restrict__ gt_max,
                                      int64_t* __restrict__ gt_arg) {
  for (int64_t bg = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bg < B * G;
       bg += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = bg / G, g = bg % G;
    if (g >= clamp_count(counts[b], G)) continue;
    T m = blk_max[b * nblk * G + g];
    int64_t arg = blk_arg[b * nblk * G + g];
    for (int64_t blk = 1; blk < nblk; ++blk) {
      const int64_t k = (b * nblk + blk) * G + g;
      if (beats(blk_max[k], blk_arg[k], m, arg)) m = blk_max[k], arg = blk_arg[k];
    }
    gt_max[bg] = m;
    gt_arg[bg] = arg;
  }
}

// One thread per (image, prior): mmdetection's low-quality loop over the gts, of which the
// last matching one wins, so the gts are scanned backwards. With gt_max_assign_all, a gt
// matches the priors whose IoU equals its maximum (recomputed only where the prior's block
// holds that maximum); otherwise only its first such prior.
template <typename T>
__global__ void max_iou_low_quality_kernel(const T* __restrict__ priors, bool shared_priors,
                                           int64_t A, const T* __restrict__ gts,
                                           const int64_t* __restrict__ counts, int64_t B,
                                           int64_t G, int64_t nblk, MaxIouArgs<T> p,
                                           const T* __restrict__ blk_max,
                                           const T* __restrict__ gt_max,
                                           const int64_t* __restrict__ gt_arg,
                                           int64_t* __restrict__ assigned) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < B * A;
       t += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = t / A, j = t % A;
    const T* pr = priors + ((shared_priors ? 0 : b * A) + j) * 4;
    const T* blk = blk_max + (b * nblk + j / kThreads) * G;
    for (int64_t g = clamp_count(counts[b], G) - 1; g >= 0; --g) {
      const T m = gt_max[b * G + g];
      if (!(m >= p.min_pos)) continue;
      bool match;
      if (p.gt_max_assign_all) {
        const T* gt = gts + (b * G + g) * 4;
        match = blk[g] == m &&
                box_iou(gt[0], gt[1], gt[2], gt[3], box_area(gt[0], gt[1], gt[2], gt[3]), pr[0],
                        pr[1], pr[2], pr[3], box_area(pr[0], pr[1], pr[2], pr[3])) == m;
      } else {
        match = gt_arg[b * G + g] == j;
      }
      if (match) {
        assigned[t] = g + 1;
        break;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> max_iou_assign_cuda(
    const at::Tensor& priors, const at::Tensor& gt_boxes, const at::Tensor& gt_counts,
    double pos_iou_thr, double neg_iou_lo, double neg_iou_hi, double min_pos_iou,
    bool match_low_quality, bool gt_max_assign_all) {
  check_max_iou(priors, gt_boxes, gt_counts);
  c10::cuda::CUDAGuard guard(priors.device());
  const auto dtype = compute_dtype(priors, gt_boxes);
  const int64_t B = gt_boxes.size(0), G = gt_boxes.size(1), A = priors.size(-2);
  auto assigned = at::zeros({B, A}, priors.options().dtype(at::kLong));
  auto max_iou = at::zeros({B, A}, priors.options().dtype(dtype));
  if (B == 0 || A == 0 || G == 0) return {assigned, max_iou};
  CODETR_CHECK_ARG(B <= 65535, "max_iou_assign", " gt_boxes may hold at most 65535 images on CUDA, got ",
                   B);
  const int64_t nblk = (A + kThreads - 1) / kThreads;
  const auto pr = priors.to(dtype).contiguous();
  const auto g = gt_boxes.to(dtype).contiguous();
  const auto counts = gt_counts.contiguous();
  const bool shared_priors = priors.dim() == 2;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "max_iou_assign_cuda", [&] {
    const MaxIouArgs<scalar_t> p{static_cast<scalar_t>(pos_iou_thr),
                                 static_cast<scalar_t>(neg_iou_lo),
                                 static_cast<scalar_t>(neg_iou_hi),
                                 static_cast<scalar_t>(min_pos_iou), match_low_quality,
                                 gt_max_assign_all};
    const int64_t lq = match_low_quality ? 1 : 0;  // block maxima only for the low-quality step
    auto blk_max = at::empty({B, nblk * lq, G}, pr.options());
    auto blk_arg = at::empty({B, nblk * lq, G}, pr.options().dtype(at::kLong));
    const dim3 grid(static_cast<unsigned int>(nblk), static_cast<unsigned int>(B));
    max_iou_pass1_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        pr.data_ptr<scalar_t>(), shared_priors, A, g.data_ptr<scalar_t>(),
        counts.data_ptr<int64_t>(), G, nblk, p, assigned.data_ptr<int64_t>(),
        max_iou.data_ptr<scalar_t>(), blk_max.data_ptr<scalar_t>(), blk_arg.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!match_low_quality) return;
    auto gt_max = at::empty({B, G}, pr.options());
    auto gt_arg = at::empty({B, G}, pr.options().dtype(at::kLong));
    max_iou_gt_max_kernel<scalar_t><<<num_blocks(B * G), kThreads, 0, stream>>>(
        blk_max.data_ptr<scalar_t>(), blk_arg.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), B,
        G, nblk, gt_max.data_ptr<scalar_t>(), gt_arg.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    max_iou_low_quality_kernel<scalar_t><<<num_blocks(B * A), kThreads, 0, stream>>>(
        pr.data_ptr<scalar_t>(), shared_priors, A, g.data_ptr<scalar_t>(),
        counts.data_ptr<int64_t>(), B, G, nblk, p, blk_max.data_ptr<scalar_t>(),
        gt_max.data_ptr<scalar_t>(), gt_arg.data_ptr<int64_t>(), assigned.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {assigned, max_iou};
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CUDA, m) {
  m.impl("atss_assign", &atss_assign_cuda);
  m.impl("max_iou_assign", &max_iou_assign_cuda);
}

}  // namespace assign
}  // namespace codetr
