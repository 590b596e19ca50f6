// CPU launcher of multi-scale deformable attention: parallel_items (at::parallel_for threads
// taking work items from a shared counter) over the per-sample arithmetic of
// ms_deform_attn_kernel.h.
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_kernel.h"

namespace codetr {
namespace msda {
namespace {

// The hot loops are compiled twice: for the x86-64 baseline (SSE2) and with AVX2+FMA,
// chosen at run time, so one wheel runs everywhere and uses 8-wide FMAs where it can.
// CODETR_CPU_ISA=baseline makes the AVX2 machines run the baseline too (the tests do).
// (An AVX-512 build, 64-byte vectors, measured slower on our Zen 4 machines, which split
// 512-bit operations in two: case C, one thread, forward 13.5 -> 16.4 ms, backward 40.8 ->
// 45.1.)
#if defined(__x86_64__) && defined(__GNUC__)
#define CODETR_MSDA_AVX2 1
#define CODETR_ALWAYS_INLINE inline __attribute__((always_inline))
#define CODETR_TARGET_AVX2 __attribute__((target("avx2,fma")))
bool cpu_has_avx2() {
  static const bool has = [] {
    const char* isa = std::getenv("CODETR_CPU_ISA");
    const std::string cap = isa == nullptr ? "" : isa;
    TORCH_CHECK(cap.empty() || cap == "baseline" || cap == "avx2",
                "CODETR_CPU_ISA must be baseline or avx2 (or unset), got '", cap, "'");
    return cap != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#else
#define CODETR_ALWAYS_INLINE inline
#endif

// 32 bytes of T (8 floats, 4 doubles) as one GCC/Clang vector: a ymm register in the AVX2
// build of a function, two xmm registers in the baseline build. Used where the compiler's
// own vectorization fell short: the backward's per-sample sums over the channels (written
// as plain loops with `omp simd` reductions they took ~40 of its ~250 instructions per
// sample). The helpers are always inlined, so no vector crosses a call: GCC's warning that
// such a return would change the ABI without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);

template <typename acc_t, typename scalar_t>
CODETR_ALWAYS_INLINE Vec<acc_t> load(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int64_t i = 0; i < kLanes<acc_t>; ++i) v[i] = static_cast<acc_t>(p[i]);
  }
  return v;
}

template <typename T>
CODETR_ALWAYS_INLINE void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

// The lane sums of four vectors, out[c] = sum of d_c's lanes, by a transposing tree of
// shuffles and adds (~15 instructions; summing each vector's lanes one by one took ~30).
#if defined(__clang__)
#define CODETR_SHUFFLE(T, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CODETR_SHUFFLE(T, a, b, ...) __builtin_shuffle(a, b, typename ShuffleMask<T>::type{__VA_ARGS__})
#endif

template <typename T>
struct ShuffleMask;
template <>
struct ShuffleMask<float> {
  typedef int32_t type __attribute__((vector_size(32)));
};
template <>
struct ShuffleMask<double> {
  typedef int64_t type __attribute__((vector_size(32)));
};

CODETR_ALWAYS_INLINE void sum4(const Vec<float>& d0, const Vec<float>& d1, const Vec<float>& d2,
                               const Vec<float>& d3, float out[4]) {
  using T = float;
  // [d0's 4 half sums | d1's], [d2's | d3's]
  const Vec<T> t0 = CODETR_SHUFFLE(T, d0, d1, 0, 1, 2, 3, 8, 9, 10, 11) +
                    CODETR_SHUFFLE(T, d0, d1, 4, 5, 6, 7, 12, 13, 14, 15);
  const Vec<T> t1 = CODETR_SHUFFLE(T, d2, d3, 0, 1, 2, 3, 8, 9, 10, 11) +
                    CODETR_SHUFFLE(T, d2, d3, 4, 5, 6, 7, 12, 13, 14, 15);
  // [d0 d0 d2 d2 | d1 d1 d3 d3] (two partial sums each, within 128-bit halves)
  const Vec<T> u = CODETR_SHUFFLE(T, t0, t1, 0, 1, 8, 9, 4, 5, 12, 13) +
                   CODETR_SHUFFLE(T, t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
  const Vec<T> w = u + CODETR_SHUFFLE(T, u, u, 1, 0, 3, 2, 5, 4, 7, 6);
  out[0] = w[0];
  out[1] = w[4];
  out[2] = w[2];
  out[3] = w[6];
}

CODETR_ALWAYS_INLINE void sum4(const Vec<double>& d0, const Vec<double>& d1,
                               const Vec<double>& d2, const Vec<double>& d3, double out[4]) {
  using T = double;
  const Vec<T> t0 = CODETR_SHUFFLE(T, d0, d1, 0, 1, 4, 5) + CODETR_SHUFFLE(T, d0, d1, 2, 3, 6, 7);
  const Vec<T> t1 = CODETR_SHUFFLE(T, d2, d3, 0, 1, 4, 5) + CODETR_SHUFFLE(T, d2, d3, 2, 3, 6, 7);
  const Vec<T> u = CODETR_SHUFFLE(T, t0, t1, 0, 4, 2, 6) + CODETR_SHUFFLE(T, t0, t1, 1, 5, 3, 7);
  out[0] = u[0];
  out[1] = u[2];
  out[2] = u[1];
  out[3] = u[3];
}

// Where the kernels find level l of one head's maps: it starts `start[l]` positions into
// the head's slice of value, and its rows are `stride[l]` positions apart.
// Padded (the copies that forward_kernel and backward_kernel stage, one head's maps
// contiguous, a position every D elements): each level is stored with a border of
// zeros, a column on either side, a row above and two below, (H + 3) x (W + 2) positions
// with pixel (y, x) at (y + 1, x + 1). Every sample that touches the map then has its four
// corners in the stored block (the border reads as the zeros outside the map), and a
// sample off the map reads the two zero rows at the bottom: make_taps gives every sample
// one pixel, and the kernels take no branch per sample. (Without the border a quarter of
// case C's samples, those near the edges of its small levels, went through make_sample
// behind a mispredicted branch.) Unpadded: the maps as they lie in value.
struct Layout {
  // Padded when the copy pays, every (head, position) sampled about once or more (an
  // encoder: Q = S, M L P samples per position), and its positions fit the int32 pixels of
  // make_taps. A head-major copy puts the rows of a level that a block of queries samples
  // on M times fewer pages, and neighbouring positions in shared cache lines
  // (single-threaded, case A's kernel took ~133 ms instead of ~230 on value as it lies); a
  // decoder's 300 queries over an 800 x 1333 memory (case B: forward 7.4 ms with a copy,
  // 4-5 ms without) read value in place, unpadded.
  Layout(const Dims& d, const int64_t* shapes) {
    build(d, shapes, d.Q * d.L * d.P >= d.S);
    if (padded && positions >= (int64_t{1} << 31)) build(d, shapes, false);
  }
  void build(const Dims& d, const int64_t* shapes, bool padded_) {
    padded = padded_;
    positions = 0;
    H.clear(), W.clear(), start.clear(), stride.clear(), map_start.clear(), rows.clear();
    const int64_t pad = padded ? 1 : 0;
    for (int64_t l = 0; l < d.L; ++l) {
      H.push_back(shapes[2 * l]);
      W.push_back(shapes[2 * l + 1]);
      map_start.push_back(l == 0 ? 0 : map_start[l - 1] + H[l - 1] * W[l - 1]);
      start.push_back(positions);
      stride.push_back(W[l] + 2 * pad);
      positions += (H[l] + 3 * pad) * stride[l];
      for (int64_t y = 0; padded && y < H[l] + 3; ++y) rows.emplace_back(l, y);
    }
  }
  bool padded;
  int64_t positions;  // per head: S, or the padded total
  std::vector<int64_t> H, W, start, stride;
  std::vector<int64_t> map_start;  // the level's first position in value, [N, S, M, D]
  std::vector<std::pair<int64_t, int64_t>> rows;  // padded: (level, stored row), in order
};

template <typename scalar_t>
struct Args {
  using acc_t = acc_type<scalar_t>;
  Dims d;
  const Layout& layout;
  const scalar_t* value;  // [N, S, M, D] with strides sn, ss, sm and 1; staged: one head's
  int64_t sn, ss, sm;     // padded maps, sn = sm = 0 and ss = D (and so grad_value's)
  const acc_t* loc;       // [N, Q, M, L, P, 2]
  const acc_t* attn;      // [N, Q, M, L, P]
  const scalar_t* zero;   // [D] zeros: the row read for corners outside an unpadded map
};

// The sizes make_taps needs for sample j = l * P + p of a record, fixed for a call, in
// coordinates shifted by the layout's padding (pad = 1: the border is row and column 0).
// h_lim, w_lim: the bounds of a sample whose four corners lie in the stored block, H + 1
// and W + 1 padded (H - 1 and W - 1 unpadded; 0 when a head's positions would not fit 32
// bits, so that no sample counts). base: the level's first position in a head's slice;
// stride: its row stride; outside: the pixel of a sample off the map, the zero rows of a
// padded level, -1 unpadded (make_sample then).
template <typename acc_t>
struct Levels {
  explicit Levels(const Dims& d, const Layout& layout)
      : pad(layout.padded ? acc_t(1) : acc_t(0)) {
    const bool fits = layout.positions < (int64_t{1} << 31);
    const int64_t pad_ = layout.padded ? 1 : 0;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = layout.H[l], W = layout.W[l];
      for (int64_t p = 0; p < d.P; ++p) {
        h.push_back(static_cast<acc_t>(H));
        w.push_back(static_cast<acc_t>(W));
        // A zero-size level gets limits no sample is inside: it contributes nothing.
        const bool empty = H == 0 || W == 0;
        h_lim.push_back(fits && !empty ? static_cast<acc_t>(H - 1 + 2 * pad_) : acc_t(0));
        w_lim.push_back(fits && !empty ? static_cast<acc_t>(W - 1 + 2 * pad_) : acc_t(0));
        base.push_back(fits ? static_cast<int32_t>(layout.start[l]) : 0);
        stride.push_back(fits ? static_cast<int32_t>(layout.stride[l]) : 0);
        const int64_t zero_rows = layout.start[l] + (H + 1) * layout.stride[l];
        outside.push_back(layout.padded ? static_cast<int32_t>(zero_rows) : -1);
        level.push_back(static_cast<int32_t>(l));
      }
    }
  }
  acc_t pad;
  std::vector<acc_t> h, w, h_lim, w_lim;
  std::vector<int32_t> base, stride, outside, level;
};

// The L P samples of one (query, head) record, prepared together by make_taps. Sample j:
// pixel[j], the position of its corner 0 in the head's slice (layout coordinates), its
// bilinear weights with (attn_weight) and without (weight) the attention weight, and its
// fractional parts lh, lw. Only in an unpadded layout can pixel[j] be -1: a sample with a
// corner off the map, which then goes through make_sample. keep[j]: whether sample j can
// contribute (in a padded layout, not if it is off the map); live[0, count): those samples
// in order, listed by list_live.
template <typename acc_t>
struct Taps {
  explicit Taps(int64_t n) : pixel(n), keep(n), live(n), lh(n), lw(n) {
    for (int c = 0; c < 4; ++c) {
      weight[c].resize(n);
      attn_weight[c].resize(n);
    }
  }
  std::vector<int32_t> pixel, keep, live;
  int64_t count = 0;
  std::vector<acc_t> weight[4], attn_weight[4], lh, lw;
};

// make_sample's arithmetic for a whole record at once, in a loop the compiler vectorizes
// (8 samples per instruction in fp32 under AVX2): no branches, and coordinates clamped
// (NaN to 0) before the integer conversions so that every lane's conversion is defined.
// (One sample at a time, the coordinate work sat between the channel loops of consecutive
// samples; here the kernels' per-sample work is a table lookup. Case C, alternating
// processes, with the backward below: forward min 13.1 -> 10.9 ms.)
template <typename acc_t>
CODETR_ALWAYS_INLINE void make_taps(const Levels<acc_t>& lv, const acc_t* __restrict loc,
                                    const acc_t* __restrict attn, Taps<acc_t>& t) {
  const int64_t n = static_cast<int64_t>(lv.h.size());
  const acc_t shift = lv.pad - acc_t(0.5);  // pixel = loc * size - 0.5, then + pad
  const acc_t* __restrict h = lv.h.data();
  const acc_t* __restrict w = lv.w.data();
  const acc_t* __restrict h_lim = lv.h_lim.data();
  const acc_t* __restrict w_lim = lv.w_lim.data();
  const int32_t* __restrict base = lv.base.data();
  const int32_t* __restrict stride = lv.stride.data();
  const int32_t* __restrict outside = lv.outside.data();
  int32_t* __restrict pixel = t.pixel.data();
  int32_t* __restrict keep = t.keep.data();
  acc_t* __restrict lh_out = t.lh.data();
  acc_t* __restrict lw_out = t.lw.data();
  acc_t* __restrict w0 = t.weight[0].data();
  acc_t* __restrict w1 = t.weight[1].data();
  acc_t* __restrict w2 = t.weight[2].data();
  acc_t* __restrict w3 = t.weight[3].data();
  acc_t* __restrict aw0 = t.attn_weight[0].data();
  acc_t* __restrict aw1 = t.attn_weight[1].data();
  acc_t* __restrict aw2 = t.attn_weight[2].data();
  acc_t* __restrict aw3 = t.attn_weight[3].data();
  // GCC does not take __restrict on local pointers as a promise: without ivdep it would
  // test the 16 arrays for overlap, exceed its limit on such tests and not vectorize.
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const acc_t y = loc[2 * j + 1] * h[j] + shift;
    const acc_t x = loc[2 * j] * w[j] + shift;
    const int32_t in = (y >= acc_t(0)) & (x >= acc_t(0)) & (y < h_lim[j]) & (x < w_lim[j]);
    const acc_t yc = std::min(h_lim[j], std::max(acc_t(0), y));
    const acc_t xc = std::min(w_lim[j], std::max(acc_t(0), x));
    const int32_t y_low = static_cast<int32_t>(yc), x_low = static_cast<int32_t>(xc);  // floor
    const acc_t lh = yc - static_cast<acc_t>(y_low), lw = xc - static_cast<acc_t>(x_low);
    const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw, a = attn[j];
    pixel[j] = in ? base[j] + y_low * stride[j] + x_low : outside[j];
    keep[j] = in | (outside[j] < 0);  // off a padded map: not live
    lh_out[j] = lh;
    lw_out[j] = lw;
    w0[j] = hh * hw;
    w1[j] = hh * lw;
    w2[j] = lh * hw;
    w3[j] = lh * lw;
    // A sample off the map contributes nothing, whatever its attention weight (NaN, inf),
    // as in make_sample: in a padded layout it would otherwise read the zero rows, a * 0.
    const acc_t a_in = in ? a : acc_t(0);
    aw0[j] = a_in * w0[j];
    aw1[j] = a_in * w1[j];
    aw2[j] = a_in * w2[j];
    aw3[j] = a_in * w3[j];
  }
}

// The list of live samples, live[0, count), for the backward: updates of the zero rows by
// the samples off a padded map made a chain of dependent read-modify-writes, and skipping
// them by a branch mispredicted (a sixth of case C's samples are off the map, at random).
// The forward reads all samples (those off the map read zeros): the list cost ~20
// instructions per sample there, more than the sums it spared (callgrind, case C: 60 -> 56
// instructions per sample without it).
template <typename acc_t>
CODETR_ALWAYS_INLINE void list_live(Taps<acc_t>& t) {
  const int64_t n = static_cast<int64_t>(t.keep.size());
  const int32_t* __restrict keep = t.keep.data();
  int32_t* __restrict live = t.live.data();
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    live[count] = static_cast<int32_t>(j);
    count += keep[j];
  }
  t.count = count;
}

// Per-thread scratch of the kernels.
template <typename acc_t>
struct Scratch {
  explicit Scratch(const Dims& d) : taps(d.L * d.P), row(d.D) {}
  Taps<acc_t> taps;
  std::vector<acc_t> row;  // [D]: forward sums when D is not fixed; backward's write sink
  int64_t staged = -1;     // the (n, m) pair whose maps this thread staged in this call
};

constexpr int64_t kBlock = 256;  // queries per block of the forward
// parallel_items grains, in work_units (benchmarks/bench_small_calls.py --grain-sweep).
constexpr double kGrainForward = 5e5;  // two threads win from ~1e6 (x1.0 at 1.05e6, x1.5-1.9 at 4e6)
constexpr double kGrainBackward = 2.5e5;  // from ~5e5 (x1.4 at 5.2e5, x0.4-0.9 at 2.6e5)

// One query's coordinates and weights for one head are a slice of its record, so
// consecutive queries' are a record apart (1 KiB for M=8, L=4, P=4): a stride the hardware
// prefetcher does not follow across pages, and every query then waited on a cache miss
// before its first sample (a fifth of the forward's time in perf). Fetch kAhead queries
// early.
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

// The cache lines of `bytes` bytes from p, for reading or (kWrite) for writing. The
// backward's per-query rows of grad_out, grad_loc and grad_attn are as far apart as the
// records (see prefetch_ahead): each query's first read of its grad_out row stalled on a
// cache miss (perf: ~12% of case A's backward on the instruction after it).
template <int kWrite>
CODETR_ALWAYS_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, kWrite);
#endif
}

