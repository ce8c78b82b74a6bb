// CPU kernels of the 3-D involution operator (forward and both gradients); 1-D runs through them
// on (B, C, 1, 1, L) views, which contiguous inputs take to kernels of their own (the
// "Sequences" section below: rows read in place, no channels-last copies).
//
// Shapes: input x (B, C, D, H, W), weight w (B, G, Kd, Kh, Kw, D_out, H_out, W_out), output y
// (B, C, D_out, H_out, W_out); channel c belongs to group c / (C / G).
//
// Design (that of the 2-D kernels in involution_cpu.cpp, one dimension more):
// - No unfolded input: each task reads input rows in place and accumulates one row of its own
//   result, so tasks never write the same memory (deterministic, no atomics).
// - Feature maps are read channels_last_3d (B, D, H, W, C): the innermost loop runs over the
//   C/G channels of a group with unit stride, a compile-time 16 for RedNet-style groups.
// - The forward reads a copy of the input padded with zero columns, so its hot loop has no
//   column bounds checks, and with 16 channels per group keeps blocks of up to 8 output pixels
//   in registers over all the taps. The gradients use the valid output columns of each kernel
//   column, computed once per call. Rows (d, h) outside the volume are skipped whole.
// - Results are written in the input's layout (NCDHW or channels_last_3d); float16/bfloat16 are
//   computed in float32.
// - Sequences ((B, C, 1, 1, L) in the contiguous layout) are (B, C, L) rows: see below.
// - Registered as torch.ops.involution_nd_cpu.{forward3d, backward3d} (TORCH_LIBRARY), beside
//   the 2-D kernels' pybind11 functions in the same extension.

#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace involution_nd_cpu {

using involution_common::accumulate;
using involution_common::ColumnRange;

struct Geometry3d {
  int64_t batch, channels, groups, group_channels;
  std::array<int64_t, 3> size, kernel, out, stride, pad, dil;
  std::vector<ColumnRange> columns;  // per kernel column kw
  // Width of the forward's channels_last_3d input padded with zero columns: input column iw
  // sits at padded column iw + pad[2], and every column an output column reads is inside.
  int64_t padded_width;
  // The output columns in the fewest blocks of at most 8, of near-equal sizes: the forward's
  // register blocks (a block's pixels are independent chains of multiply-adds).
  std::vector<int64_t> blocks8;
  bool channels_last_result;

  int64_t taps() const { return kernel[0] * kernel[1] * kernel[2]; }
  // Offset of w[b, g, kd, kh, kw, od, oh, 0] (contiguous kernels).
  int64_t weight_row(int64_t b, int64_t g, int64_t tap, int64_t od, int64_t oh) const {
    return (((b * groups + g) * taps() + tap) * out[0] + od) * out[1] * out[2] + oh * out[2];
  }
  // Offset of the first channel of group g at (b, d, h, 0) in a channels_last_3d map of `dims`.
  int64_t pixel_row(int64_t b, int64_t g, int64_t d, int64_t h,
                    const std::array<int64_t, 3>& dims) const {
    return (((b * dims[0] + d) * dims[1] + h) * dims[2]) * channels + g * group_channels;
  }
  // The same in the forward's padded input (its padded column 0).
  int64_t padded_row(int64_t b, int64_t g, int64_t d, int64_t h) const {
    return pixel_row(b, g, d, h, {size[0], size[1], padded_width});
  }
  // Input index read by output index o through kernel index k along dimension `dim`, or -1
  // when it is padding.
  int64_t input_index(int dim, int64_t o, int64_t k) const {
    const int64_t i = o * stride[dim] - pad[dim] + k * dil[dim];
    return i < 0 || i >= size[dim] ? -1 : i;
  }
  // Output index that reads input index i through kernel index k along `dim`, or -1.
  int64_t output_index(int dim, int64_t i, int64_t k) const {
    const int64_t shifted = i + pad[dim] - k * dil[dim];
    if (shifted < 0 || shifted % stride[dim] != 0 || shifted / stride[dim] >= out[dim]) {
      return -1;
    }
    return shifted / stride[dim];
  }
  // Work (multiply-adds) of one output row, to size the parallel chunks.
  int64_t row_work() const { return taps() * out[2] * group_channels; }
};

// Writes the (columns, C/G) row of group g to row (d, h) of the (B, C, *dims) result `out`.
template <typename T>
INVOLUTION_INLINE void store_row(const Geometry3d& geo, const T* __restrict row,
                                 T* __restrict out, int64_t b, int64_t g, int64_t d, int64_t h,
                                 const std::array<int64_t, 3>& dims, int64_t cg) {
  const int64_t columns = dims[2];
  if (geo.channels_last_result) {
    T* __restrict dst = out + geo.pixel_row(b, g, d, h, dims);
    for (int64_t j = 0; j < columns; ++j) {
      std::copy_n(row + j * cg, cg, dst + j * geo.channels);
    }
    return;
  }
  // Blocks of 64 columns, so that the strided reads of the row stay in L1 (long 1-D rows).
  for (int64_t j0 = 0; j0 < columns; j0 += 64) {
    const int64_t j1 = std::min(columns, j0 + 64);
    for (int64_t c = 0; c < cg; ++c) {
      T* __restrict dst =
          out + (((b * geo.channels + g * cg + c) * dims[0] + d) * dims[1] + h) * columns;
      for (int64_t j = j0; j < j1; ++j) {
        dst[j] = row[j * cg + c];
      }
    }
  }
}

// Calls body(p, q, tap0) for the kernel rows (kd, kh) whose indices p = index(0, d, kd) and
// q = index(1, h, kh) exist (index returns -1 where none does); tap0 is the row's first tap.
template <typename Index, typename Body>
INVOLUTION_INLINE void for_kernel_rows(const Geometry3d& geo, int64_t d, int64_t h,
                                       const Index& index, const Body& body) {
  for (int64_t kd = 0; kd < geo.kernel[0]; ++kd) {
    const int64_t p = index(0, d, kd);
    if (p < 0) {
      continue;
    }
    for (int64_t kh = 0; kh < geo.kernel[1]; ++kh) {
      const int64_t q = index(1, h, kh);
      if (q >= 0) {
        body(p, q, (kd * geo.kernel[1] + kh) * geo.kernel[2]);
      }
    }
  }
}

