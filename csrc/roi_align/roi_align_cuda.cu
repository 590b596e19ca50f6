// CUDA launcher of RoIAlign: grid-stride kernels over the shared per-RoI and per-sample
// arithmetic of roi_align_kernel.h. One launch per call, no host syncs, 64-bit indices,
// the caller's device and current stream.
//
// Unlike the CPU path, the batch indices in rois[:, 0] are not validated (that would need
// a host sync): a RoI whose index is outside [0, N) pools zeros and passes no gradient.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "roi_align.h"
#include "roi_align_kernel.h"

namespace codetr {
namespace roi_align {
namespace {

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t work) {
  // Grid-stride loops cover any remainder; the cap keeps the grid within limits.
  return static_cast<unsigned int>(
      std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// One thread per output element (k, c, ph, pw): the RoI geometry is recomputed per thread
// (a few flops) and the bin's samples are gathered from channel c's plane; adjacent
// threads are adjacent bins of the same RoI and channel, so their samples are close.
template <typename scalar_t, typename T>
__global__ void forward_kernel(Dims d, const scalar_t* __restrict__ input,
                               const T* __restrict__ rois, T scale, int64_t sampling_ratio,
                               bool aligned, scalar_t* __restrict__ out) {
  const int64_t bins = d.PH * d.PW;
  const int64_t total = d.K * d.C * bins;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = i % d.PW;
    const int64_t ph = (i / d.PW) % d.PH;
    const int64_t c = (i / bins) % d.C;
    const int64_t k = i / (bins * d.C);
    const Geometry<T> g =
        make_geometry(rois + 5 * k, scale, d.N, d.PH, d.PW, sampling_ratio, aligned);
    if (g.batch < 0) {
      out[i] = scalar_t(0);
      continue;
    }
    const scalar_t* plane = input + (g.batch * d.C + c) * d.H * d.W;
    T acc = 0;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const T y = sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const T x = sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w);
        const Bilinear<T> s = bilinear(y, x, d.H, d.W);
        if (s.valid) acc += interpolate(s, plane);
      }
    }
    out[i] = static_cast<scalar_t>(acc / g.count);
  }
}

// One thread per grad_output element (k, c, ph, pw), scattering g * w / count to the
// corners of its bin's samples with atomics into a T buffer (float32 for half/bfloat16).
template <typename scalar_t, typename T>
__global__ void backward_kernel(Dims d, const scalar_t* __restrict__ grad_out,
                                const T* __restrict__ rois, T scale, int64_t sampling_ratio,
                                bool aligned, T* __restrict__ grad_in) {
  const int64_t bins = d.PH * d.PW;
  const int64_t total = d.K * d.C * bins;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = i % d.PW;
    const int64_t ph = (i / d.PW) % d.PH;
    const int64_t c = (i / bins) % d.C;
    const int64_t k = i / (bins * d.C);
    const Geometry<T> g =
        make_geometry(rois + 5 * k, scale, d.N, d.PH, d.PW, sampling_ratio, aligned);
    if (g.batch < 0) continue;
    const T go = static_cast<T>(grad_out[i]);
    T* plane = grad_in + (g.batch * d.C + c) * d.H * d.W;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const T y = sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const T x = sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w);
        const Bilinear<T> s = bilinear(y, x, d.H, d.W);
        if (!s.valid) continue;
        for (int corner = 0; corner < 4; ++corner)
          atomicAdd(plane + s.pos[corner], corner_grad(go, s.w[corner], g.count));
      }
    }
  }
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                          int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                          bool aligned) {
  const Dims d =
      check_forward("roi_align", input, rois, pooled_height, pooled_width, sampling_ratio);
  c10::cuda::CUDAGuard guard(input.device());
  auto out = at::empty({d.K, d.C, d.PH, d.PW}, input.options());
  const int64_t work = out.numel();
  if (work == 0) return out;
  if (d.H == 0 || d.W == 0) return out.zero_();  // every sample lies outside an empty map
  const auto in = input.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_cuda",
                                  [&] {
    using T = acc_type<scalar_t>;
    const auto r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
    forward_kernel<scalar_t, T><<<num_blocks(work), kThreads, 0, stream>>>(
        d, in.data_ptr<scalar_t>(), r.data_ptr<T>(), static_cast<T>(spatial_scale),
        sampling_ratio, aligned, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad_output, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio,
                                   bool aligned) {
  const Dims d = check_backward("roi_align_backward", grad_output, rois, pooled_height,
                                pooled_width, batch_size, channels, height, width,
                                sampling_ratio);
  c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t work = grad_output.numel();
  if (work == 0 || d.N * d.C * d.H * d.W == 0)
    return at::zeros({d.N, d.C, d.H, d.W}, grad_output.options());
  const auto go = grad_output.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "roi_align_backward_cuda", [&] {
    using T = acc_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<T>::value;
    const auto r = rois.to(acc_dtype).contiguous();
    auto grad_acc = at::zeros({d.N, d.C, d.H, d.W}, grad_output.options().dtype(acc_dtype));
    backward_kernel<scalar_t, T><<<num_blocks(work), kThreads, 0, stream>>>(
        d, go.data_ptr<scalar_t>(), r.data_ptr<T>(), static_cast<T>(spatial_scale),
        sampling_ratio, aligned, grad_acc.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_input = grad_acc.to(grad_output.scalar_type());  // no-op for float32/float64
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CUDA, m) {
  m.impl("roi_align", &roi_align_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace roi_align
}  // namespace codetr