// The first cache line of each of a sample's four corner rows (corner 0 at r), for
// reading or (kWrite) for writing.
template <int kWrite, typename T>
CODETR_ALWAYS_INLINE void prefetch_corners(const T* r, int64_t ss, int64_t dy) {
#if defined(__GNUC__)
  __builtin_prefetch(r, kWrite);
  __builtin_prefetch(r + ss, kWrite);
  __builtin_prefetch(r + dy, kWrite);
  __builtin_prefetch(r + dy + ss, kWrite);
#endif
}

// The sums of one output row, sum += w0 r0 + w1 r1 + w2 r2 + w3 r3 per sample over the
// channels of its four corner rows. With D fixed at compile time (kD > 0) they are kD /
// kLanes vectors the compiler keeps in registers (an array of kD scalars was kept in
// memory: a store-to-load round trip per sample, the hottest instructions in perf);
// otherwise D scalars in the scratch row.
template <typename acc_t, int64_t kD>
struct RowSums {
  static constexpr int64_t kL = kLanes<acc_t>;
  static_assert(kD % kL == 0, "kD must be a whole number of vectors");
  RowSums(acc_t*, int64_t) {}
  template <typename scalar_t>
  CODETR_ALWAYS_INLINE void add(const scalar_t* r0, const scalar_t* r1, const scalar_t* r2,
                                const scalar_t* r3, acc_t w0, acc_t w1, acc_t w2, acc_t w3) {
    for (int64_t i = 0; i < kD / kL; ++i)
      v[i] += w0 * load<acc_t>(r0 + i * kL) + w1 * load<acc_t>(r1 + i * kL) +
              w2 * load<acc_t>(r2 + i * kL) + w3 * load<acc_t>(r3 + i * kL);
  }
  template <typename scalar_t>
  CODETR_ALWAYS_INLINE void write(scalar_t* o) const {
    for (int64_t i = 0; i < kD / kL; ++i)
      for (int64_t c = 0; c < kL; ++c) o[i * kL + c] = static_cast<scalar_t>(v[i][c]);
  }
  Vec<acc_t> v[kD / kL] = {};
};

