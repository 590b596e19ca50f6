// CUDA launchers of the box operators: grid-stride kernels over the shared per-pair
// arithmetic of box_ops_kernel.h. 64-bit indices, the caller's device and current stream.
// box_iou and the GIoU loss never synchronise with the host; NMS does once, to learn how
// many boxes are kept (the output size depends on the data).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "box_ops.h"
#include "box_ops_kernel.h"

namespace codetr {
namespace boxes {
namespace {

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t work) {
  // Grid-stride loops cover any remainder; the cap keeps the grid within limits.
  return static_cast<unsigned int>(
      std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20));
}

#define CODETR_GRID_STRIDE(i, n)                                                      \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(blockDim.x) * gridDim.x)

// One thread per output element (b, n, m): adjacent threads read adjacent gts of the same
// box of boxes1.
template <Overlap mode, typename T>
__global__ void pairwise_forward_kernel(const T* __restrict__ boxes1, const T* __restrict__ boxes2,
                                        int64_t B, int64_t N, int64_t M, T eps,
                                        T* __restrict__ out) {
  CODETR_GRID_STRIDE(i, B * N * M) {
    const int64_t r = i / M;  // row b * N + n
    const T* a = boxes1 + r * 4;
    const T* b = boxes2 + ((r / N) * M + i % M) * 4;
    out[i] = overlap<mode>(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]), b[0], b[1],
                           b[2], b[3], box_area(b[0], b[1], b[2], b[3]), eps);
  }
}

template <Overlap mode, typename T>
__global__ void aligned_forward_kernel(const T* __restrict__ boxes1, const T* __restrict__ boxes2,
                                       int64_t pairs, T eps, T* __restrict__ out) {
  CODETR_GRID_STRIDE(r, pairs) {
    const T* a = boxes1 + r * 4;
    const T* b = boxes2 + r * 4;
    out[r] = overlap<mode>(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]), b[0], b[1],
                           b[2], b[3], box_area(b[0], b[1], b[2], b[3]), eps);
  }
}

// One thread per pair; both boxes' gradients are scattered with atomics (a pairwise
// backward is rare: the matcher's cost needs none).
template <Overlap mode, typename T>
__global__ void pairwise_backward_kernel(const T* __restrict__ grad, const T* __restrict__ boxes1,
                                         const T* __restrict__ boxes2, int64_t B, int64_t N,
                                         int64_t M, T eps, T* __restrict__ grad1,
                                         T* __restrict__ grad2) {
  CODETR_GRID_STRIDE(i, B * N * M) {
    const int64_t r = i / M;
    const int64_t c = (r / N) * M + i % M;  // column b * M + m
    T ga[4], gb[4];
    overlap_backward<mode>(boxes1 + r * 4, boxes2 + c * 4, eps, grad[i], ga, gb);
    for (int k = 0; k < 4; ++k) {
      atomicAdd(grad1 + r * 4 + k, ga[k]);
      atomicAdd(grad2 + c * 4 + k, gb[k]);
    }
  }
}

template <Overlap mode, typename T>
__global__ void aligned_backward_kernel(const T* __restrict__ grad, const T* __restrict__ boxes1,
                                        const T* __restrict__ boxes2, int64_t pairs, T eps,
                                        T* __restrict__ grad1, T* __restrict__ grad2) {
  CODETR_GRID_STRIDE(r, pairs) {
    overlap_backward<mode>(boxes1 + r * 4, boxes2 + r * 4, eps, grad[r], grad1 + r * 4,
                           grad2 + r * 4);
  }
}

template <typename T>
__global__ void giou_loss_forward_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                                         int64_t K, T eps, T* __restrict__ loss) {
  CODETR_GRID_STRIDE(k, K) { loss[k] = giou_loss(pred + 4 * k, target + 4 * k, eps); }
}

