// CPU launcher of multi-scale deformable attention: parallel_items (at::parallel_for threads
// taking work items from a shared counter) over the per-sample arithmetic of
// ms_deform_attn_kernel.h.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_kernel.h"

namespace codetr {
namespace msda {
namespace {

// The hot loops are compiled twice: for the x86-64 baseline (SSE2) and with AVX2+FMA,
// chosen at run time, so one wheel runs everywhere and uses 8-wide FMAs where it can.
#if defined(__x86_64__) && defined(__GNUC__)
#define CODETR_MSDA_AVX2 1
#define CODETR_ALWAYS_INLINE inline __attribute__((always_inline))
#define CODETR_TARGET_AVX2 __attribute__((target("avx2,fma")))
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define CODETR_ALWAYS_INLINE inline
#endif

template <typename scalar_t>
struct Args {
  using acc_t = acc_type<scalar_t>;
  Dims d;
  const scalar_t* value;  // [N, S, M, D] with strides sn, ss, sm and 1 (see kernel_value)
  int64_t sn, ss, sm;     // element strides of value (and of the grad_value accumulator)
  const int64_t* shapes;  // [L, 2]
  const int64_t* starts;  // [L]
  const acc_t* loc;       // [N, Q, M, L, P, 2]
  const acc_t* attn;      // [N, Q, M, L, P]
  const scalar_t* zero;   // [D] zeros: the row read for corners outside the map
};

constexpr int64_t kBlock = 256;  // queries per work item

// One query's coordinates and weights for one head (one (head, level) in the backward) are
// a slice of its record, so consecutive queries' are a record apart (1 KiB for M=8, L=4,
// P=4): a stride the hardware prefetcher does not follow across pages, and every query then
// waited on a cache miss before its first sample (a fifth of the forward's time in perf).
// Fetch kAhead queries early.
constexpr int64_t kAhead = 8;

template <typename scalar_t>
CODETR_ALWAYS_INLINE void prefetch_ahead(const Args<scalar_t>& a, int64_t k, int64_t left) {
#if defined(__GNUC__)
  if (left > kAhead) {
    const int64_t ahead = k + kAhead * a.d.M * a.d.L * a.d.P;
    __builtin_prefetch(a.loc + 2 * ahead);
    __builtin_prefetch(a.loc + 2 * ahead + 16);  // the next 64 bytes of float coordinates
    __builtin_prefetch(a.attn + ahead);
  }
#endif
}

// make_sample's common case, a sample with all four corners on the map, in fewer
// instructions: the same arithmetic, no per-corner tests; corner c lies at pixel[0] +
// {0, 1, W, W + 1}. Returns false for any other sample (NaN included): use make_sample.
// (The forward's time went with its ~145 instructions per sample, half of them make_sample's
// tests and the per-corner pointer selection: this path took case A's forward from 82 to
// 71 ms, alternating in one process.)
template <typename acc_t>
CODETR_ALWAYS_INLINE bool interior_sample(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W,
                                          Sample<acc_t>& s) {
  const acc_t Hf = static_cast<acc_t>(H), Wf = static_cast<acc_t>(W);
  const acc_t h_im = loc_y * Hf - acc_t(0.5);
  const acc_t w_im = loc_x * Wf - acc_t(0.5);
  if (!(h_im >= acc_t(0) && w_im >= acc_t(0) && h_im < Hf - acc_t(1) && w_im < Wf - acc_t(1)))
    return false;
  const int64_t h_low = static_cast<int64_t>(h_im), w_low = static_cast<int64_t>(w_im);  // floor
  s.lh = h_im - static_cast<acc_t>(h_low);
  s.lw = w_im - static_cast<acc_t>(w_low);
  s.hh = acc_t(1) - s.lh;
  s.hw = acc_t(1) - s.lw;
  s.pixel[0] = h_low * W + w_low;
  s.weight[0] = s.hh * s.hw;
  s.weight[1] = s.hh * s.lw;
  s.weight[2] = s.lh * s.hw;
  s.weight[3] = s.lh * s.lw;
  s.inside = true;
  return true;
}

// Forward of one work item: (batch n, head m, block of queries); items are numbered with
// the block fastest, so the threads sweep one head's maps at a time, and a block's queries
// sample a window of each of the head's maps that stays in L2 while the queries slide over
// it. Query by query: a query's coordinates and weights for the head are one contiguous
// record (L P samples), its sums stay in registers (kD) over all of them, and its output
// row is written once. (Level outer, query inner, as before, kept the block's sums in a
// scratch buffer and read each record in L pieces: case A's forward took ~15% longer.)
// Each sample's corner weights are computed once and applied to all D channels in a loop
// the compiler vectorizes. Corners outside the map read the zero row with weight 0, so the
// channel loop has no branches (and an inf elsewhere in `value` cannot leak in as 0 * inf).
// kD > 0 fixes D at compile time (kD == d.D): the query's kD sums then live in registers
// instead of making a store-to-load round trip through memory per sample (the hottest
// instructions in perf before). D = 32: the paper's 256 channels over 8 heads.
// acc: [D] scratch, the sums when kD == 0.
template <typename scalar_t, int64_t kD>
CODETR_ALWAYS_INLINE void forward_block(const Args<scalar_t>& a, int64_t item, scalar_t* out,
                                        acc_type<scalar_t>* acc) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = a.d;
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t row = d.M * D;  // stride between two queries of out
  const int64_t blocks = (d.Q + kBlock - 1) / kBlock;
  const int64_t n = item / (blocks * d.M);
  const int64_t m = (item / blocks) % d.M;
  const int64_t q_begin = (item % blocks) * kBlock;
  const int64_t q_end = std::min(q_begin + kBlock, d.Q);
  const scalar_t* value_nm = a.value + n * a.sn + m * a.sm;
  const int64_t ss = a.ss;
  for (int64_t q = q_begin; q < q_end; ++q) {
    acc_t local[kD > 0 ? kD : 1];
    acc_t* __restrict sum = kD > 0 ? local : acc;
    for (int64_t c = 0; c < D; ++c) sum[c] = acc_t(0);
    int64_t k = ((n * d.Q + q) * d.M + m) * d.L * d.P;  // sample (n, q, m, 0, 0)
    prefetch_ahead(a, k, q_end - q);
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
      const scalar_t* level = value_nm + a.starts[l] * ss;
      for (int64_t p = 0; p < d.P; ++p, ++k) {
        Sample<acc_t> s;
        const scalar_t *r0, *r1, *r2, *r3;
        if (interior_sample(a.loc[2 * k], a.loc[2 * k + 1], H, W, s)) {
          r0 = level + s.pixel[0] * ss;
          r1 = r0 + ss;
          r2 = r0 + W * ss;
          r3 = r2 + ss;
        } else {
          s = make_sample(a.loc[2 * k], a.loc[2 * k + 1], H, W);
          if (!s.inside) continue;
          r0 = s.pixel[0] >= 0 ? level + s.pixel[0] * ss : a.zero;
          r1 = s.pixel[1] >= 0 ? level + s.pixel[1] * ss : a.zero;
          r2 = s.pixel[2] >= 0 ? level + s.pixel[2] * ss : a.zero;
          r3 = s.pixel[3] >= 0 ? level + s.pixel[3] * ss : a.zero;
        }
        const acc_t w0 = a.attn[k] * s.weight[0], w1 = a.attn[k] * s.weight[1];
        const acc_t w2 = a.attn[k] * s.weight[2], w3 = a.attn[k] * s.weight[3];
        for (int64_t c = 0; c < D; ++c) {
          sum[c] += w0 * static_cast<acc_t>(r0[c]) + w1 * static_cast<acc_t>(r1[c]) +
                    w2 * static_cast<acc_t>(r2[c]) + w3 * static_cast<acc_t>(r3[c]);
        }
      }
    }
    scalar_t* o = out + (n * d.Q + q) * row + m * D;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(sum[c]);
  }
}

template <typename scalar_t>
void forward_block_baseline(const Args<scalar_t>& a, int64_t nb, scalar_t* out,
                            acc_type<scalar_t>* acc) {
  if (a.d.D == 32) return forward_block<scalar_t, 32>(a, nb, out, acc);
  forward_block<scalar_t, 0>(a, nb, out, acc);
}

#ifdef CODETR_MSDA_AVX2
template <typename scalar_t>
CODETR_TARGET_AVX2 void forward_block_avx2(const Args<scalar_t>& a, int64_t nb, scalar_t* out,
                                           acc_type<scalar_t>* acc) {
  if (a.d.D == 32) return forward_block<scalar_t, 32>(a, nb, out, acc);
  forward_block<scalar_t, 0>(a, nb, out, acc);
}
#endif

template <typename scalar_t>
void forward_kernel(const Args<scalar_t>& a, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t blocks = (a.d.Q + kBlock - 1) / kBlock;
  parallel_items(
      a.d.N * a.d.M * blocks, [&] { return std::vector<acc_t>(a.d.D); },
      [&](int64_t nb, std::vector<acc_t>& acc) {
#ifdef CODETR_MSDA_AVX2
        if (cpu_has_avx2()) return forward_block_avx2(a, nb, out, acc.data());
#endif
        forward_block_baseline(a, nb, out, acc.data());
      });
}

// Backward of one (batch n, head m) pair. The pair owns the slice value[n, :, m, :], so
// every grad_value element is written by one thread, in query order: the result is
// bitwise identical whatever the number of threads, with no atomics and no private
// copies. One fused pass over the channels computes the three sums of accumulate_grad
// and scatters into the four corners' grad_value rows (corners outside the map read the
// zero row and write into `scratch`, with weight 0). kD as in forward_block.
template <typename scalar_t, int64_t kD>
CODETR_ALWAYS_INLINE void backward_pair(const Args<scalar_t>& a, int64_t nm,
                                        const scalar_t* grad_out, acc_type<scalar_t>* grad_value,
                                        acc_type<scalar_t>* grad_loc, acc_type<scalar_t>* grad_attn,
                                        acc_type<scalar_t>* scratch) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = a.d;
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t row = d.M * D;  // stride between two queries of grad_out
  const int64_t n = nm / d.M, m = nm % d.M;
  const int64_t ss = a.ss;
  const scalar_t* value_nm = a.value + n * a.sn + m * a.sm;
  acc_t* grad_value_nm = grad_value + n * a.sn + m * a.sm;
  // Queries in blocks, levels outer within a block, so that consecutive queries read and
  // update nearby rows of one level (the order is fixed: the result stays deterministic).
  // Query by query with levels inner, as the forward does, was ~5% slower here (cases A
  // and C, alternating in one process), a row-major grad_value accumulator (no transpose
  // back, but scattered updates) ~7% slower, and blocks of 64 or 1024 queries no faster.
  for (int64_t q_begin = 0; q_begin < d.Q; q_begin += kBlock) {
    const int64_t q_end = std::min(q_begin + kBlock, d.Q);
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
      const int64_t level = a.starts[l] * ss;
      for (int64_t q = q_begin; q < q_end; ++q) {
        const scalar_t* __restrict g = grad_out + (n * d.Q + q) * row + m * D;
        int64_t k = (((n * d.Q + q) * d.M + m) * d.L + l) * d.P;  // sample (n, q, m, l, 0)
        prefetch_ahead(a, k, q_end - q);
        for (int64_t p = 0; p < d.P; ++p, ++k) {
          Sample<acc_t> s;
          const scalar_t* r[4];
          acc_t* gv[4];
          if (interior_sample(a.loc[2 * k], a.loc[2 * k + 1], H, W, s)) {
            const int64_t offset[4] = {0, ss, W * ss, (W + 1) * ss};
            for (int c = 0; c < 4; ++c) {
              r[c] = value_nm + level + s.pixel[0] * ss + offset[c];
              gv[c] = grad_value_nm + level + s.pixel[0] * ss + offset[c];
            }
          } else {
            s = make_sample(a.loc[2 * k], a.loc[2 * k + 1], H, W);
            if (!s.inside) {
              grad_attn[k] = grad_loc[2 * k] = grad_loc[2 * k + 1] = acc_t(0);
              continue;
            }
            for (int c = 0; c < 4; ++c) {
              const bool in = s.pixel[c] >= 0;
              r[c] = in ? value_nm + level + s.pixel[c] * ss : a.zero;
              gv[c] = in ? grad_value_nm + level + s.pixel[c] * ss : scratch;
            }
          }
          const acc_t at = a.attn[k];
          acc_t coef[4];
          for (int c = 0; c < 4; ++c) coef[c] = at * s.weight[c];
          const scalar_t* __restrict r0 = r[0];
          const scalar_t* __restrict r1 = r[1];
          const scalar_t* __restrict r2 = r[2];
          const scalar_t* __restrict r3 = r[3];
          acc_t* __restrict gv0 = gv[0];
          acc_t* __restrict gv1 = gv[1];
          acc_t* __restrict gv2 = gv[2];
          acc_t* __restrict gv3 = gv[3];
          acc_t ga = 0, gw = 0, gh = 0;
#pragma omp simd reduction(+ : ga, gw, gh)
          for (int64_t c = 0; c < D; ++c) {
            const acc_t gc = static_cast<acc_t>(g[c]);
            accumulate_grad(s, gc, static_cast<acc_t>(r0[c]), static_cast<acc_t>(r1[c]),
                            static_cast<acc_t>(r2[c]), static_cast<acc_t>(r3[c]), ga, gw, gh);
            gv0[c] += coef[0] * gc;
            gv1[c] += coef[1] * gc;
            gv2[c] += coef[2] * gc;
            gv3[c] += coef[3] * gc;
          }
          grad_attn[k] = ga;
          grad_loc[2 * k] = location_grad(at, gw, W);
          grad_loc[2 * k + 1] = location_grad(at, gh, H);
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_pair_baseline(const Args<scalar_t>& a, int64_t nm, const scalar_t* grad_out,
                            acc_type<scalar_t>* grad_value, acc_type<scalar_t>* grad_loc,
                            acc_type<scalar_t>* grad_attn, acc_type<scalar_t>* scratch) {
  if (a.d.D == 32)
    return backward_pair<scalar_t, 32>(a, nm, grad_out, grad_value, grad_loc, grad_attn, scratch);
  backward_pair<scalar_t, 0>(a, nm, grad_out, grad_value, grad_loc, grad_attn, scratch);
}

#ifdef CODETR_MSDA_AVX2
template <typename scalar_t>
CODETR_TARGET_AVX2 void backward_pair_avx2(const Args<scalar_t>& a, int64_t nm,
                                           const scalar_t* grad_out, acc_type<scalar_t>* grad_value,
                                           acc_type<scalar_t>* grad_loc,
                                           acc_type<scalar_t>* grad_attn,
                                           acc_type<scalar_t>* scratch) {
  if (a.d.D == 32)
    return backward_pair<scalar_t, 32>(a, nm, grad_out, grad_value, grad_loc, grad_attn, scratch);
  backward_pair<scalar_t, 0>(a, nm, grad_out, grad_value, grad_loc, grad_attn, scratch);
}
#endif

template <typename scalar_t>
void backward_kernel(const Args<scalar_t>& a, const scalar_t* grad_out,
                     acc_type<scalar_t>* grad_value, acc_type<scalar_t>* grad_loc,
                     acc_type<scalar_t>* grad_attn) {
  using acc_t = acc_type<scalar_t>;
  parallel_items(
      a.d.N * a.d.M, [&] { return std::vector<acc_t>(a.d.D); },
      [&](int64_t nm, std::vector<acc_t>& scratch) {
#ifdef CODETR_MSDA_AVX2
        if (cpu_has_avx2())
          return backward_pair_avx2(a, nm, grad_out, grad_value, grad_loc, grad_attn,
                                    scratch.data());
#endif
        backward_pair_baseline(a, nm, grad_out, grad_value, grad_loc, grad_attn, scratch.data());
      });
}

// src [N, A, B, D] -> dst [N, B, A, D], cast to dst_t; in parallel over (n, a). (Written
// out because permute().contiguous() took ~4x longer on these shapes.)
template <typename src_t, typename dst_t>
void swap_axes(const src_t* src, dst_t* dst, int64_t N, int64_t A, int64_t B, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, B * D));
  at::parallel_for(0, N * A, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const src_t* from = src + i * B * D;
      dst_t* to = dst + ((i / A) * B * A + i % A) * D;
      for (int64_t b = 0; b < B; ++b, from += D, to += A * D)
        for (int64_t c = 0; c < D; ++c) to[c] = static_cast<dst_t>(from[c]);
    }
  });
}