template <typename acc_t>
struct RowSums<acc_t, 0> {
  RowSums(acc_t* row, int64_t D) : sum(row), D(D) { std::fill(sum, sum + D, acc_t(0)); }
  template <typename scalar_t>
  CODETR_ALWAYS_INLINE void add(const scalar_t* r0, const scalar_t* r1, const scalar_t* r2,
                                const scalar_t* r3, acc_t w0, acc_t w1, acc_t w2, acc_t w3) {
    for (int64_t c = 0; c < D; ++c) {
      sum[c] += w0 * static_cast<acc_t>(r0[c]) + w1 * static_cast<acc_t>(r1[c]) +
                w2 * static_cast<acc_t>(r2[c]) + w3 * static_cast<acc_t>(r3[c]);
    }
  }
  template <typename scalar_t>
  CODETR_ALWAYS_INLINE void write(scalar_t* o) const {
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(sum[c]);
  }
  acc_t* __restrict sum;
  int64_t D;
};

// Forward of one block of queries of one (batch n, head m) pair: item = (n M + m) blocks +
// block. A block's queries sample a window of each of the head's maps that stays in L2
// while the queries slide over it. Query by query: a query's coordinates and weights for
// the head are one contiguous record (L P samples), prepared by make_taps; its sums
// (RowSums) run over its samples, and its output row is written once. (Level outer, query
// inner, kept the block's sums in a scratch buffer and read each record in L pieces: case
// A's forward took ~15% longer.) Corners off the map read zeros, the padded layout's border or the zero row,
// never a neighbouring value with weight 0 (an inf there would leak in as 0 * inf).
// kD > 0 fixes D at compile time (kD == d.D; D = 32: the paper's 256 channels over 8
// heads). kDense: value rows are kD apart (a.ss == kD, the padded layout), so a sample's
// corners sit at constant offsets from two pointers, which frees registers.
template <typename scalar_t, int64_t kD, bool kDense>
CODETR_ALWAYS_INLINE void forward_block(const Args<scalar_t>& a,
                                        const Levels<acc_type<scalar_t>>& lv, int64_t item,
                                        scalar_t* out, Scratch<acc_type<scalar_t>>& scratch) {
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
  const int64_t ss = kDense ? kD : a.ss;
  const int64_t samples = d.L * d.P;
  const int32_t* pixel = scratch.taps.pixel.data();
  const int32_t* stride = lv.stride.data();
  const acc_t* aw0 = scratch.taps.attn_weight[0].data();
  const acc_t* aw1 = scratch.taps.attn_weight[1].data();
  const acc_t* aw2 = scratch.taps.attn_weight[2].data();
  const acc_t* aw3 = scratch.taps.attn_weight[3].data();
  for (int64_t q = q_begin; q < q_end; ++q) {
    RowSums<acc_t, kD> sum(scratch.row.data(), D);
    const int64_t k0 = ((n * d.Q + q) * d.M + m) * d.L * d.P;  // sample (n, q, m, 0, 0)
    prefetch_ahead(a, k0, q_end - q);
    make_taps(lv, a.loc + 2 * k0, a.attn + k0, scratch.taps);
    for (int64_t j = 0; j < samples; ++j) {
      if (pixel[j] >= 0) {
        const scalar_t* r = value_nm + pixel[j] * ss;
        const int64_t dy = stride[j] * ss;  // from a corner to the one below it
        sum.add(r, r + ss, r + dy, r + dy + ss, aw0[j], aw1[j], aw2[j], aw3[j]);
        continue;
      }
      // An unpadded layout's sample with a corner off the map.
      const int64_t k = k0 + j, l = lv.level[j], H = a.layout.H[l], W = a.layout.W[l];
      const Sample<acc_t> s = make_sample(a.loc[2 * k], a.loc[2 * k + 1], H, W);
      if (!s.inside) continue;
      const scalar_t* level = value_nm + a.layout.start[l] * ss;
      const scalar_t* r[4];
      for (int c = 0; c < 4; ++c) r[c] = s.pixel[c] >= 0 ? level + s.pixel[c] * ss : a.zero;
      const acc_t at = a.attn[k];
      sum.add(r[0], r[1], r[2], r[3], at * s.weight[0], at * s.weight[1], at * s.weight[2],
              at * s.weight[3]);
    }
    sum.write(out + (n * d.Q + q) * row + m * D);
  }
}