// The input rows read by an output row (input_index), and the output rows that read an input
// row (output_index), for for_kernel_rows.
INVOLUTION_INLINE auto input_rows(const Geometry3d& geo) {
  return [&geo](int dim, int64_t o, int64_t k)
             INVOLUTION_LAMBDA_INLINE { return geo.input_index(dim, o, k); };
}
INVOLUTION_INLINE auto output_rows(const Geometry3d& geo) {
  return [&geo](int dim, int64_t i, int64_t k)
             INVOLUTION_LAMBDA_INLINE { return geo.output_index(dim, i, k); };
}

// (b, g, d, h) of row item t over rows of `dims`, a group's rows consecutive.
INVOLUTION_INLINE std::array<int64_t, 4> row_item(const Geometry3d& geo, int64_t t,
                                                  const std::array<int64_t, 3>& dims) {
  const int64_t h = t % dims[1];
  const int64_t d = (t / dims[1]) % dims[0];
  const int64_t bg = t / (dims[1] * dims[0]);
  return {bg / geo.groups, bg % geo.groups, d, h};
}

#ifdef INVOLUTION_VECTOR_TYPES
using involution_common::load16;
using involution_common::V16;

// Output columns [j0, j0 + NJ) of one output row of a 16-channel group, accumulated in
// registers over all the taps. `x` points at the padded input's (b, 0, 0, 0, g-slice), `w` at
// w[b, g, 0, od, oh, 0]; `row` is the (W_out, 16) result row.
template <typename T, int NJ>
INVOLUTION_INLINE void forward_block16(const Geometry3d& geo, const T* __restrict x,
                                       const T* __restrict w, int64_t od, int64_t oh,
                                       int64_t j0, T* __restrict row) {
  V16<T> acc[NJ] = {};
  const int64_t pixel = geo.channels;
  const int64_t step = geo.stride[2] * pixel;
  const int64_t tap_stride = geo.out[0] * geo.out[1] * geo.out[2];
  for_kernel_rows(geo, od, oh, input_rows(geo),
                  [&](int64_t id, int64_t ih, int64_t tap0) INVOLUTION_LAMBDA_INLINE {
                    const T* __restrict in_row =
                        x + (id * geo.size[1] + ih) * geo.padded_width * pixel + j0 * step;
                    const T* __restrict w_tap = w + tap0 * tap_stride + j0;
                    for (int64_t kw = 0; kw < geo.kernel[2]; ++kw) {
                      const T* __restrict in = in_row + kw * geo.dil[2] * pixel;
                      for (int n = 0; n < NJ; ++n) {
                        acc[n] += w_tap[n] * load16(in + n * step);
                      }
                      w_tap += tap_stride;
                    }
                  });
  std::memcpy(row + j0 * 16, acc, sizeof(acc));
}
#endif

// y[b, od, oh, :, g-slice] = sum over taps of w * x, for the output rows [begin, end).
// `x` is the padded input (Geometry3d::padded_width).
template <typename T, int64_t CG>
INVOLUTION_INLINE void forward_rows_impl(const Geometry3d& geo, const T* __restrict x,
                                         const T* __restrict w, T* __restrict y,
                                         int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  std::vector<T> acc_row(geo.out[2] * cg);
  for (int64_t t = begin; t < end; ++t) {
    const auto [b, g, od, oh] = row_item(geo, t, geo.out);
    T* __restrict acc_base = acc_row.data();
#ifdef INVOLUTION_VECTOR_TYPES
    if constexpr (CG == 16) {
      const T* x_group = x + geo.padded_row(b, g, 0, 0);
      const T* w_rows = w + geo.weight_row(b, g, 0, od, oh);
      involution_common::for_column_blocks<8>(
          geo.blocks8, [&](auto nj, int64_t j0) INVOLUTION_LAMBDA_INLINE {
            forward_block16<T, decltype(nj)::value>(geo, x_group, w_rows, od, oh, j0, acc_base);
          });
      store_row(geo, acc_base, y, b, g, od, oh, geo.out, cg);
      continue;
    }
#endif
    std::fill(acc_row.begin(), acc_row.end(), T(0));
    for_kernel_rows(geo, od, oh, input_rows(geo),
                    [&](int64_t id, int64_t ih, int64_t tap0) INVOLUTION_LAMBDA_INLINE {
                      const T* __restrict in_row = x + geo.padded_row(b, g, id, ih);
                      for (int64_t kw = 0; kw < geo.kernel[2]; ++kw) {
                        const T* __restrict w_row = w + geo.weight_row(b, g, tap0 + kw, od, oh);
                        for (int64_t j = 0; j < geo.out[2]; ++j) {
                          const T* in = in_row + (j * geo.stride[2] + kw * geo.dil[2]) * pixel;
                          accumulate(acc_base + j * cg, w_row[j], in, cg);
                        }
                      }
                    });
    store_row(geo, acc_base, y, b, g, od, oh, geo.out, cg);
  }
}

// grad_x[b, id, ih, :, g-slice] = sum over the (tap, output) pairs that read it of
// w * grad_y, for the input rows [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void backward_input_rows_impl(const Geometry3d& geo,
                                                const T* __restrict grad_y,
                                                const T* __restrict w, T* __restrict grad_x,
                                                int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  std::vector<T> acc_row(geo.size[2] * cg);
  for (int64_t t = begin; t < end; ++t) {
    const auto [b, g, id, ih] = row_item(geo, t, geo.size);
    std::fill(acc_row.begin(), acc_row.end(), T(0));
    T* __restrict acc_base = acc_row.data();
    for_kernel_rows(geo, id, ih, output_rows(geo),
                    [&](int64_t od, int64_t oh, int64_t tap0) INVOLUTION_LAMBDA_INLINE {
                      const T* __restrict gy_row = grad_y + geo.pixel_row(b, g, od, oh, geo.out);
                      for (int64_t kw = 0; kw < geo.kernel[2]; ++kw) {
                        const T* __restrict w_row = w + geo.weight_row(b, g, tap0 + kw, od, oh);
                        const ColumnRange cols = geo.columns[kw];
                        const int64_t offset = kw * geo.dil[2] - geo.pad[2];
                        for (int64_t j = cols.lo; j < cols.hi; ++j) {
                          accumulate(acc_base + (j * geo.stride[2] + offset) * cg, w_row[j],
                                     gy_row + j * pixel, cg);
                        }
                      }
                    });
    store_row(geo, acc_base, grad_x, b, g, id, ih, geo.size, cg);
  }
}

