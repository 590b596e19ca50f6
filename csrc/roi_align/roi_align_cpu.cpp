// CPU launcher of RoIAlign: at::parallel_for over the shared per-RoI and per-sample
// arithmetic of roi_align_kernel.h.
//
// Layout: the feature maps are NCHW, where the 4 corners of a sample are 4 scalars in each
// of C planes: gathering them channel by channel is slow. So each task owns one image and
// a block of 32 channels: it copies that slice of the map channels-last into a buffer of
// its own (a corner is then one contiguous 32-vector, and the channel loop vectorizes),
// pools every bin of that image's RoIs for its channels (forward) or accumulates their
// gradients in the buffer and writes it back (backward). Whole maps are never transposed
// or copied at once: on large maps that costs more than the pooling itself.
//
// The bilinear weights of every sample are computed once per call (torchvision's
// "pre_calc") and shared by all tasks: a chunk of consecutive (RoI, bin) units at a time,
// bounded in memory. Each output element (forward) and each grad_input element (backward)
// is owned by one task and receives its contributions in torchvision's serial order, so
// float32/float64 results match torchvision's CPU kernel bit for bit, whatever the number
// of threads, with no atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "roi_align.h"
#include "roi_align_kernel.h"

namespace codetr {
namespace roi_align {
namespace {

// Precomputed samples held at once (~14 MiB in float32): (RoI, bin) units are taken whole,
// in order, until the next one would exceed this.
constexpr int64_t kSampleBudget = int64_t(1) << 18;
// Channels per task: a multiple of the SIMD width, and small enough that the task's
// channels-last slice of a large map (H * W * 32 values) stays cache-friendly.
constexpr int64_t kChannelBlock = 32;

// Bilinear weights of the valid samples of bins [bin_begin, bin_end) of one RoI, in
// (bin, iy, ix) order. Samples outside the map are dropped; bin_stop[i] is the end of bin
// bin_begin + i in `out`.
template <typename T>
void precompute_bins(const Geometry<T>& g, const Dims& d, int64_t bin_begin, int64_t bin_end,
                     Bilinear<T>* out, int64_t* bin_stop) {
  int64_t n = 0;
  for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
    const int64_t ph = bin / d.PW, pw = bin % d.PW;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const T y = sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const T x = sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w);
        const Bilinear<T> s = bilinear(y, x, d.H, d.W);
        if (s.valid) out[n++] = s;
      }
    }
    bin_stop[bin - bin_begin] = n;
  }
}

// The precomputed samples of the (RoI, bin) units [u0, u1): unit u's valid samples are
// samples[begin(u) .. end(u)).
template <typename T>
struct Chunk {
  int64_t u0, u1;
  const int64_t* first;  // first[u - u0]: slot of unit u's first sample
  const int64_t* last;   // last[u - u0]: end of unit u's valid samples
  const Bilinear<T>* samples;
  int64_t begin(int64_t u) const { return first[u - u0]; }
  int64_t end(int64_t u) const { return last[u - u0]; }
};

// Calls body(chunk) for consecutive chunks of (RoI, bin) units covering all RoIs, after
// precomputing each chunk's samples in parallel. RoIs with an invalid batch index (only
// possible on the unchecked path) have no samples.
template <typename T, typename Body>
void for_each_chunk(const Dims& d, const std::vector<Geometry<T>>& geo, Body&& body) {
  const int64_t bins = d.PH * d.PW, units = d.K * bins;
  auto unit_samples = [&](int64_t u) {
    const Geometry<T>& g = geo[u / bins];
    return g.batch < 0 ? int64_t(0) : g.grid_h * g.grid_w;
  };
  std::vector<int64_t> first, last;
  std::vector<Bilinear<T>> samples;
  for (int64_t u0 = 0; u0 < units;) {
    int64_t u1 = u0, total = 0;
    first.clear();
    while (u1 < units && (u1 == u0 || total + unit_samples(u1) <= kSampleBudget)) {
      first.push_back(total);
      total += unit_samples(u1++);
    }
    last.resize(u1 - u0);
    samples.resize(std::max<int64_t>(total, 1));
    at::parallel_for(u0, u1, 64, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const Geometry<T>& g = geo[u / bins];
        const int64_t i = u - u0, bin = u % bins;
        int64_t n = 0;
        if (g.batch >= 0) precompute_bins(g, d, bin, bin + 1, samples.data() + first[i], &n);
        last[i] = first[i] + n;
      }
    });
    body(Chunk<T>{u0, u1, first.data(), last.data(), samples.data()});
    u0 = u1;
  }
}