// The instruction-set variants below (baseline, and AVX2 where the compiler has it) run
// the same always-inlined kernels, with D = 32 (and value rows 32 apart) fixed at compile
// time where that holds.
#define CODETR_MSDA_FORWARD_BLOCK(scalar_t)                                                   \
  if (a.d.D == 32 && a.ss == 32)                                                              \
    return forward_block<scalar_t, 32, true>(a, lv, item, out, scratch);                      \
  if (a.d.D == 32) return forward_block<scalar_t, 32, false>(a, lv, item, out, scratch);     \
  forward_block<scalar_t, 0, false>(a, lv, item, out, scratch);

template <typename scalar_t>
void forward_block_baseline(const Args<scalar_t>& a, const Levels<acc_type<scalar_t>>& lv,
                            int64_t item, scalar_t* out, Scratch<acc_type<scalar_t>>& scratch) {
  CODETR_MSDA_FORWARD_BLOCK(scalar_t)
}

#ifdef CODETR_MSDA_AVX2
template <typename scalar_t>
CODETR_TARGET_AVX2 void forward_block_avx2(const Args<scalar_t>& a,
                                           const Levels<acc_type<scalar_t>>& lv, int64_t item,
                                           scalar_t* out, Scratch<acc_type<scalar_t>>& scratch) {
  CODETR_MSDA_FORWARD_BLOCK(scalar_t)
}
#endif