// grad_w[b, g, tap, od, oh, j] = sum over the group's channels of grad_y * x (zero where the
// tap reads padding), for the output rows [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void backward_weight_rows_impl(const Geometry3d& geo,
                                                 const T* __restrict grad_y,
                                                 const T* __restrict x, T* __restrict grad_w,
                                                 int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  const int64_t out_w = geo.out[2];
  for (int64_t t = begin; t < end; ++t) {
    const auto [b, g, od, oh] = row_item(geo, t, geo.out);
    const T* __restrict gy_row = grad_y + geo.pixel_row(b, g, od, oh, geo.out);
    for (int64_t kd = 0; kd < geo.kernel[0]; ++kd) {
      const int64_t id = geo.input_index(0, od, kd);
      for (int64_t kh = 0; kh < geo.kernel[1]; ++kh) {
        const int64_t ih = geo.input_index(1, oh, kh);
        const bool inside = id >= 0 && ih >= 0;
        const int64_t tap0 = (kd * geo.kernel[1] + kh) * geo.kernel[2];
        const T* __restrict in_row = inside ? x + geo.pixel_row(b, g, id, ih, geo.size) : nullptr;
        for (int64_t kw = 0; kw < geo.kernel[2]; ++kw) {
          T* __restrict gw_row = grad_w + geo.weight_row(b, g, tap0 + kw, od, oh);
          const ColumnRange cols = inside ? geo.columns[kw] : ColumnRange{0, 0};
          std::fill(gw_row, gw_row + cols.lo, T(0));
          std::fill(gw_row + cols.hi, gw_row + out_w, T(0));
          const int64_t offset = kw * geo.dil[2] - geo.pad[2];
          for (int64_t j = cols.lo; j < cols.hi; ++j) {
            gw_row[j] = involution_common::dot(gy_row + j * pixel,
                                               in_row + (j * geo.stride[2] + offset) * pixel, cg);
          }
        }
      }
    }
  }
}

// Non-template entry points, one per compute type, compiled once per instruction set; groups
// of 16 channels get kernels where that width is a compile-time constant.
INVOLUTION_DEFINE_KERNELS(Geometry3d, forward_rows, backward_input_rows, backward_weight_rows)

// ---- Sequences: (B, C, 1, 1, L) maps in the contiguous layout --------------------------------
// The 1-D op's views (and any volume of depth and height 1 with a 1x1xK kernel) are read in
// place as (B, C, L) rows, without the channels-last copies. Each task takes a tile of
// kSequenceTile positions of one group. At stride 1 the positions where every tap is inside
// the sequence are computed in registers, 16 positions to a vector, the group's channels in
// the inner loop: the kernels of the taps (w[k, p:p+16], shifted by the tap's offset in the
// backward) are loaded once for all the channels, and the backward computes both gradients in
// one pass that reads grad_y, x and w once (grad_weight's sums over the channels stay in
// registers too); the rows are prefetched ahead. The rest (the ends, other strides) runs one
// tap at a time over the tile's positions, accumulating in the result row (in L1).

constexpr int64_t kSequenceTile = 1024;

struct Geometry1d {
  int64_t batch, channels, groups, group_channels;
  int64_t length, kernel, out, stride, pad, dil;
  std::vector<ColumnRange> columns;  // per tap k: the outputs whose input is inside
  // At stride 1, the outputs whose every tap is inside (inner_out), and those positions p whose
  // every tap is inside both as an output (input p + offset(k)) and as an input (read by
  // output p - offset(k)): inner; empty at other strides.
  ColumnRange inner_out, inner;

  int64_t tiles(int64_t positions) const {
    return (positions + kSequenceTile - 1) / kSequenceTile;
  }
  // The backward's tiles: tile t holds the outputs [t * T, (t + 1) * T) and the inputs
  // [t * T * stride, (t + 1) * T * stride), the last one every input left (T = kSequenceTile).
  int64_t backward_tiles() const { return std::max(tiles(out), tiles(ceil_div(length, stride))); }
  ColumnRange tile_outputs(int64_t t) const {
    return {std::min(out, t * kSequenceTile), std::min(out, (t + 1) * kSequenceTile)};
  }
  ColumnRange tile_inputs(int64_t t) const {
    const int64_t end = t + 1 == backward_tiles() ? length : (t + 1) * kSequenceTile * stride;
    return {std::min(length, t * kSequenceTile * stride), std::min(length, end)};
  }
  // Offset of the first channel row of group g: x[b, g * C/G, :] (rows of `positions`).
  int64_t group_row(int64_t b, int64_t g, int64_t positions) const {
    return (b * channels + g * group_channels) * positions;
  }
  // Offset of w[b, g, 0, :].
  int64_t weight_rows(int64_t b, int64_t g) const { return (b * groups + g) * kernel * out; }
  // Input position read by output o through tap k: o * stride + offset(k).
  int64_t offset(int64_t k) const { return k * dil - pad; }
  int64_t tile_work() const { return group_channels * kernel * kSequenceTile; }

 private:
  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
};

Geometry1d make_sequence_geometry(const Geometry3d& geo) {
  Geometry1d seq{geo.batch,   geo.channels,  geo.groups, geo.group_channels,
                 geo.size[2], geo.kernel[2], geo.out[2], geo.stride[2],
                 geo.pad[2],  geo.dil[2],    geo.columns, {0, 0}, {0, 0}};
  if (seq.stride == 1) {
    // Output o reads o + offset(k); input i is read by output i - offset(k).
    const int64_t first = seq.offset(0), last = seq.offset(seq.kernel - 1);
    seq.inner_out = {std::max<int64_t>(0, -first), std::min(seq.out, seq.length - last)};
    const ColumnRange inner_in{std::max<int64_t>(0, last), std::min(seq.length, seq.out + first)};
    seq.inner = {std::max(seq.inner_out.lo, inner_in.lo), std::min(seq.inner_out.hi, inner_in.hi)};
    for (ColumnRange* r : {&seq.inner_out, &seq.inner}) {
      r->hi = std::max(r->lo, r->hi);
    }
  }
  return seq;
}