// buf[p * cb + j] = planes[j * cs + p * ps] for channels j < cb and pixels p < HW: a
// channels-last copy of cb consecutive channels of one image, from NCHW (cs = HW, ps = 1)
// or NHWC (cs = 1, ps = C) memory; the reverse when `store`. Pixel-major order: the buffer
// side is contiguous and, from NCHW, each plane's cache line serves 16 consecutive pixels
// (4x faster than channel-major here).
template <bool store, typename P, typename T>
void transpose_slice(P* planes, int64_t HW, int64_t cs, int64_t ps, int64_t cb, T* buf) {
  for (int64_t p = 0; p < HW; ++p) {
    P* src = planes + p * ps;
    T* dst = buf + p * cb;
    for (int64_t j = 0; j < cb; ++j) {
      if constexpr (store)
        src[j * cs] = static_cast<P>(dst[j]);
      else
        dst[j] = static_cast<T>(src[j * cs]);
    }
  }
}

// The per-sample channel loops below are written with GCC/Clang vector types where the
// block size allows: with plain loops GCC's unroll-and-jam fuses two samples into one
// *scalar* channel loop (measured 2-3x slower). Other compilers get the plain loops.
#if defined(__GNUC__)
#define CODETR_ROI_ALIGN_VECTOR_EXT 1
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(16)));
  static constexpr int64_t kLanes = 16 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
};
#endif

// acc[j] += ((w0 r0[j] + w1 r1[j]) + w2 r2[j]) + w3 r3[j] for j < cb: one sample of the
// forward, in torchvision's order.
template <int64_t CB, typename T>
inline void add_sample(T* __restrict acc, const T* __restrict r0, const T* __restrict r1,
                       const T* __restrict r2, const T* __restrict r3, T w0, T w1, T w2, T w3,
                       int64_t cb_rt) {
#ifdef CODETR_ROI_ALIGN_VECTOR_EXT
  if constexpr (CB > 0 && CB % Vec<T>::kLanes == 0) {
    using V = Vec<T>;
    for (int64_t j = 0; j < CB; j += V::kLanes) {
      auto a = V::load(acc + j);
      a += w0 * V::load(r0 + j) + w1 * V::load(r1 + j) + w2 * V::load(r2 + j) +
           w3 * V::load(r3 + j);
      V::store(acc + j, a);
    }
    return;
  }
#endif
  const int64_t cb = CB > 0 ? CB : cb_rt;
  for (int64_t j = 0; j < cb; ++j) acc[j] += w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j];
}

// dst[j] += g[j] * w / count for j < cb: one corner of one sample of the backward.
template <int64_t CB, typename T>
inline void add_corner(T* __restrict dst, const T* __restrict g, T w, T count, int64_t cb_rt) {
#ifdef CODETR_ROI_ALIGN_VECTOR_EXT
  if constexpr (CB > 0 && CB % Vec<T>::kLanes == 0) {
    using V = Vec<T>;
    for (int64_t j = 0; j < CB; j += V::kLanes) {
      auto d = V::load(dst + j);
      d += V::load(g + j) * w / count;  // corner_grad's order: (g * w) / count
      V::store(dst + j, d);
    }
    return;
  }
#endif
  const int64_t cb = CB > 0 ? CB : cb_rt;
  for (int64_t j = 0; j < cb; ++j) dst[j] += corner_grad(g[j], w, count);
}

// Forward of one bin for CB channels (cb_rt at run time when CB == 0): the average of its
// samples.
template <int64_t CB, typename T, typename scalar_t>
inline void pool_bin(const T* slice, int64_t cb_rt, const Bilinear<T>* samples, int64_t s_begin,
                     int64_t s_end, T count, scalar_t* out, int64_t out_stride) {
  const int64_t cb = CB > 0 ? CB : cb_rt;
  T acc[kChannelBlock];
  for (int64_t j = 0; j < cb; ++j) acc[j] = T(0);
  for (int64_t s = s_begin; s < s_end; ++s) {
    const Bilinear<T>& smp = samples[s];
    add_sample<CB>(acc, slice + smp.pos[0] * cb, slice + smp.pos[1] * cb, slice + smp.pos[2] * cb,
                   slice + smp.pos[3] * cb, smp.w[0], smp.w[1], smp.w[2], smp.w[3], cb);
  }
  for (int64_t j = 0; j < cb; ++j) out[j * out_stride] = static_cast<scalar_t>(acc[j] / count);
}