// The backward's channel loop for one sample with corner rows r0..r3 (grad_value rows
// gv0..gv3): dot[c] = sum over channels of g * r_c (the four sums of sample_grad), and
// gv_c += coef_c * g. Whole vectors of channels, then the last D % kLanes one by one. The
// gv_c may alias (corners outside the map all write into one sink row), so each row's
// update is a plain load-add-store.
template <typename scalar_t, typename acc_t>
CODETR_ALWAYS_INLINE void backward_sample(int64_t D, const scalar_t* g, const scalar_t* r0,
                                          const scalar_t* r1, const scalar_t* r2,
                                          const scalar_t* r3, acc_t* gv0, acc_t* gv1,
                                          acc_t* gv2, acc_t* gv3, acc_t coef0, acc_t coef1,
                                          acc_t coef2, acc_t coef3, acc_t dot[4]) {
  using V = Vec<acc_t>;
  constexpr int64_t kL = kLanes<acc_t>;
  V d0 = {}, d1 = {}, d2 = {}, d3 = {};
  int64_t c = 0;
  for (; c + kL <= D; c += kL) {
    const V gc = load<acc_t>(g + c);
    d0 += gc * load<acc_t>(r0 + c);
    d1 += gc * load<acc_t>(r1 + c);
    d2 += gc * load<acc_t>(r2 + c);
    d3 += gc * load<acc_t>(r3 + c);
    store<acc_t>(gv0 + c, load<acc_t>(gv0 + c) + coef0 * gc);
    store<acc_t>(gv1 + c, load<acc_t>(gv1 + c) + coef1 * gc);
    store<acc_t>(gv2 + c, load<acc_t>(gv2 + c) + coef2 * gc);
    store<acc_t>(gv3 + c, load<acc_t>(gv3 + c) + coef3 * gc);
  }
  sum4(d0, d1, d2, d3, dot);
  for (; c < D; ++c) {
    const acc_t gc = static_cast<acc_t>(g[c]);
    dot[0] += gc * static_cast<acc_t>(r0[c]);
    dot[1] += gc * static_cast<acc_t>(r1[c]);
    dot[2] += gc * static_cast<acc_t>(r2[c]);
    dot[3] += gc * static_cast<acc_t>(r3[c]);
    gv0[c] += coef0 * gc;
    gv1[c] += coef1 * gc;
    gv2[c] += coef2 * gc;
    gv3[c] += coef3 * gc;
  }
}