// (b, g, tile) of task t over `tiles` tiles per group.
INVOLUTION_INLINE std::array<int64_t, 3> tile_item(const Geometry1d& geo, int64_t t,
                                                   int64_t tiles) {
  const int64_t bg = t / tiles;
  return {bg / geo.groups, bg % geo.groups, t % tiles};
}

// The part of [lo, hi) inside `inner` whose length is a multiple of 16 (the register-blocked
// positions); the rest of [lo, hi) takes the one-tap-at-a-time loops.
INVOLUTION_INLINE ColumnRange vector_range(const ColumnRange& inner, int64_t lo, int64_t hi) {
#ifdef INVOLUTION_VECTOR_TYPES
  const int64_t a = std::max(inner.lo, lo), b = std::min(inner.hi, hi);
  return b <= a ? ColumnRange{lo, lo} : ColumnRange{a, a + (b - a) / 16 * 16};
#else
  return {lo, lo};
#endif
}

// The parts of `range` before and after `vec` (all of it when `vec` is empty).
INVOLUTION_INLINE std::array<ColumnRange, 2> outside(const ColumnRange& vec,
                                                     const ColumnRange& range) {
  if (vec.lo == vec.hi) {
    return {range, ColumnRange{range.hi, range.hi}};
  }
  return {ColumnRange{range.lo, vec.lo}, ColumnRange{vec.hi, range.hi}};
}

// The outputs of tap k inside [lo, hi) (and valid).
INVOLUTION_INLINE ColumnRange clip(const ColumnRange& cols, int64_t lo, int64_t hi) {
  const int64_t a = std::max(cols.lo, lo), b = std::min(cols.hi, hi);
  return {a, std::max(a, b)};
}

// acc[j * acc_step] += a[j] * b[j * b_step] for j < n; unit steps (stride 1) vectorise.
template <typename T>
INVOLUTION_INLINE void multiply_add(T* __restrict acc, int64_t acc_step, const T* __restrict a,
                                    const T* __restrict b, int64_t b_step, int64_t n) {
  if (acc_step == 1 && b_step == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      acc[j] += a[j] * b[j];
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    acc[j * acc_step] += a[j] * b[j * b_step];
  }
}

// The operands of the backward: whole tensors, or one group's rows (SequenceData::group);
// nullptr for the gradient not asked for and the operand only it reads.
template <typename T>
struct SequenceData {
  const T* grad_y;  // (B, C, L_out)
  const T* x;       // (B, C, L)
  const T* w;       // (B, G, K, L_out)
  T* grad_x;
  T* grad_w;

  // The rows of group g of batch item b: channel c's row at c * L_out (grad_y) or c * L (x,
  // grad_x), tap k's at k * L_out (w, grad_w).
  SequenceData group(const Geometry1d& geo, int64_t b, int64_t g) const {
    const auto at = [](auto* p, int64_t offset) { return p == nullptr ? p : p + offset; };
    const int64_t x_row = geo.group_row(b, g, geo.length), w_row = geo.weight_rows(b, g);
    return {grad_y + geo.group_row(b, g, geo.out), at(x, x_row), at(w, w_row),
            at(grad_x, x_row), at(grad_w, w_row)};
  }
};

#ifdef INVOLUTION_VECTOR_TYPES
#ifdef INVOLUTION_VECTOR_KERNELS
// Calls f(n) for n = 0, ..., N - 1, each a std::integral_constant (compile-time lane shifts).
template <typename F, int... N>
INVOLUTION_INLINE void unroll(const F& f, std::integer_sequence<int, N...>) {
  (f(std::integral_constant<int, N>{}), ...);
}

// Lanes [FIRST, FIRST + 16) of a window of 16 + LAST lanes whose first 16 are `lo` and last 16
// are `hi` (hi starts at lane LAST of the window).
template <int FIRST, int LAST, typename V, int... LANE>
INVOLUTION_INLINE V window_lanes(V lo, V hi, std::integer_sequence<int, LANE...>) {
  return __builtin_shufflevector(lo, hi,
                                 (FIRST + LANE < 16 ? FIRST + LANE : 16 + FIRST + LANE - LAST)...);
}
#endif

// v[m] = row[m * step : m * step + 16] for m < NK. At unit step (UNIT) from the window's first
// and last vectors and lane shifts: a 16-lane load that does not start a 64-byte line straddles
// two lines and costs two loads, and the taps' loads were the kernels' bottleneck.
template <typename T, int NK, bool UNIT>
INVOLUTION_INLINE void tap_vectors(const T* __restrict row, int64_t step, V16<T> (&v)[NK]) {
#ifdef INVOLUTION_VECTOR_KERNELS
  if constexpr (UNIT) {
    const V16<T> lo = load16(row), hi = load16(row + NK - 1);
    unroll(
        [&](auto m) INVOLUTION_LAMBDA_INLINE {
          v[m] = window_lanes<decltype(m)::value, NK - 1>(lo, hi,
                                                         std::make_integer_sequence<int, 16>{});
        },
        std::make_integer_sequence<int, NK>{});
    return;
  }
#endif
  for (int m = 0; m < NK; ++m) {
    v[m] = load16(row + m * step);
  }
}

// How far ahead (positions) the vector blocks request the rows they stream: a group's 16
// channels of two or three tensors and the taps' kernels are more concurrent streams than the
// hardware prefetchers follow.
constexpr int64_t kPrefetchAhead = 128;

// Requests the cache line kPrefetchAhead positions past `p` for reading (WRITE false) or
// writing; the address may lie past the row's end (a prefetch never faults), so it is formed
// as an integer.
template <bool WRITE = false, typename T>
INVOLUTION_INLINE void prefetch(const T* p) {
  const auto ahead = reinterpret_cast<std::uintptr_t>(p) + kPrefetchAhead * sizeof(T);
  __builtin_prefetch(reinterpret_cast<const void*>(ahead), WRITE ? 1 : 0, 3);
}