// Backward of one bin for CB channels (cb_rt at run time when CB == 0): g[j] * w / count
// to each corner of each sample, in sample then corner order (torchvision's).
template <int64_t CB, typename T>
inline void scatter_bin(T* slice, int64_t cb_rt, const Bilinear<T>* samples, int64_t s_begin,
                        int64_t s_end, T count, const T* g) {
  const int64_t cb = CB > 0 ? CB : cb_rt;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const Bilinear<T>& smp = samples[s];
    for (int corner = 0; corner < 4; ++corner)
      add_corner<CB>(slice + smp.pos[corner] * cb, g, smp.w[corner], count, cb);
  }
}

template <typename T>
std::vector<Geometry<T>> all_geometry(const Dims& d, const T* rois, T scale,
                                      int64_t sampling_ratio, bool aligned) {
  std::vector<Geometry<T>> geo(d.K);
  for (int64_t k = 0; k < d.K; ++k)
    geo[k] = make_geometry(rois + 5 * k, scale, d.N, d.PH, d.PW, sampling_ratio, aligned);
  return geo;
}

// Whether some unit of the chunk belongs to image n (else a task has nothing to do).
template <typename T>
bool chunk_has_image(const Chunk<T>& ch, const std::vector<Geometry<T>>& geo, int64_t bins,
                     int64_t n) {
  for (int64_t k = ch.u0 / bins; k * bins < ch.u1; ++k)
    if (geo[k].batch == n) return true;
  return false;
}

// Forward: parallel over (image, block of channels) tasks; out is [K, C, bins]. input is
// NCHW, or NHWC when `channels_last`.
template <typename scalar_t>
void forward_kernel(const Dims& d, const scalar_t* input, bool channels_last,
                    const acc_type<scalar_t>* rois, acc_type<scalar_t> scale,
                    int64_t sampling_ratio, bool aligned, scalar_t* out) {
  using T = acc_type<scalar_t>;
  const int64_t bins = d.PH * d.PW, C = d.C, HW = d.H * d.W;
  const int64_t cblocks = (C + kChannelBlock - 1) / kChannelBlock;
  const auto geo = all_geometry(d, rois, scale, sampling_ratio, aligned);
  for (int64_t k = 0; k < d.K; ++k)  // guard: unreachable after check_batch_indices
    if (geo[k].batch < 0) std::fill(out + k * C * bins, out + (k + 1) * C * bins, scalar_t(0));
  for_each_chunk(d, geo, [&](const Chunk<T>& ch) {
    at::parallel_for(0, d.N * cblocks, 1, [&](int64_t begin, int64_t end) {
      // The task's channels-last slice (uninitialized: fully overwritten below).
      std::unique_ptr<T[]> slice(new T[HW * std::min(kChannelBlock, C)]);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / cblocks, c0 = (t % cblocks) * kChannelBlock;
        const int64_t cb = std::min(kChannelBlock, C - c0);
        if (!chunk_has_image(ch, geo, bins, n)) continue;
        if (channels_last)
          transpose_slice<false>(input + n * HW * C + c0, HW, 1, C, cb, slice.get());
        else
          transpose_slice<false>(input + (n * C + c0) * HW, HW, HW, 1, cb, slice.get());
        for (int64_t u = ch.u0; u < ch.u1; ++u) {
          const int64_t k = u / bins, bin = u % bins;
          if (geo[k].batch != n) continue;
          scalar_t* o = out + (k * C + c0) * bins + bin;
          if (cb == kChannelBlock)
            pool_bin<kChannelBlock>(slice.get(), cb, ch.samples, ch.begin(u), ch.end(u),
                                    geo[k].count, o, bins);
          else
            pool_bin<0>(slice.get(), cb, ch.samples, ch.begin(u), ch.end(u), geo[k].count, o,
                        bins);
        }
      }
    });
  });
}