// Backward of one (batch n, head m) pair. The pair owns the slice value[n, :, m, :], so
// every grad_value element is written by one thread, in query order: the result is
// bitwise identical whatever the number of threads, with no atomics and no private
// copies. Query by query as in the forward (one make_taps per record); per sample, one
// pass over the channels (backward_sample) gives the sums of sample_grad and scatters
// into the four corners' grad_value rows. Corners off the map read zeros and write into
// the border of a padded layout (never read back) or, unpadded, the zero row and the sink
// row, with weight 0. kD and kDense as in forward_block. (Levels outer within
// blocks of queries, the order before make_taps, measured no faster with blocks of 64 and
// ~20% slower with 512, case A.)
template <typename scalar_t, int64_t kD, bool kDense>
CODETR_ALWAYS_INLINE void backward_pair(const Args<scalar_t>& a,
                                        const Levels<acc_type<scalar_t>>& lv, int64_t nm,
                                        const scalar_t* value_nm,
                                        acc_type<scalar_t>* grad_value_nm,
                                        const scalar_t* grad_out, acc_type<scalar_t>* grad_loc,
                                        acc_type<scalar_t>* grad_attn,
                                        Scratch<acc_type<scalar_t>>& scratch) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = a.d;
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t row = d.M * D;  // stride between two queries of grad_out
  const int64_t n = nm / d.M, m = nm % d.M;
  const int64_t ss = kDense ? kD : a.ss;
  const Taps<acc_t>& t = scratch.taps;
  const int32_t* pixel = t.pixel.data();
  const int32_t* live = t.live.data();
  const acc_t* h = lv.h.data();  // H and W of sample j's level
  const acc_t* w = lv.w.data();
  for (int64_t q = 0; q < d.Q; ++q) {
    const scalar_t* g = grad_out + (n * d.Q + q) * row + m * D;
    const int64_t k0 = ((n * d.Q + q) * d.M + m) * d.L * d.P;  // sample (n, q, m, 0, 0)
    prefetch_ahead(a, k0, d.Q - q);
    if (q + kAhead < d.Q) {
      const int64_t ahead = kAhead * d.M * d.L * d.P;
      prefetch_bytes<0>(g + kAhead * row, D * sizeof(scalar_t));
      prefetch_bytes<1>(grad_loc + 2 * (k0 + ahead), 2 * d.L * d.P * sizeof(acc_t));
      prefetch_bytes<1>(grad_attn + k0 + ahead, d.L * d.P * sizeof(acc_t));
    }
    make_taps(lv, a.loc + 2 * k0, a.attn + k0, scratch.taps);
    list_live(scratch.taps);
    // Samples that are not live add nothing and have zero gradients.
    std::fill(grad_attn + k0, grad_attn + k0 + d.L * d.P, acc_t(0));
    std::fill(grad_loc + 2 * k0, grad_loc + 2 * (k0 + d.L * d.P), acc_t(0));
    for (int64_t i = 0; i < t.count; ++i) {
      const int64_t j = live[i], k = k0 + j;
      Sample<acc_t> s;
      acc_t dot[4];
      // The corner rows of the live sample two ahead, value's and grad_value's: at ~170
      // instructions per sample the reorder buffer holds under two samples, so their
      // cache misses would otherwise not overlap (case A backward, one thread, alternating
      // processes: 216 vs 228 ms; three ahead 234, C 42.2 vs 44.1).
      if (i + 2 < t.count && pixel[live[i + 2]] >= 0) {
        const int64_t ahead = pixel[live[i + 2]] * ss, dy = lv.stride[live[i + 2]] * ss;
        prefetch_corners<0>(value_nm + ahead, ss, dy);
        prefetch_corners<1>(grad_value_nm + ahead, ss, dy);
      }
      if (pixel[j] >= 0) {
        const scalar_t* r = value_nm + pixel[j] * ss;
        acc_t* gv = grad_value_nm + pixel[j] * ss;
        const int64_t dy = lv.stride[j] * ss;  // from a corner to the one below it
        backward_sample(D, g, r, r + ss, r + dy, r + dy + ss, gv, gv + ss, gv + dy, gv + dy + ss,
                        t.attn_weight[0][j], t.attn_weight[1][j], t.attn_weight[2][j],
                        t.attn_weight[3][j], dot);
        for (int c = 0; c < 4; ++c) s.weight[c] = t.weight[c][j];
        s.lh = t.lh[j];
        s.lw = t.lw[j];
        s.hh = acc_t(1) - s.lh;
        s.hw = acc_t(1) - s.lw;
      } else {  // an unpadded layout's sample with a corner off the map
        const int64_t l = lv.level[j];
        s = make_sample(a.loc[2 * k], a.loc[2 * k + 1], a.layout.H[l], a.layout.W[l]);
        if (!s.inside) continue;
        const int64_t level = a.layout.start[l] * ss;
        const scalar_t* r[4];
        acc_t* gv[4];
        for (int c = 0; c < 4; ++c) {
          const bool in = s.pixel[c] >= 0;
          r[c] = in ? value_nm + level + s.pixel[c] * ss : a.zero;
          gv[c] = in ? grad_value_nm + level + s.pixel[c] * ss : scratch.row.data();
        }
        const acc_t at = a.attn[k];
        backward_sample(D, g, r[0], r[1], r[2], r[3], gv[0], gv[1], gv[2], gv[3],
                        at * s.weight[0], at * s.weight[1], at * s.weight[2], at * s.weight[3],
                        dot);
      }
      const SampleGrad<acc_t> sg = sample_grad(s, a.attn[k], dot, h[j], w[j]);
      grad_attn[k] = sg.attn;
      grad_loc[2 * k] = sg.x;
      grad_loc[2 * k + 1] = sg.y;
    }
  }
}

#define CODETR_MSDA_BACKWARD_PAIR(scalar_t)                                                   \
  if (a.d.D == 32 && a.ss == 32)                                                              \
    return backward_pair<scalar_t, 32, true>(a, lv, nm, v, gv, grad_out, grad_loc, grad_attn, \
                                             scratch);                                        \
  if (a.d.D == 32)                                                                            \
    return backward_pair<scalar_t, 32, false>(a, lv, nm, v, gv, grad_out, grad_loc,           \
                                              grad_attn, scratch);                            \
  backward_pair<scalar_t, 0, false>(a, lv, nm, v, gv, grad_out, grad_loc, grad_attn, scratch);