// The value the kernels read: [N, S, M, D] indexed, channels contiguous, in one of two
// layouts. Head-major (a view of an [N, M, S, D] buffer): each head's maps contiguous, a
// position every D elements instead of every M * D, so the rows of one level that a block
// of queries samples span M times fewer pages and neighbouring positions share cache lines:
// single-threaded, case A's kernel took ~133 ms instead of ~230. It costs a transpose of
// value, which only pays when every (head, position) is sampled about once or more (the
// encoder: Q = S, M L P samples per position); a decoder's 300 queries over an 800 x 1333
// memory (case B: forward 7.4 ms with it, 4-5 ms without) read value as it is.
template <typename scalar_t>
at::Tensor kernel_value(const at::Tensor& value, const Dims& d) {
  if (value.permute({0, 2, 1, 3}).is_contiguous()) return value;  // already head-major
  if (d.Q * d.L * d.P < d.S) return value.contiguous();
  auto out = at::empty({d.N, d.M, d.S, d.D}, value.options());
  advise_huge_pages(out);
  const auto src = value.contiguous();
  swap_axes(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d.N, d.S, d.M, d.D);
  return out.permute({0, 2, 1, 3});
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const Dims d = check_inputs("ms_deform_attn", value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights);
  auto out = at::empty({d.N, d.Q, d.M * d.D}, value.options());
  advise_huge_pages(out);
  if (out.numel() == 0) return out;
  if (d.S == 0 || d.L == 0 || d.P == 0) return out.zero_();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto v = kernel_value<scalar_t>(value, d);
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto loc = sampling_locations.to(acc_dtype).contiguous();
    const auto attn = attention_weights.to(acc_dtype).contiguous();
    const std::vector<scalar_t> zero(d.D, scalar_t(0));
    const Args<scalar_t> args{d,
                              v.data_ptr<scalar_t>(),
                              v.stride(0),
                              v.stride(1),
                              v.stride(2),
                              shapes.data_ptr<int64_t>(),
                              starts.data_ptr<int64_t>(),
                              loc.data_ptr<acc_t>(),
                              attn.data_ptr<acc_t>(),
                              zero.data()};
    forward_kernel<scalar_t>(args, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const char* op = "ms_deform_attn_backward";
  const Dims d = check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  check_grad_output(op, grad_output, value, d);
  const auto contiguous = at::MemoryFormat::Contiguous;
  if (grad_output.numel() == 0 || d.S == 0 || d.L == 0 || d.P == 0)
    return {at::zeros_like(value, contiguous), at::zeros_like(sampling_locations, contiguous),
            at::zeros_like(attention_weights, contiguous)};
  // The kernel writes every element of grad_loc and grad_attn: no zero-fill needed.
  at::Tensor grad_value;
  auto grad_loc = at::empty_like(sampling_locations, contiguous);
  auto grad_attn = at::empty_like(attention_weights, contiguous);
  advise_huge_pages(grad_loc);
  advise_huge_pages(grad_attn);
  const auto g = grad_output.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    auto v = kernel_value<scalar_t>(value, d);
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto loc = sampling_locations.to(acc_dtype).contiguous();
    const auto attn = attention_weights.to(acc_dtype).contiguous();
    // Gradients accumulate in acc_t (fp32 for half/bf16 value) and are cast at the end;
    // grad_value in the layout of the value the kernel reads (the same strides).
    auto grad_value_acc = at::empty_strided(v.sizes(), v.strides(), value.options().dtype(acc_dtype));
    advise_huge_pages(grad_value_acc);
    grad_value_acc.zero_();
    auto grad_loc_acc = grad_loc.to(acc_dtype);
    auto grad_attn_acc = grad_attn.to(acc_dtype);
    const std::vector<scalar_t> zero(d.D, scalar_t(0));
    const Args<scalar_t> args{d,
                              v.data_ptr<scalar_t>(),
                              v.stride(0),
                              v.stride(1),
                              v.stride(2),
                              shapes.data_ptr<int64_t>(),
                              starts.data_ptr<int64_t>(),
                              loc.data_ptr<acc_t>(),
                              attn.data_ptr<acc_t>(),
                              zero.data()};
    backward_kernel<scalar_t>(args, g.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(),
                              grad_loc_acc.data_ptr<acc_t>(), grad_attn_acc.data_ptr<acc_t>());
    v = at::Tensor();  // maybe a head-major copy of value: free it before grad_value
    if (grad_value_acc.is_contiguous()) {
      grad_value = grad_value_acc.to(value.scalar_type());  // no copy for fp32 / fp64
    } else {  // head-major: transposed back
      grad_value = at::empty_like(value, contiguous);
      advise_huge_pages(grad_value);
      swap_axes(grad_value_acc.data_ptr<acc_t>(), grad_value.data_ptr<scalar_t>(), d.N, d.M, d.S,
                d.D);
    }
    if (!grad_loc_acc.is_same(grad_loc)) grad_loc.copy_(grad_loc_acc);
    if (!grad_attn_acc.is_same(grad_attn)) grad_attn.copy_(grad_attn_acc);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(codetr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace msda
}  // namespace codetr
