// CUDA launcher of multi-scale deformable attention: grid-stride kernels over the shared
// per-sample arithmetic of ms_deform_attn_kernel.h. One launch per call, no host syncs,
// 64-bit indices, the caller's device and current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_kernel.h"

namespace codetr {
namespace msda {
namespace {

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t work) {
  // Grid-stride loops cover any remainder; the cap keeps the grid within limits.
  return static_cast<unsigned int>(
      std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// A level is read only when it lies inside value's S positions; on CUDA this replaces the
// host-side consistency check of spatial_shapes (which would need a sync).
__device__ __forceinline__ bool level_fits(int64_t start, int64_t H, int64_t W, int64_t S) {
  return start >= 0 && H >= 0 && W >= 0 && start + H * W <= S;
}

// One thread per output element (n, q, m, channel c): adjacent threads read adjacent
// channels of the same corner, so the gathers are coalesced.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(Dims d, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                               const acc_t* __restrict__ attn, scalar_t* __restrict__ out) {
  const int64_t total = d.N * d.Q * d.M * d.D;
  const int64_t row = d.M * d.D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = i % d.D;
    const int64_t nqm = i / d.D;
    const int64_t m = nqm % d.M;
    const int64_t n = nqm / (d.M * d.Q);
    const scalar_t* value_nmc = value + n * d.S * row + m * d.D + c;
    int64_t k = nqm * d.L * d.P;
    acc_t acc = 0;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      if (!level_fits(start, H, W, d.S)) {
        k += d.P;
        continue;
      }
      const scalar_t* level = value_nmc + start * row;
      for (int64_t p = 0; p < d.P; ++p, ++k) {
        const Sample<acc_t> s = make_sample(loc[2 * k], loc[2 * k + 1], H, W);
        if (!s.inside) continue;
        acc_t v[4];
        for (int corner = 0; corner < 4; ++corner)
          v[corner] = s.pixel[corner] >= 0 ? static_cast<acc_t>(level[s.pixel[corner] * row])
                                           : acc_t(0);
        acc += attn[k] * interpolate(s, v[0], v[1], v[2], v[3]);
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// One thread per sample (n, q, m, l, p), looping over channels: the coordinate and
// attention gradients need a sum over channels, which one thread then owns; grad_value is
// scattered with atomics into an acc_t buffer (fp32 for half/bf16 value).
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(Dims d, const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                                acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc,
                                acc_t* __restrict__ grad_attn) {
  const int64_t total = d.N * d.Q * d.M * d.L * d.P;
  const int64_t row = d.M * d.D;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total;
       k += int64_t(blockDim.x) * gridDim.x) {
    const int64_t l = (k / d.P) % d.L;
    const int64_t nqm = k / (d.L * d.P);
    const int64_t m = nqm % d.M;
    const int64_t nq = nqm / d.M;
    const int64_t n = nq / d.Q;
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    if (!level_fits(start, H, W, d.S)) continue;
    const Sample<acc_t> s = make_sample(loc[2 * k], loc[2 * k + 1], H, W);
    if (!s.inside) continue;
    const acc_t a = attn[k];
    const scalar_t* g = grad_out + nq * row + m * d.D;
    const int64_t base = (n * d.S + start) * row + m * d.D;
    acc_t dot[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < d.D; ++c) {
      const acc_t gc = static_cast<acc_t>(g[c]);
      for (int corner = 0; corner < 4; ++corner) {
        if (s.pixel[corner] >= 0) {
          const int64_t idx = base + s.pixel[corner] * row + c;
          dot[corner] += gc * static_cast<acc_t>(value[idx]);
          atomicAdd(grad_value + idx, a * s.weight[corner] * gc);
        }
      }
    }
    const SampleGrad<acc_t> sg = sample_grad(s, a, dot, H, W);
    grad_attn[k] = sg.attn;
    grad_loc[2 * k] = sg.x;
    grad_loc[2 * k + 1] = sg.y;
  }
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const Dims d = check_inputs("ms_deform_attn", value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights);
  c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty({d.N, d.Q, d.M * d.D}, value.options());  // every element is written
  const int64_t work = out.numel();
  if (work == 0) return out;
  if (d.S == 0 || d.L == 0 || d.P == 0) return out.zero_();
  const auto v = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto loc = sampling_locations.to(acc_dtype).contiguous();
    const auto attn = attention_weights.to(acc_dtype).contiguous();
    forward_kernel<scalar_t, acc_t><<<num_blocks(work), kThreads, 0, stream>>>(
        d, v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op = "ms_deform_attn_backward";
  const Dims d = check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  check_grad_output(op, grad_output, value, d);
  c10::cuda::CUDAGuard guard(value.device());
  const int64_t work = d.N * d.Q * d.M * d.L * d.P;
  at::Tensor grad_value, grad_loc, grad_attn;
  const auto g = grad_output.contiguous();
  const auto v = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto loc = sampling_locations.to(acc_dtype).contiguous();
    const auto attn = attention_weights.to(acc_dtype).contiguous();
    auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
    auto grad_loc_acc = at::zeros(loc.sizes(), loc.options());
    auto grad_attn_acc = at::zeros(attn.sizes(), attn.options());
    if (work > 0 && d.S > 0 && d.D > 0) {
      backward_kernel<scalar_t, acc_t><<<num_blocks(work), kThreads, 0, stream>>>(
          d, g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
          starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
          grad_value_acc.data_ptr<acc_t>(), grad_loc_acc.data_ptr<acc_t>(),
          grad_attn_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Casts are no-ops when the dtypes already match.
    grad_value = grad_value_acc.to(value.scalar_type());
    grad_loc = grad_loc_acc.to(sampling_locations.scalar_type());
    grad_attn = grad_attn_acc.to(attention_weights.scalar_type());
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace msda
}  // namespace codetr