// y[c, o:o+16] (+)= sum over the taps [k0, k0 + NK) of w[k, o:o+16] * x[c, o + offset(k):...]
// for the group's cg channels (rows of `x`, `y`; `w` at w[b, g, 0, 0]), the kernels in
// registers for all the channels; the first taps' block stores, the others add.
template <typename T, int NK, bool UNIT>
INVOLUTION_INLINE void forward_block(const Geometry1d& geo, const T* __restrict x,
                                     const T* __restrict w, T* __restrict y, int64_t k0,
                                     int64_t o, int64_t cg) {
  V16<T> kernels[NK];
  for (int n = 0; n < NK; ++n) {
    kernels[n] = load16(w + (k0 + n) * geo.out + o);
    prefetch(w + (k0 + n) * geo.out + o);
  }
  const T* __restrict x_taps = x + o + geo.offset(k0);
  for (int64_t c = 0; c < cg; ++c) {
    T* __restrict y_c = y + c * geo.out + o;
    prefetch(x_taps + c * geo.length);
    prefetch<true>(y_c);
    V16<T> taps[NK];
    tap_vectors<T, NK, UNIT>(x_taps + c * geo.length, geo.dil, taps);
    V16<T> acc = k0 == 0 ? V16<T>{} : load16(y_c);
    for (int n = 0; n < NK; ++n) {
      acc += kernels[n] * taps[n];
    }
    std::memcpy(y_c, &acc, sizeof(acc));
  }
}

// Both gradients (INPUT: grad_x, WEIGHT: grad_w) at the 16 positions [p, p + 16) for the taps
// [k0, k0 + NK), over the group's cg channels (`rows`: SequenceData::group):
//   grad_w[k, p:p+16] = sum_c grad_y[c, p:p+16] * x[c, p + offset(k):...]
//   grad_x[c, p:p+16] (+)= sum_k w[k, p - offset(k):...] * grad_y[c, p - offset(k):...]
// with the kernels and grad_w's sums in registers for all the channels (stride 1, p's taps
// inside as an output and as an input); grad_x: the first taps' block stores, the others add.
template <typename T, int NK, bool INPUT, bool WEIGHT, bool UNIT>
INVOLUTION_INLINE void backward_block(const Geometry1d& geo, const SequenceData<T>& rows,
                                      int64_t k0, int64_t p, int64_t cg) {
  V16<T> kernels[NK];
  V16<T> sums[NK] = {};
  if constexpr (INPUT) {
    for (int n = 0; n < NK; ++n) {
      kernels[n] = load16(rows.w + (k0 + n) * geo.out + p - geo.offset(k0 + n));
      prefetch(rows.w + (k0 + n) * geo.out + p);
    }
  }
  if constexpr (WEIGHT) {
    for (int n = 0; n < NK; ++n) {
      prefetch<true>(rows.grad_w + (k0 + n) * geo.out + p);
    }
  }
  const T* __restrict gy = rows.grad_y;
  const T* __restrict x_taps = WEIGHT ? rows.x + p + geo.offset(k0) : nullptr;
  // Tap k0 + n reads grad_y at p - offset(k0) - n * dil: the window from the last tap's.
  const T* __restrict gy_taps = gy + p - geo.offset(k0 + NK - 1);
  for (int64_t c = 0; c < cg; ++c) {
    prefetch(gy + c * geo.out + p);
    if constexpr (WEIGHT) {
      prefetch(x_taps + c * geo.length);
      const V16<T> g = load16(gy + c * geo.out + p);
      V16<T> taps[NK];
      tap_vectors<T, NK, UNIT>(x_taps + c * geo.length, geo.dil, taps);
      for (int n = 0; n < NK; ++n) {
        sums[n] += g * taps[n];
      }
    }
    if constexpr (INPUT) {
      T* __restrict gx_c = rows.grad_x + c * geo.length + p;
      prefetch<true>(gx_c);
      V16<T> taps[NK];
      tap_vectors<T, NK, UNIT>(gy_taps + c * geo.out, geo.dil, taps);
      V16<T> acc = k0 == 0 ? V16<T>{} : load16(gx_c);
      for (int n = 0; n < NK; ++n) {
        acc += kernels[n] * taps[NK - 1 - n];
      }
      std::memcpy(gx_c, &acc, sizeof(acc));
    }
  }
  if constexpr (WEIGHT) {
    for (int n = 0; n < NK; ++n) {
      std::memcpy(rows.grad_w + (k0 + n) * geo.out + p, &sums[n], sizeof(sums[n]));
    }
  }
}

// Calls block(nk, k0) for the taps in blocks of up to 8 (nk: a std::integral_constant).
template <typename Block>
INVOLUTION_INLINE void for_tap_blocks(const Geometry1d& geo, const Block& block) {
  for (int64_t k0 = 0; k0 < geo.kernel; k0 += 8) {
    involution_common::call_block<8>(std::min<int64_t>(8, geo.kernel - k0), k0, block);
  }
}