template <typename scalar_t>
void backward_pair_baseline(const Args<scalar_t>& a, const Levels<acc_type<scalar_t>>& lv,
                            int64_t nm, const scalar_t* v, acc_type<scalar_t>* gv,
                            const scalar_t* grad_out, acc_type<scalar_t>* grad_loc,
                            acc_type<scalar_t>* grad_attn, Scratch<acc_type<scalar_t>>& scratch) {
  CODETR_MSDA_BACKWARD_PAIR(scalar_t)
}

#ifdef CODETR_MSDA_AVX2
template <typename scalar_t>
CODETR_TARGET_AVX2 void backward_pair_avx2(const Args<scalar_t>& a,
                                           const Levels<acc_type<scalar_t>>& lv, int64_t nm,
                                           const scalar_t* v, acc_type<scalar_t>* gv,
                                           const scalar_t* grad_out, acc_type<scalar_t>* grad_loc,
                                           acc_type<scalar_t>* grad_attn,
                                           Scratch<acc_type<scalar_t>>& scratch) {
  CODETR_MSDA_BACKWARD_PAIR(scalar_t)
}
#endif

// Head (n, m)'s maps between value's layout [N, S, M, D] and the head's padded slice
// [positions, D], stored row by stored row (layout.rows): plain -> head with the border
// zeroed (kToPadded), or the map positions of head -> plain; cast to dst_t.
template <bool kToPadded, typename src_t, typename dst_t>
void copy_head(const src_t* __restrict src, dst_t* __restrict dst, const Dims& d,
               const Layout& layout, int64_t n, int64_t m) {
  const int64_t D = d.D, MD = d.M * d.D;
  for (const auto& [l, y] : layout.rows) {
    const int64_t W = layout.W[l], stride = layout.stride[l];
    const int64_t stored = (layout.start[l] + y * stride) * D;
    if (y == 0 || y > layout.H[l]) {
      if (kToPadded) std::fill(dst + stored, dst + stored + stride * D, dst_t(0));
      continue;
    }
    const int64_t map = (n * d.S + layout.map_start[l] + (y - 1) * W) * MD + m * D;
    if (kToPadded) {
      std::fill(dst + stored, dst + stored + D, dst_t(0));
      std::fill(dst + stored + (W + 1) * D, dst + stored + (W + 2) * D, dst_t(0));
    }
    for (int64_t x = 0; x < W; ++x) {
      const int64_t padded = stored + (x + 1) * D, plain = map + x * MD;
      const src_t* from = src + (kToPadded ? plain : padded);
      dst_t* to = dst + (kToPadded ? padded : plain);
      for (int64_t c = 0; c < D; ++c) to[c] = static_cast<dst_t>(from[c]);
    }
  }
}

// A call's work for parallel_items: bilinear samples times channels, plus the staged copy
// of each head's maps in the padded layout.
inline double work_units(const Dims& d, const Layout& layout) {
  const double per_pair = static_cast<double>(d.Q) * d.L * d.P * d.D +
                          (layout.padded ? static_cast<double>(layout.positions) * d.D : 0.0);
  return per_pair * d.N * d.M;
}

// The work below which a second thread does not pay. CODETR_MSDA_GRAIN (forward,backward)
// overrides them, for benchmarks/bench_small_calls.py --grain-sweep, which measured them.
inline double grain_env(int which, double fallback) {
  static const std::pair<double, double> grains = [] {
    std::pair<double, double> g{-1, -1};
    if (const char* env = std::getenv("CODETR_MSDA_GRAIN")) std::sscanf(env, "%lf,%lf", &g.first, &g.second);
    return g;
  }();
  const double g = which == 0 ? grains.first : grains.second;
  return g >= 0 ? g : fallback;
}
inline double grain_forward() { return grain_env(0, kGrainForward); }
inline double grain_backward() { return grain_env(1, kGrainBackward); }

// Staging memory that each thread keeps between calls, grown as needed: slot 0 for a
// head's maps, slot 1 for the backward's grad_value accumulator, one head's padded size
// each (3.2 MB in case A, 12.3 MB in D). Allocated per call, the buffers came from reused
// heap or from fresh pages depending on what the process had allocated and freed before
// (glibc's mmap threshold moves): timed side by side with the grid_sample reference, case
// C's forward went from 6 to 11.5 ms after a few reference calls, and stayed there.
// (The forward's calling thread is also thread 0 of the backward's, which stages after the
// forward is done.)
thread_local at::Tensor staging_buffers[2];

template <typename T>
T* staging(int slot, int64_t n) {
  at::Tensor& buffer = staging_buffers[slot];
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::Tensor();  // the old buffer goes first
    buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  return reinterpret_cast<T*>(buffer.data_ptr<uint8_t>());
}