// Backward: parallel over (image, block of channels) tasks, each owning its slice of
// grad_in [N, C, H, W] (uninitialized: the first chunk writes every element). Units are
// visited in (RoI, bin) order within a chunk and chunks in order, so every element
// receives its contributions in torchvision's serial order. The slice is loaded into the
// channels-last buffer before a chunk (zeros for the first) and stored after it.
template <typename scalar_t>
void backward_kernel(const Dims& d, const scalar_t* grad_out, const acc_type<scalar_t>* rois,
                     acc_type<scalar_t> scale, int64_t sampling_ratio, bool aligned,
                     acc_type<scalar_t>* grad_in) {
  using T = acc_type<scalar_t>;
  const int64_t bins = d.PH * d.PW, C = d.C, HW = d.H * d.W;
  const int64_t cblocks = (C + kChannelBlock - 1) / kChannelBlock;
  const auto geo = all_geometry(d, rois, scale, sampling_ratio, aligned);
  for_each_chunk(d, geo, [&](const Chunk<T>& ch) {
    at::parallel_for(0, d.N * cblocks, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<T[]> buf(new T[HW * std::min(kChannelBlock, C)]);
      T* slice = buf.get();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / cblocks, c0 = (t % cblocks) * kChannelBlock;
        const int64_t cb = std::min(kChannelBlock, C - c0);
        T* planes = grad_in + (n * C + c0) * HW;
        if (!chunk_has_image(ch, geo, bins, n)) {
          if (ch.u0 == 0) std::fill(planes, planes + cb * HW, T(0));  // grad_in starts empty
          continue;
        }
        if (ch.u0 == 0)
          std::fill(slice, slice + HW * cb, T(0));
        else
          transpose_slice<false>(planes, HW, HW, 1, cb, slice);
        for (int64_t u = ch.u0; u < ch.u1; ++u) {
          const int64_t k = u / bins, bin = u % bins;
          if (geo[k].batch != n || ch.begin(u) == ch.end(u)) continue;
          T g[kChannelBlock];  // upstream gradient of this bin for the block's channels
          const scalar_t* go = grad_out + (k * C + c0) * bins + bin;
          for (int64_t j = 0; j < cb; ++j) g[j] = static_cast<T>(go[j * bins]);
          if (cb == kChannelBlock)
            scatter_bin<kChannelBlock>(slice, cb, ch.samples, ch.begin(u), ch.end(u),
                                       geo[k].count, g);
          else
            scatter_bin<0>(slice, cb, ch.samples, ch.begin(u), ch.end(u), geo[k].count, g);
        }
        transpose_slice<true>(planes, HW, HW, 1, cb, slice);
      }
    });
  });
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                         int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                         bool aligned) {
  const Dims d =
      check_forward("roi_align", input, rois, pooled_height, pooled_width, sampling_ratio);
  auto out = at::empty({d.K, d.C, d.PH, d.PW}, input.options());
  if (out.numel() == 0) return out;
  if (d.H == 0 || d.W == 0) return out.zero_();  // every sample lies outside an empty map
  // NCHW, or NHWC as it is (no copy) when input is channels_last.
  const bool channels_last =
      !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto in = channels_last ? input : input.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_cpu",
                                  [&] {
    using T = acc_type<scalar_t>;
    const auto r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
    forward_kernel<scalar_t>(d, in.data_ptr<scalar_t>(), channels_last, r.data_ptr<T>(),
                             static_cast<T>(spatial_scale), sampling_ratio, aligned,
                             out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad_output, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio,
                                  bool aligned) {
  const Dims d = check_backward("roi_align_backward", grad_output, rois, pooled_height,
                                pooled_width, batch_size, channels, height, width,
                                sampling_ratio);
  if (d.K == 0 || d.N * d.C * d.H * d.W == 0)
    return at::zeros({d.N, d.C, d.H, d.W}, grad_output.options());
  auto grad_input = at::empty({d.N, d.C, d.H, d.W}, grad_output.options());
  const auto go = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "roi_align_backward_cpu", [&] {
    using T = acc_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<T>::value;
    const auto r = rois.to(acc_dtype).contiguous();
    // Accumulate in T (float32 for half/bfloat16) and cast once at the end.
    auto grad_acc = grad_input.scalar_type() == acc_dtype
                        ? grad_input
                        : at::empty(grad_input.sizes(), grad_input.options().dtype(acc_dtype));
    backward_kernel<scalar_t>(d, go.data_ptr<scalar_t>(), r.data_ptr<T>(),
                              static_cast<T>(spatial_scale), sampling_ratio, aligned,
                              grad_acc.data_ptr<T>());
    if (!grad_acc.is_same(grad_input)) grad_input.copy_(grad_acc);
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CPU, m) {
  m.impl("roi_align", &roi_align_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace roi_align
}  // namespace codetr