// backward_block over the positions [vec.lo, vec.hi) (a multiple of 16 long) for the
// gradients asked for.
template <typename T>
INVOLUTION_INLINE void backward_blocks(const Geometry1d& geo, const SequenceData<T>& rows,
                                       const ColumnRange& vec, int64_t cg) {
  const auto run = [&](auto input, auto weight, auto unit) INVOLUTION_LAMBDA_INLINE {
    for (int64_t p = vec.lo; p < vec.hi; p += 16) {
      for_tap_blocks(geo, [&](auto nk, int64_t k0) INVOLUTION_LAMBDA_INLINE {
        backward_block<T, decltype(nk)::value, decltype(input)::value, decltype(weight)::value,
                       decltype(unit)::value>(geo, rows, k0, p, cg);
      });
    }
  };
  const auto with_dilation = [&](auto input, auto weight) INVOLUTION_LAMBDA_INLINE {
    if (geo.dil == 1) {
      run(input, weight, std::true_type{});
    } else {
      run(input, weight, std::false_type{});
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (rows.grad_x != nullptr && rows.grad_w != nullptr) {
    with_dilation(Yes{}, Yes{});
  } else if (rows.grad_x != nullptr) {
    with_dilation(Yes{}, No{});
  } else if (rows.grad_w != nullptr) {
    with_dilation(No{}, Yes{});
  }
}
#endif

// y[b, c, o] = sum_k w[b, g, k, o] * x[b, c, o * stride + offset(k)] for the output tiles
// [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void sequence_forward_impl(const Geometry1d& geo, const T* __restrict x,
                                             const T* __restrict w, T* __restrict y,
                                             int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  for (int64_t t = begin; t < end; ++t) {
    const auto [b, g, tile] = tile_item(geo, t, geo.tiles(geo.out));
    const ColumnRange outputs = geo.tile_outputs(tile);
    const ColumnRange vec = vector_range(geo.inner_out, outputs.lo, outputs.hi);
    const T* __restrict x_rows = x + geo.group_row(b, g, geo.length);
    const T* __restrict w_rows = w + geo.weight_rows(b, g);
    T* __restrict y_rows = y + geo.group_row(b, g, geo.out);
#ifdef INVOLUTION_VECTOR_TYPES
    const auto run = [&](auto unit) INVOLUTION_LAMBDA_INLINE {
      for (int64_t o = vec.lo; o < vec.hi; o += 16) {
        for_tap_blocks(geo, [&](auto nk, int64_t k0) INVOLUTION_LAMBDA_INLINE {
          forward_block<T, decltype(nk)::value, decltype(unit)::value>(geo, x_rows, w_rows,
                                                                       y_rows, k0, o, cg);
        });
      }
    };
    if (geo.dil == 1) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
#endif
    for (const auto [lo, hi] : outside(vec, outputs)) {
      for (int64_t c = 0; c < cg; ++c) {
        const T* __restrict x_row = x_rows + c * geo.length;
        T* __restrict y_row = y_rows + c * geo.out;
        std::fill(y_row + lo, y_row + hi, T(0));
        for (int64_t k = 0; k < geo.kernel; ++k) {
          const ColumnRange r = clip(geo.columns[k], lo, hi);
          multiply_add(y_row + r.lo, 1, w_rows + k * geo.out + r.lo,
                       x_row + r.lo * geo.stride + geo.offset(k), geo.stride, r.hi - r.lo);
        }
      }
    }
  }
}

// grad_x[b, c, i] = sum over the (k, o) with o * stride + offset(k) = i of w[b, g, k, o] *
// grad_y[b, c, o] for the inputs [lo, hi) of one group (`rows`), one tap at a time.
template <typename T>
INVOLUTION_INLINE void input_gradient(const Geometry1d& geo, const SequenceData<T>& rows,
                                      int64_t lo, int64_t hi, int64_t cg) {
  const int64_t s = geo.stride;
  for (int64_t c = 0; c < cg; ++c) {
    const T* __restrict gy_row = rows.grad_y + c * geo.out;
    T* __restrict gx_row = rows.grad_x + c * geo.length;
    std::fill(gx_row + lo, gx_row + hi, T(0));
    for (int64_t k = 0; k < geo.kernel; ++k) {
      // The outputs o whose input o * s + offset(k) lies in [lo, hi): from ceil((i - offset) /
      // s) for i = lo, hi.
      const int64_t shift = geo.offset(k);
      const auto first_output = [&](int64_t i) {
        return i - shift <= 0 ? -((shift - i) / s) : (i - shift + s - 1) / s;
      };
      const ColumnRange r = clip(geo.columns[k], first_output(lo), first_output(hi));
      multiply_add(gx_row + r.lo * s + shift, s, rows.w + k * geo.out + r.lo, gy_row + r.lo, 1,
                   r.hi - r.lo);
    }
  }
}

// grad_w[b, g, k, o] = sum over the group's channels of grad_y[b, c, o] * x[b, c, o * stride +
// offset(k)] (zero where that is padding) for the outputs [lo, hi) of one group (`rows`), one
// tap at a time.
template <typename T>
INVOLUTION_INLINE void weight_gradient(const Geometry1d& geo, const SequenceData<T>& rows,
                                       int64_t lo, int64_t hi, int64_t cg) {
  for (int64_t k = 0; k < geo.kernel; ++k) {
    std::fill(rows.grad_w + k * geo.out + lo, rows.grad_w + k * geo.out + hi, T(0));
  }
  for (int64_t c = 0; c < cg; ++c) {
    for (int64_t k = 0; k < geo.kernel; ++k) {
      const ColumnRange r = clip(geo.columns[k], lo, hi);
      multiply_add(rows.grad_w + k * geo.out + r.lo, 1, rows.grad_y + c * geo.out + r.lo,
                   rows.x + c * geo.length + r.lo * geo.stride + geo.offset(k), geo.stride,
                   r.hi - r.lo);
    }
  }
}

// The gradients asked for (`data`'s non-null grad_x, grad_w) over the backward tiles [begin,
// end) (Geometry1d::backward_tiles): each tile's inputs and outputs, in one pass over the
// tile's rows at stride 1.
template <typename T, int64_t CG>
INVOLUTION_INLINE void sequence_backward_impl(const Geometry1d& geo, const SequenceData<T>& data,
                                              int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  for (int64_t t = begin; t < end; ++t) {
    const auto [b, g, tile] = tile_item(geo, t, geo.backward_tiles());
    const SequenceData<T> rows = data.group(geo, b, g);
    const ColumnRange inputs = geo.tile_inputs(tile), outputs = geo.tile_outputs(tile);
    // At stride 1 a tile's inputs and outputs are the same positions (but at the sequence's
    // ends).
    const ColumnRange vec = vector_range(geo.inner, std::max(inputs.lo, outputs.lo),
                                         std::min(inputs.hi, outputs.hi));
#ifdef INVOLUTION_VECTOR_TYPES
    backward_blocks(geo, rows, vec, cg);
#endif
    if (rows.grad_x != nullptr) {
      for (const auto [lo, hi] : outside(vec, inputs)) {
        input_gradient(geo, rows, lo, hi, cg);
      }
    }
    if (rows.grad_w != nullptr) {
      for (const auto [lo, hi] : outside(vec, outputs)) {
        weight_gradient(geo, rows, lo, hi, cg);
      }
    }
  }
}

// Non-template entry points, compiled once per instruction set (see common.h).
INVOLUTION_DEFINE_KERNEL(sequence_forward, Geometry1d, float, x, w, y)
INVOLUTION_DEFINE_KERNEL(sequence_forward, Geometry1d, double, x, w, y)
#define INVOLUTION_SEQUENCE_BACKWARD(T)                                                     \
  INVOLUTION_TARGET_CLONES void sequence_backward(const Geometry1d& geo,                    \
                                                  const SequenceData<T>& data,              \
                                                  int64_t begin, int64_t end) {             \
    if (geo.group_channels == 16) {                                                         \
      sequence_backward_impl<T, 16>(geo, data, begin, end);                                 \
    } else {                                                                                \
      sequence_backward_impl<T, 0>(geo, data, begin, end);                                  \
    }                                                                                       \
  }
INVOLUTION_SEQUENCE_BACKWARD(float)
INVOLUTION_SEQUENCE_BACKWARD(double)
#undef INVOLUTION_SEQUENCE_BACKWARD

bool is_channels_last_3d(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// Checks the arguments (the Python front door validated them already; these keep direct callers
// from reading out of bounds) and collects the sizes.
Geometry3d make_geometry(const at::Tensor& input, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
              "involution3d cpu backend: tensors must be on the CPU");
  TORCH_CHECK(input.dim() == 5, "involution3d: input must be (B, C, D, H, W), got ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 8,
              "involution3d: weight must be (B, G, Kd, Kh, Kw, D_out, H_out, W_out), got ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3 && dilation.size() == 3,
              "involution3d: stride, padding and dilation must be triples");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "involution3d: input is ",
              input.scalar_type(), " but weight is ", weight.scalar_type());
  Geometry3d geo{};
  geo.batch = input.size(0);
  geo.channels = input.size(1);
  geo.groups = weight.size(1);
  TORCH_CHECK(weight.size(0) == geo.batch && geo.groups >= 1 && geo.channels % geo.groups == 0,
              "involution3d: weight ", weight.sizes(), " does not fit input ", input.sizes());
  geo.group_channels = geo.channels / geo.groups;
  for (int dim = 0; dim < 3; ++dim) {
    geo.size[dim] = input.size(2 + dim);
    geo.kernel[dim] = weight.size(2 + dim);
    geo.out[dim] = weight.size(5 + dim);
    geo.stride[dim] = stride[dim];
    geo.pad[dim] = padding[dim];
    geo.dil[dim] = dilation[dim];
    TORCH_CHECK(geo.stride[dim] >= 1 && geo.dil[dim] >= 1 && geo.pad[dim] >= 0,
                "involution3d: bad stride ", stride, ", padding ", padding, " or dilation ",
                dilation);
    TORCH_CHECK(geo.out[dim] == involution_common::output_size(geo.size[dim], geo.kernel[dim],
                                                               geo.stride[dim], geo.pad[dim],
                                                               geo.dil[dim]),
                "involution3d: weight ", weight.sizes(), " does not match input ", input.sizes());
  }
  geo.columns = involution_common::kernel_columns(geo.kernel[2], geo.stride[2], geo.pad[2],
                                                  geo.dil[2], geo.size[2], geo.out[2]);
  geo.padded_width = involution_common::padded_width(geo.size[2], geo.kernel[2], geo.out[2],
                                                     geo.stride[2], geo.pad[2], geo.dil[2]);
  geo.blocks8 = involution_common::column_blocks(geo.out[2], 8);
  geo.channels_last_result = is_channels_last_3d(input);
  return geo;
}