// The padded layout is staged one head at a time, just before the kernels sample it: a
// thread copies the maps of the (n, m) pair it takes into its own [positions, D] buffer,
// and in the backward its grad_value accumulator (another) into grad_value when the pair
// is done (buffers: staging). The copies then sit in L2 or L3 when they are read, and the
// buffers are one head's, not value-sized. (A head-major copy of all of value first, the
// way before, left most of it in DRAM by the time it was read, and took two value-sized
// buffers: case A, one thread, alternating processes, forward min 72.1 -> 51.9 ms,
// backward 192.4 -> 170.2.) The forward's items are a pair's blocks of queries in a few
// runs, so that each run stages once and the threads need no barrier: with one shared
// buffer per head, all threads copying and then all sampling, a thread held up by the VM
// stalled both at each of the 32 barriers of case A (its forward in the benchmark: 31-60
// ms from run to run, against 33-36 now; case C 6-12 against 5.3-5.4).
template <typename scalar_t>
void forward_kernel(const Args<scalar_t>& a, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = a.d;
  const Layout& layout = a.layout;
  const Levels<acc_t> lv(d, layout);
  const int64_t blocks = (d.Q + kBlock - 1) / kBlock;
  // Work items: a pair's blocks in `chunks` runs, enough items for about four per thread.
  const int64_t pairs = d.N * d.M;
  const int64_t chunks =
      std::min(blocks, std::max<int64_t>(1, (4 * at::get_num_threads() + pairs - 1) / pairs));
  parallel_items(
      pairs * chunks, work_units(d, layout), grain_forward(), [&] { return Scratch<acc_t>(d); },
      [&](int64_t item, Scratch<acc_t>& scratch) {
        const int64_t nm = item / chunks, chunk = item % chunks;
        Args<scalar_t> h = a;
        if (layout.padded) {  // the kernels read the staged head
          scalar_t* head = staging<scalar_t>(0, layout.positions * d.D);
          if (scratch.staged != nm) copy_head<true>(a.value, head, d, layout, nm / d.M, nm % d.M);
          scratch.staged = nm;
          h.value = head;
          h.sn = h.sm = 0;
          h.ss = d.D;
        }
        for (int64_t b = chunk * blocks / chunks; b < (chunk + 1) * blocks / chunks; ++b) {
#ifdef CODETR_MSDA_AVX2
          if (cpu_has_avx2()) {
            forward_block_avx2(h, lv, nm * blocks + b, out, scratch);
            continue;
          }
#endif
          forward_block_baseline(h, lv, nm * blocks + b, out, scratch);
        }
      });
}

// Padded layout: grad_value, the output, is written from the staged accumulators
// (grad_value_acc is null). Unpadded: grad_value_acc, [N, S, M, D] zeros, accumulates
// (grad_value is null).
template <typename scalar_t>
void backward_kernel(const Args<scalar_t>& a, const scalar_t* grad_out,
                     acc_type<scalar_t>* grad_value_acc, scalar_t* grad_value,
                     acc_type<scalar_t>* grad_loc, acc_type<scalar_t>* grad_attn) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = a.d;
  const Layout& layout = a.layout;
  const Levels<acc_t> lv(d, layout);
  Args<scalar_t> h = a;  // the kernels read the staged head
  if (layout.padded) h.ss = d.D;
  const int64_t size = layout.padded ? layout.positions * d.D : 0;
  parallel_items(
      d.N * d.M, work_units(d, layout), grain_backward(), [&] { return Scratch<acc_t>(d); },
      [&](int64_t nm, Scratch<acc_t>& scratch) {
        const int64_t n = nm / d.M, m = nm % d.M;
        const scalar_t* v;
        acc_t* gv;
        if (layout.padded) {
          scalar_t* head = staging<scalar_t>(0, size);
          copy_head<true>(a.value, head, d, layout, n, m);
          v = head;
          gv = staging<acc_t>(1, size);
          std::fill(gv, gv + size, acc_t(0));
        } else {
          v = a.value + n * a.sn + m * a.sm;
          gv = grad_value_acc + n * a.sn + m * a.sm;
        }
#ifdef CODETR_MSDA_AVX2
        if (cpu_has_avx2())
          backward_pair_avx2(h, lv, nm, v, gv, grad_out, grad_loc, grad_attn, scratch);
        else
#endif
          backward_pair_baseline(h, lv, nm, v, gv, grad_out, grad_loc, grad_attn, scratch);
        if (layout.padded) copy_head<false>(gv, grad_value, d, layout, n, m);
      });
}


template <typename scalar_t>
Args<scalar_t> make_args(const Dims& d, const Layout& layout, const at::Tensor& v,
                         const at::Tensor& loc, const at::Tensor& attn, const scalar_t* zero) {
  using acc_t = acc_type<scalar_t>;
  return Args<scalar_t>{d, layout, v.data_ptr<scalar_t>(), v.stride(0), v.stride(1), v.stride(2),
                        loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), zero};
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
  const Layout layout(d, shapes.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_cpu", [&] {
    const auto acc_dtype = c10::CppTypeToScalarType<acc_type<scalar_t>>::value;
    const auto v = value.contiguous();
    const auto loc = sampling_locations.to(acc_dtype).contiguous();
    const auto attn = attention_weights.to(acc_dtype).contiguous();
    const std::vector<scalar_t> zero(d.D, scalar_t(0));
    forward_kernel<scalar_t>(make_args(d, layout, v, loc, attn, zero.data()),
                             out.data_ptr<scalar_t>());
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
  const Layout layout(d, shapes.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto v = value.contiguous();
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto loc = sampling_locations.to(acc_dtype).contiguous();
    const auto attn = attention_weights.to(acc_dtype).contiguous();
    // Gradients accumulate in acc_t (fp32 for half/bf16 value) and are cast at the end.
    at::Tensor grad_value_acc;
    if (layout.padded) {
      grad_value = at::empty_like(value, contiguous);
      advise_huge_pages(grad_value);
    } else {
      grad_value_acc = at::zeros(v.sizes(), value.options().dtype(acc_dtype));
    }
    auto grad_loc_acc = grad_loc.to(acc_dtype);
    auto grad_attn_acc = grad_attn.to(acc_dtype);
    const std::vector<scalar_t> zero(d.D, scalar_t(0));
    backward_kernel<scalar_t>(
        make_args(d, layout, v, loc, attn, zero.data()), g.data_ptr<scalar_t>(),
        layout.padded ? nullptr : grad_value_acc.data_ptr<acc_t>(),
        layout.padded ? grad_value.data_ptr<scalar_t>() : nullptr,
        grad_loc_acc.data_ptr<acc_t>(), grad_attn_acc.data_ptr<acc_t>());
    if (!layout.padded) grad_value = grad_value_acc.to(value.scalar_type());  // fp32: no copy
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