template <typename T>
__global__ void giou_loss_backward_kernel(const T* __restrict__ grad, const T* __restrict__ pred,
                                          const T* __restrict__ target, int64_t K, T eps,
                                          T* __restrict__ grad_pred, T* __restrict__ grad_target) {
  CODETR_GRID_STRIDE(k, K) {
    giou_loss_backward(pred + 4 * k, target + 4 * k, eps, grad[k], grad_pred + 4 * k,
                       grad_target + 4 * k);
  }
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2, c10::string_view mode,
                        bool aligned, double eps) {
  const IouDims d = check_box_iou("box_iou", boxes1, boxes2, mode, aligned);
  c10::cuda::CUDAGuard guard(boxes1.device());
  auto out = aligned ? at::empty({d.B, d.N}, boxes1.options())
                     : at::empty({d.B, d.N, d.M}, boxes1.options());
  const int64_t work = out.numel();
  if (work == 0) return out;
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "box_iou_cuda", [&] {
    dispatch_mode(d.mode, [&](auto tag) {
      constexpr Overlap m = decltype(tag)::value;
      const scalar_t e = static_cast<scalar_t>(eps);
      if (aligned) {
        aligned_forward_kernel<m, scalar_t><<<num_blocks(work), kThreads, 0, stream>>>(
            b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), work, e, out.data_ptr<scalar_t>());
      } else {
        pairwise_forward_kernel<m, scalar_t><<<num_blocks(work), kThreads, 0, stream>>>(
            b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), d.B, d.N, d.M, e,
            out.data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> box_iou_backward_cuda(const at::Tensor& grad,
                                                         const at::Tensor& boxes1,
                                                         const at::Tensor& boxes2,
                                                         c10::string_view mode, bool aligned,
                                                         double eps) {
  const char* op = "box_iou_backward";
  const IouDims d = check_box_iou(op, boxes1, boxes2, mode, aligned);
  check_iou_grad(op, grad, boxes1, d, aligned);
  c10::cuda::CUDAGuard guard(boxes1.device());
  auto grad1 = at::zeros({d.B, d.N, 4}, boxes1.options());
  auto grad2 = at::zeros({d.B, d.M, 4}, boxes2.options());
  const int64_t work = grad.numel();
  if (work == 0) return {grad1, grad2};
  const auto g = grad.contiguous();
  const auto b1 = boxes1.contiguous();
  const auto b2 = boxes2.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(boxes1.scalar_type(), "box_iou_backward_cuda", [&] {
    dispatch_mode(d.mode, [&](auto tag) {
      constexpr Overlap m = decltype(tag)::value;
      const scalar_t e = static_cast<scalar_t>(eps);
      if (aligned) {
        aligned_backward_kernel<m, scalar_t><<<num_blocks(work), kThreads, 0, stream>>>(
            g.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), work, e,
            grad1.data_ptr<scalar_t>(), grad2.data_ptr<scalar_t>());
      } else {
        pairwise_backward_kernel<m, scalar_t><<<num_blocks(work), kThreads, 0, stream>>>(
            g.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), d.B, d.N,
            d.M, e, grad1.data_ptr<scalar_t>(), grad2.data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad1, grad2};
}

at::Tensor giou_loss_cuda(const at::Tensor& pred, const at::Tensor& target, double eps) {
  const int64_t K = check_giou_loss("generalized_box_iou_loss", pred, target);
  c10::cuda::CUDAGuard guard(pred.device());
  auto loss = at::empty({K}, pred.options());
  if (K == 0) return loss;
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "giou_loss_cuda", [&] {
    giou_loss_forward_kernel<scalar_t><<<num_blocks(K), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), K, static_cast<scalar_t>(eps),
        loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> giou_loss_backward_cuda(const at::Tensor& grad,
                                                          const at::Tensor& pred,
                                                          const at::Tensor& target, double eps) {
  const char* op = "generalized_box_iou_loss_backward";
  const int64_t K = check_giou_loss(op, pred, target);
  check_loss_grad(op, grad, pred);
  c10::cuda::CUDAGuard guard(pred.device());
  auto grad_pred = at::empty({K, 4}, pred.options());
  auto grad_target = at::empty({K, 4}, target.options());
  if (K == 0) return {grad_pred, grad_target};
  const auto g = grad.contiguous();
  const auto p = pred.contiguous();
  const auto t = target.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "giou_loss_backward_cuda", [&] {
    giou_loss_backward_kernel<scalar_t><<<num_blocks(K), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), K,
        static_cast<scalar_t>(eps), grad_pred.data_ptr<scalar_t>(),
        grad_target.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_pred, grad_target};
}

// ---------------------------------------------------------------------------------------
// NMS, the standard bitmask scheme. Boxes are sorted by decreasing score (stable, like
// torchvision's CPU nms). Block (row block, column block) of 64 x 64 boxes: thread t sets
// bit c of mask[row, column block] when box row = 64 * row_block + t suppresses box
// 64 * column_block + c, i.e. when that box comes later, has the same class, and
// nms_iou > threshold. Only column blocks at or after the row block are computed (a box
// suppresses only later boxes), and only those words are read by the scan.
constexpr int kMaskBits = 64;
using mask_t = unsigned long long;

template <typename T>
__global__ void nms_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ cls,
                                int64_t K, int64_t col_blocks, T threshold,
                                mask_t* __restrict__ mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (row_block > col_block) return;
  const int64_t row_start = row_block * kMaskBits, col_start = col_block * kMaskBits;
  const int rows = K - row_start < kMaskBits ? static_cast<int>(K - row_start) : kMaskBits;
  const int cols = K - col_start < kMaskBits ? static_cast<int>(K - col_start) : kMaskBits;
  __shared__ T col_boxes[kMaskBits * 5];
  __shared__ int64_t col_cls[kMaskBits];
  if (threadIdx.x < cols) {
    const T* b = boxes + (col_start + threadIdx.x) * 4;
    T* s = col_boxes + threadIdx.x * 5;
    s[0] = b[0];
    s[1] = b[1];
    s[2] = b[2];
    s[3] = b[3];
    s[4] = box_area(b[0], b[1], b[2], b[3]);
    col_cls[threadIdx.x] = cls != nullptr ? cls[col_start + threadIdx.x] : 0;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    const int64_t i = row_start + threadIdx.x;
    const T* a = boxes + i * 4;
    const T area_a = box_area(a[0], a[1], a[2], a[3]);
    const int64_t cls_a = cls != nullptr ? cls[i] : 0;
    mask_t bits = 0;
    for (int c = row_block == col_block ? static_cast<int>(threadIdx.x) + 1 : 0; c < cols; ++c) {
      const T* s = col_boxes + c * 5;
      if (col_cls[c] == cls_a &&
          nms_iou(a[0], a[1], a[2], a[3], area_a, s[0], s[1], s[2], s[3], s[4]) > threshold) {
        bits |= mask_t(1) << c;
      }
    }
    mask[i * col_blocks + col_block] = bits;
  }
}

// The greedy scan, in one block: box i is kept unless a kept earlier box removed it;
// a kept box ORs its mask row into `removed`. The threads share the words of a row.
// `removed` lives in shared memory when it fits, else in the global buffer.
__global__ void nms_scan_kernel(const mask_t* __restrict__ mask, int64_t K, int64_t col_blocks,
                                mask_t* removed_global, bool use_shared, bool* __restrict__ keep) {
  extern __shared__ mask_t removed_shared[];
  mask_t* removed = use_shared ? removed_shared : removed_global;
  for (int64_t w = threadIdx.x; w < col_blocks; w += blockDim.x) removed[w] = 0;
  __syncthreads();
  for (int64_t i = 0; i < K; ++i) {
    const int64_t word = i / kMaskBits;
    const bool kept = !((removed[word] >> (i % kMaskBits)) & 1);
    __syncthreads();  // every thread has read bit i before any thread updates its word
    if (kept) {
      const mask_t* row = mask + i * col_blocks;
      for (int64_t w = word + threadIdx.x; w < col_blocks; w += blockDim.x) removed[w] |= row[w];
    }
    if (threadIdx.x == 0) keep[i] = kept;
    __syncthreads();
  }
}

// Kept indices (into the unsorted input) in decreasing score order.
at::Tensor nms_cuda_impl(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs,
                         double iou_threshold) {
  const int64_t K = boxes.size(0);
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, 0, /*descending=*/true));
  const at::Tensor sorted = boxes.index_select(0, order).contiguous();
  const at::Tensor cls = idxs != nullptr ? idxs->index_select(0, order).contiguous() : at::Tensor();
  const int64_t col_blocks = (K + kMaskBits - 1) / kMaskBits;
  CODETR_CHECK_ARG(col_blocks <= 65535, idxs != nullptr ? "batched_nms" : "nms",
                   " boxes: at most ", 65535 * kMaskBits, " boxes on CUDA, got ", K);
  auto mask = at::empty({K, col_blocks}, boxes.options().dtype(at::kLong));
  auto keep_sorted = at::empty({K}, boxes.options().dtype(at::kBool));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cuda", [&] {
    const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(col_blocks));
    nms_mask_kernel<scalar_t><<<grid, kMaskBits, 0, stream>>>(
        sorted.data_ptr<scalar_t>(), cls.defined() ? cls.data_ptr<int64_t>() : nullptr, K,
        col_blocks, threshold_below<scalar_t>(iou_threshold),
        reinterpret_cast<mask_t*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const size_t removed_bytes = static_cast<size_t>(col_blocks) * sizeof(mask_t);
  const bool use_shared = removed_bytes <= 48 * 1024;
  at::Tensor removed_global =
      use_shared ? at::Tensor() : at::empty({col_blocks}, boxes.options().dtype(at::kLong));
  nms_scan_kernel<<<1, kThreads, use_shared ? removed_bytes : 0, stream>>>(
      reinterpret_cast<const mask_t*>(mask.data_ptr<int64_t>()), K, col_blocks,
      use_shared ? nullptr : reinterpret_cast<mask_t*>(removed_global.data_ptr<int64_t>()),
      use_shared, keep_sorted.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // nonzero synchronises with the host: the number of kept boxes sizes the output.
  return order.index_select(0, at::nonzero(keep_sorted).squeeze(1));
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  const int64_t K = check_nms("nms", boxes, scores, nullptr);
  c10::cuda::CUDAGuard guard(boxes.device());
  if (K == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  return nms_cuda_impl(boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            const at::Tensor& idxs, double iou_threshold) {
  const int64_t K = check_nms("batched_nms", boxes, scores, &idxs);
  c10::cuda::CUDAGuard guard(boxes.device());
  if (K == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor keep = nms_cuda_impl(boxes, scores, &idxs, iou_threshold);
  // torchvision's batched_nms switches to its per-class path above 100,000 coordinates
  // on CUDA.
  return order_like_torchvision(keep, boxes, scores, 100000);
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CUDA, m) {
  m.impl("box_iou", &box_iou_cuda);
  m.impl("box_iou_backward", &box_iou_backward_cuda);
  m.impl("generalized_box_iou_loss", &giou_loss_cuda);
  m.impl("generalized_box_iou_loss_backward", &giou_loss_backward_cuda);
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
}

}  // namespace boxes
}  // namespace codetr