// The sequence geometry of `geo` when its maps are (B, C, 1, 1, L) rows in the contiguous
// layout read through 1x1xK kernels (the 1-D op), else nothing: the channels-last kernels.
std::optional<Geometry1d> sequence_geometry(const Geometry3d& geo) {
  for (int dim = 0; dim < 2; ++dim) {
    if (geo.size[dim] != 1 || geo.kernel[dim] != 1 || geo.out[dim] != 1) {
      return std::nullopt;
    }
  }
  if (geo.channels_last_result) {
    return std::nullopt;
  }
  return make_sequence_geometry(geo);
}

at::ScalarType compute_type(at::ScalarType dtype) {
  return involution_common::compute_type(dtype, "involution3d");
}

// Copies the contiguous (B, C, D, H, W) `src` into the channels-last (B, D, H, row_width, C)
// `dst` at column offset `column0`, in tiles of 64 columns x C channels that stay in L1, in
// parallel: ATen's generic copy of the permuted view is several times slower on long rows.
template <typename T>
void transpose_to_channels_last(const T* __restrict src, T* __restrict dst, int64_t batch,
                                int64_t channels, int64_t planes, int64_t width,
                                int64_t row_width, int64_t column0) {
  const int64_t tiles = (width + 63) / 64;
  at::parallel_for(0, batch * planes * tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bp = t / tiles;  // b * planes + plane
      const int64_t b = bp / planes, plane = bp % planes;
      const int64_t w0 = (t % tiles) * 64, w1 = std::min(width, w0 + 64);
      const T* __restrict in = src + (b * channels * planes + plane) * width;
      T* __restrict out = dst + (bp * row_width + column0) * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const T* __restrict in_c = in + c * planes * width;
        for (int64_t w = w0; w < w1; ++w) {
          out[w * channels + c] = in_c[w];
        }
      }
    }
  });
}

// `t` (B, C, D, H, W) as a channels_last_3d tensor of the compute dtype.
at::Tensor channels_last(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() != dtype || !t.is_contiguous() || t.numel() == 0) {
    return t.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::ChannelsLast3d);
  }
  at::Tensor result = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution3d_channels_last", [&] {
    transpose_to_channels_last(t.const_data_ptr<scalar_t>(), result.mutable_data_ptr<scalar_t>(),
                               t.size(0), t.size(1), t.size(2) * t.size(3), t.size(4), t.size(4),
                               0);
  });
  return result;
}

// The input as a channels_last_3d (B, D, H, padded_width, C) map of the compute dtype, zero
// outside the columns [pad, pad + W): the forward's hot loops need no column bounds checks.
at::Tensor padded_input(const at::Tensor& input, const Geometry3d& geo, at::ScalarType dtype) {
  at::Tensor padded = at::empty(
      {geo.batch, geo.size[0], geo.size[1], geo.padded_width, geo.channels},
      input.options().dtype(dtype));
  const int64_t right = geo.pad[2] + geo.size[2];
  padded.narrow(3, 0, geo.pad[2]).zero_();
  padded.narrow(3, right, geo.padded_width - right).zero_();
  if (input.scalar_type() == dtype && input.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "involution3d_padded_input", [&] {
      transpose_to_channels_last(input.const_data_ptr<scalar_t>(),
                                 padded.mutable_data_ptr<scalar_t>(), geo.batch, geo.channels,
                                 geo.size[0] * geo.size[1], geo.size[2], geo.padded_width,
                                 geo.pad[2]);
    });
  } else {
    padded.narrow(3, geo.pad[2], geo.size[2]).copy_(input.permute({0, 2, 3, 4, 1}));
  }
  return padded;
}

at::MemoryFormat result_format(const Geometry3d& geo) {
  return geo.channels_last_result ? at::MemoryFormat::ChannelsLast3d
                                  : at::MemoryFormat::Contiguous;
}

at::Tensor sequence_forward3d(const at::Tensor& input, const at::Tensor& weight,
                              const Geometry1d& geo, at::ScalarType dtype) {
  const at::Tensor x = input.to(dtype).contiguous();
  const at::Tensor w = weight.to(dtype).contiguous();
  at::Tensor y = at::empty({geo.batch, geo.channels, 1, 1, geo.out}, x.options());
  involution_common::run_forward(x, w, y, geo.batch * geo.groups * geo.tiles(geo.out),
                                 geo.tile_work(),
                                 [&](auto... args) { sequence_forward(geo, args...); });
  return y.to(input.scalar_type());
}

// backward3d of the sequence kernels: the gradients asked for in one pass over the tiles.
std::tuple<at::Tensor, at::Tensor> sequence_backward3d(const at::Tensor& grad_output,
                                                       const at::Tensor& input,
                                                       const at::Tensor& weight,
                                                       const Geometry1d& geo,
                                                       std::array<bool, 2> needs) {
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor grad_y = grad_output.to(dtype).contiguous();
  at::Tensor w, x, grad_x, grad_w;
  if (needs[0]) {
    w = weight.to(dtype).contiguous();
    grad_x = at::empty(input.sizes(), grad_y.options());
  }
  if (needs[1]) {
    x = input.to(dtype).contiguous();
    grad_w = at::empty(weight.sizes(), grad_y.options());
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution1d_backward", [&] {
    const auto in = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    const auto out = [](const at::Tensor& t) {
      return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr;
    };
    const SequenceData<scalar_t> all{in(grad_y), in(x), in(w), out(grad_x), out(grad_w)};
    involution_common::parallel_work(
        geo.batch * geo.groups * geo.backward_tiles(), geo.tile_work() * (needs[0] + needs[1]),
        int64_t{1} << 15,
        [&](int64_t begin, int64_t end) { sequence_backward(geo, all, begin, end); });
  });
  return {grad_x.defined() ? grad_x.to(input.scalar_type()) : grad_x,
          grad_w.defined() ? grad_w.to(weight.scalar_type()) : grad_w};
}

at::Tensor forward3d(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry3d geo = make_geometry(input, weight, stride, padding, dilation);
  const at::ScalarType dtype = compute_type(input.scalar_type());
  if (const auto seq = sequence_geometry(geo)) {
    return sequence_forward3d(input, weight, *seq, dtype);
  }
  const at::Tensor x = padded_input(input, geo, dtype);
  const at::Tensor w = weight.to(dtype).contiguous();
  at::Tensor y = at::empty({geo.batch, geo.channels, geo.out[0], geo.out[1], geo.out[2]},
                           x.options().memory_format(result_format(geo)));
  const int64_t rows = geo.batch * geo.groups * geo.out[0] * geo.out[1];
  involution_common::run_forward(x, w, y, rows, geo.row_work(),
                                 [&](auto... args) { forward_rows(geo, args...); });
  return y.to(input.scalar_type());
}

// The gradients asked for (undefined tensors for the others), their rows in one parallel region.
std::tuple<at::Tensor, at::Tensor> backward3d(const at::Tensor& grad_output,
                                              const at::Tensor& input, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, bool needs_input,
                                              bool needs_weight) {
  const Geometry3d geo = make_geometry(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() ==
                  at::IntArrayRef({geo.batch, geo.channels, geo.out[0], geo.out[1], geo.out[2]}),
              "involution3d: grad_output ", grad_output.sizes(), " does not match the output");
  if (const auto seq = sequence_geometry(geo)) {
    return sequence_backward3d(grad_output, input, weight, *seq, {needs_input, needs_weight});
  }
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor grad_y = channels_last(grad_output, dtype);
  at::Tensor w, x, grad_x, grad_w;
  if (needs_input) {
    w = weight.to(dtype).contiguous();
    grad_x = at::empty(input.sizes(), grad_y.options().memory_format(result_format(geo)));
  }
  if (needs_weight) {
    x = channels_last(input, dtype);
    grad_w = at::empty(weight.sizes(), grad_y.options());
  }
  const int64_t input_rows =
      needs_input ? geo.batch * geo.groups * geo.size[0] * geo.size[1] : 0;
  const int64_t weight_rows = needs_weight ? geo.batch * geo.groups * geo.out[0] * geo.out[1] : 0;
  return involution_common::run_gradients(
      {grad_y, w, x, grad_x, grad_w}, input_rows, weight_rows, geo.row_work(),
      [&](auto... args) { backward_input_rows(geo, args...); },
      [&](auto... args) { backward_weight_rows(geo, args...); },
      {input.scalar_type(), weight.scalar_type()});
}

}  // namespace involution_nd_cpu

TORCH_LIBRARY(involution_nd_cpu, m) {
  m.def("forward3d(Tensor input, Tensor weight, int[] stride, int[] padding, int[] dilation) "
        "-> Tensor");
  m.def("backward3d(Tensor grad_output, Tensor input, Tensor weight, int[] stride, "
        "int[] padding, int[] dilation, bool needs_input, bool needs_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(involution_nd_cpu, CPU, m) {
  m.impl("forward3d", &involution_nd_cpu::forward3d);
  m.impl("backward3d", &involution_nd_cpu::backward3d);
}
