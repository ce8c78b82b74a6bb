// Fast CPU kernels of the involution operator (forward, grad_input, grad_weight).
//
// Shapes: input x (B, C, H, W), weight w (B, G, Kh, Kw, H_out, W_out), output y (B, C, H_out, W_out),
// channel c belongs to group c / (C / G).
//
// Design:
// - The kernels never build the K*K-times-larger unfolded input. Each task reads input rows in
//   place and accumulates into its own slice of the result, so no two tasks write the same memory:
//   the results are deterministic and need no atomics.
// - Feature maps are read channels_last (B, H, W, C): the C/G channels of one group at one
//   pixel are contiguous, so the innermost loop runs over them with unit stride whatever the
//   stride/dilation, and the compiler vectorises it (C/G = 16 in RedNet: one AVX-512 register).
// - The forward copies the input once per call into a channels_last map padded with zero
//   columns, so its hot loop has no column bounds checks (rows outside the image are skipped
//   whole). The gradients read the valid column range of each kernel column, computed once per
//   call: on small maps (RedNet's 7x7) per-tap bounds arithmetic costs more than the work.
// - With 16 channels per group, the forward keeps blocks of up to 8 output pixels in registers
//   while it runs over the K*K taps (grad_input likewise blocks of 8 input pixels, at unit column
//   stride), and grad_weight reduces the 16-channel products of up to 16 neighbouring pixels
//   together (a transposing tree of shuffles and adds), so one tap's row of kernel gradients
//   costs about one add per value instead of a log2(16)-deep horizontal sum.
// - The kernels may be contiguous or pixel-major ((B, H_out, W_out, G, Kh, Kw) in memory: the span
//   conv's channels_last output), read in place; grad_weight is written in the same layout.
// - Both gradients run in one parallel region when both are needed.
// - The output and grad_input rows are written in the input's layout (NCHW or channels_last), so
//   they need no conversion afterwards.
// - float32 and float64 are computed natively; float16 and bfloat16 are converted to float32 for
//   the computation (fp32 accumulation) and the result is converted back.
// - On x86-64 with GCC or Clang the hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64
//   and the best version is picked at load time (function multi-versioning), so the extension
//   stays portable while using the wide vector units of the machine it runs on.

#include <torch/extension.h>

#include "common.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace involution_cpu {

using involution_common::accumulate;
using involution_common::ColumnRange;
using involution_common::dot;
using Pair = std::array<int64_t, 2>;

// Sizes and convolution parameters shared by the three kernels.
struct Geometry {
  int64_t batch, channels, height, width;
  int64_t groups, group_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  // Width of the forward's zero-padded channels_last input: input column
  // iw sits at padded column iw + pad_w, and output column j reads padded columns
  // j * stride_w + kw * dil_w, all inside [0, padded_width).
  int64_t padded_width;
  // The output columns split into the fewest blocks of at most 8 columns, of near-equal sizes,
  // for the register-blocked forward: a block's pixels are independent chains of multiply-adds,
  // and small blocks would leave the vector units waiting on latency.
  std::vector<int64_t> blocks8;
  // The same for the input columns: grad_input's register blocks (unit column stride).
  std::vector<int64_t> input_blocks8;
  // columns[kw]: the output columns whose input column for kernel column kw is inside the image.
  // Like blocks8, computed once per call: integer divisions in the hot loops would cost more
  // than the work of a 7-pixel row.
  std::vector<ColumnRange> columns;
  // Layout of the forward output and of grad_input: that of the input, so that the caller does
  // not have to convert them (channels_last, or NCHW contiguous when false).
  bool channels_last_result;

  // Strides of the (B, G, Kh, Kw, H_out, W_out) weight and grad_weight (set_kernel_layout).
  int64_t w_b, w_g, w_kh, w_kw, w_i, w_j;
  bool pixel_major_kernels;

  // Kernels contiguous, or pixel-major: laid out (B, H_out, W_out, G, Kh, Kw), the channels_last
  // output of the span conv viewed as kernels, read and written in place (no layout copies).
  void set_kernel_layout(bool pixel_major) {
    pixel_major_kernels = pixel_major;
    if (pixel_major) {
      w_kw = 1;
      w_kh = kernel_w;
      w_g = kernel_h * kernel_w;
      w_j = groups * w_g;
      w_i = out_w * w_j;
      w_b = out_h * w_i;
    } else {
      w_j = 1;
      w_i = out_w;
      w_kw = out_h * out_w;
      w_kh = kernel_w * w_kw;
      w_g = kernel_h * w_kh;
      w_b = groups * w_g;
    }
  }
  // The kernels work on items: the (B, G, rows) rows of one group. A parallel task is one item,
  // a group's rows consecutive (as its kernels are when contiguous); with pixel-major kernels
  // a task is the G items of one (b, row), so that one thread uses a pixel's G*Kh*Kw kernel
  // values together (one group's fill a fraction of a few cache lines shared with the
  // neighbouring groups: split across threads, their writes would contend for those lines).
  int64_t items_per_task() const { return pixel_major_kernels ? groups : 1; }
  int64_t tasks(int64_t rows) const { return batch * groups * rows / items_per_task(); }
  // (b, g, row) of item t.
  std::array<int64_t, 3> item(int64_t t, int64_t rows) const {
    if (pixel_major_kernels) {
      return {t / (rows * groups), t % groups, (t / groups) % rows};
    }
    return {t / (rows * groups), (t / rows) % groups, t % rows};
  }
  // Offset of weight[b, g, kh, kw, i, 0]; column j is w_j further.
  int64_t weight_row(int64_t b, int64_t g, int64_t kh, int64_t kw, int64_t i) const {
    return b * w_b + g * w_g + kh * w_kh + kw * w_kw + i * w_i;
  }
  // Offset of x[b, g * C/G, h, 0] in a channels_last (B, rows, row_width, C) map.
  int64_t pixel_row(int64_t b, int64_t g, int64_t h, int64_t rows, int64_t row_width) const {
    return ((b * rows + h) * row_width) * channels + g * group_channels;
  }
  // Offset of the padded input's row ih of group g (its padded column 0).
  int64_t padded_row(int64_t b, int64_t g, int64_t ih) const {
    return pixel_row(b, g, ih, height, padded_width);
  }
  // The input row read by output row i through kernel row kh (outside [0, height) for padding).
  int64_t input_row(int64_t i, int64_t kh) const { return i * stride_h - pad_h + kh * dil_h; }
  // The output row that reads input row ih through kernel row kh, or -1 when none does.
  int64_t output_row(int64_t ih, int64_t kh) const {
    const int64_t shifted = ih + pad_h - kh * dil_h;
    if (shifted < 0 || shifted % stride_h != 0 || shifted / stride_h >= out_h) {
      return -1;
    }
    return shifted / stride_h;
  }
  // Work (multiply-adds) of one task, used to size the parallel chunks.
  int64_t task_work() const {
    return kernel_h * kernel_w * out_w * group_channels * items_per_task();
  }
};

// Writes the (columns, C/G) row `row` of one group g into channels c = g*C/G + cc, row r of the
// (B, C, rows, columns) result `out`, in the result layout.
template <typename T>
INVOLUTION_INLINE void store_row(
    const Geometry& geo, const T* __restrict row, T* __restrict out, int64_t b, int64_t g,
    int64_t r, int64_t rows, int64_t columns, int64_t cg) {
  if (geo.channels_last_result) {
    T* __restrict dst = out + geo.pixel_row(b, g, r, rows, columns);
    for (int64_t j = 0; j < columns; ++j) {
      std::copy_n(row + j * cg, cg, dst + j * geo.channels);
    }
    return;
  }
  for (int64_t c = 0; c < cg; ++c) {
    T* __restrict dst = out + ((b * geo.channels + g * cg + c) * rows + r) * columns;
    for (int64_t j = 0; j < columns; ++j) {
      dst[j] = row[j * cg + c];
    }
  }
}

#ifdef INVOLUTION_VECTOR_KERNELS
using involution_common::for_column_blocks;
using involution_common::lane_sums;
using involution_common::load16;
using involution_common::V16;

// y[b, i, j0 .. j0+NJ, g-slice] of one output row, accumulated in registers over the taps.
// `x` points at the padded input's (b, row 0, column 0, g-slice), `w` at weight[b, g, 0, 0, i, 0].
template <typename T, int NJ>
INVOLUTION_INLINE void forward_block16(
    const Geometry& geo, const T* __restrict x, const T* __restrict w, int64_t i, int64_t j0,
    T* __restrict row) {
  V16<T> acc[NJ] = {};
  const int64_t pixel = geo.channels;
  const int64_t step = geo.stride_w * pixel;
  for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
    const int64_t ih = geo.input_row(i, kh);
    if (ih < 0 || ih >= geo.height) {
      continue;
    }
    const T* __restrict in_row = x + ih * geo.padded_width * pixel + j0 * step;
    const T* __restrict w_tap = w + kh * geo.w_kh + j0 * geo.w_j;
    for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
      const T* __restrict in = in_row + kw * geo.dil_w * pixel;
      for (int n = 0; n < NJ; ++n) {
        acc[n] += w_tap[n * geo.w_j] * load16(in + n * step);
      }
      w_tap += geo.w_kw;
    }
  }
  std::memcpy(row + j0 * 16, acc, sizeof(acc));
}

// grad_w[b, g, kh, kw, i, j0 .. j0+NJ] for one tap: 16-channel dot products of grad_y and x.
template <typename T, int NJ>
INVOLUTION_INLINE void backward_weight_block16(
    const Geometry& geo, const T* __restrict gy_row, const T* __restrict in, int64_t j0,
    T* __restrict gw_row) {
  const int64_t pixel = geo.channels;
  V16<T> products[NJ];
  for (int n = 0; n < NJ; ++n) {
    products[n] = load16(gy_row + (j0 + n) * pixel) *
                  load16(in + (j0 + n) * geo.stride_w * pixel);
  }
  const V16<T> sums = lane_sums<NJ>(products);
  if (geo.w_j == 1) {
    std::memcpy(gw_row + j0, &sums, NJ * sizeof(T));
  } else {
    for (int n = 0; n < NJ; ++n) {
      gw_row[(j0 + n) * geo.w_j] = sums[n];
    }
  }
}

// grad_x[b, ih, iw0 .. iw0+NJ, g-slice] at unit column stride, accumulated in registers over the
// taps: input column iw gets output column iw + pad_w - kw * dil_w of each kernel column kw.
// `gy` points at grad_y[b, 0, 0, g-slice] (channels_last), `w` at weight[b, g, 0, 0, 0, 0].
// CHECKED: some of the block's output columns fall outside [0, W_out) for some kw.
template <typename T, int NJ, bool CHECKED>
INVOLUTION_INLINE void backward_input_block16(
    const Geometry& geo, const T* __restrict gy, const T* __restrict w, int64_t ih, int64_t iw0,
    T* __restrict row) {
  V16<T> acc[NJ] = {};
  const int64_t pixel = geo.channels;
  for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
    const int64_t i = geo.output_row(ih, kh);
    if (i < 0) {
      continue;
    }
    const T* __restrict gy_row = gy + i * geo.out_w * pixel;
    const T* __restrict w_row = w + kh * geo.w_kh + i * geo.w_i;
    for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
      const int64_t j0 = iw0 + geo.pad_w - kw * geo.dil_w;  // output column of pixel 0
      const T* __restrict w_tap = w_row + kw * geo.w_kw;
      for (int n = 0; n < NJ; ++n) {
        const int64_t j = j0 + n;
        if (CHECKED && static_cast<uint64_t>(j) >= static_cast<uint64_t>(geo.out_w)) {
          continue;
        }
        acc[n] += w_tap[j * geo.w_j] * load16(gy_row + j * pixel);
      }
    }
  }
  std::memcpy(row + iw0 * 16, acc, sizeof(acc));
}

// Calls block(nj, j0) over the columns [lo, hi) in blocks of 16, then 8, 4, 2 and 1.
template <typename Block>
INVOLUTION_INLINE void for_power_of_two_blocks(int64_t lo, int64_t hi, const Block& block) {
  int64_t j0 = lo;
  for (; j0 + 16 <= hi; j0 += 16) {
    block(std::integral_constant<int, 16>{}, j0);
  }
  const int64_t rest = hi - j0;
  const auto tail = [&](auto nj) INVOLUTION_LAMBDA_INLINE {
    if (rest & nj) {
      block(nj, j0);
      j0 += nj;
    }
  };
  tail(std::integral_constant<int, 8>{});
  tail(std::integral_constant<int, 4>{});
  tail(std::integral_constant<int, 2>{});
  tail(std::integral_constant<int, 1>{});
}
#endif  // INVOLUTION_VECTOR_KERNELS

// y[b, i, j, g-slice] = sum_{kh, kw} w[b, g, kh, kw, i, j] * x[b, ih, iw, g-slice]
// for the items (b, g, i) of the tasks [begin, end). `x` is the padded input.
template <typename T, int64_t CG>
INVOLUTION_INLINE void forward_tasks_impl(
    const Geometry& geo, const T* __restrict x, const T* __restrict w, T* __restrict y,
    int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;  // channels_last stride between neighbouring pixels
  std::vector<T> acc_row(geo.out_w * cg);  // the task's output row, (W_out, C/G)
  for (int64_t item = begin * geo.items_per_task(); item < end * geo.items_per_task(); ++item) {
    const auto [b, g, i] = geo.item(item, geo.out_h);
#ifdef INVOLUTION_VECTOR_KERNELS
    if constexpr (CG == 16) {
      const T* x_group = x + geo.padded_row(b, g, 0);
      const T* w_group = w + geo.weight_row(b, g, 0, 0, i);
      for_column_blocks<8>(geo.blocks8, [&](auto nj, int64_t j0) INVOLUTION_LAMBDA_INLINE {
        forward_block16<T, decltype(nj)::value>(geo, x_group, w_group, i, j0, acc_row.data());
      });
      store_row(geo, acc_row.data(), y, b, g, i, geo.out_h, geo.out_w, cg);
      continue;
    }
#endif
    std::fill(acc_row.begin(), acc_row.end(), T(0));
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      const int64_t ih = geo.input_row(i, kh);
      if (ih < 0 || ih >= geo.height) {
        continue;
      }
      const T* __restrict in_row = x + geo.padded_row(b, g, ih);
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        const T* __restrict w_row = w + geo.weight_row(b, g, kh, kw, i);
        for (int64_t j = 0; j < geo.out_w; ++j) {
          accumulate(acc_row.data() + j * cg, w_row[j * geo.w_j],
                     in_row + (j * geo.stride_w + kw * geo.dil_w) * pixel, cg);
        }
      }
    }
    store_row(geo, acc_row.data(), y, b, g, i, geo.out_h, geo.out_w, cg);
  }
}

// grad_x[b, ih, iw, g-slice] = sum over (kh, kw, i, j) that read (ih, iw) of
// w[b, g, kh, kw, i, j] * grad_y[b, i, j, g-slice], for the items (b, g, ih) of the tasks [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void backward_input_tasks_impl(
    const Geometry& geo, const T* __restrict grad_y, const T* __restrict w,
    T* __restrict grad_x, int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  std::vector<T> acc_row(geo.width * cg);  // the task's grad_input row, (W, C/G)
  for (int64_t item = begin * geo.items_per_task(); item < end * geo.items_per_task(); ++item) {
    const auto [b, g, ih] = geo.item(item, geo.height);
#ifdef INVOLUTION_VECTOR_KERNELS
    if constexpr (CG == 16) {
      if (geo.stride_w == 1) {
        const T* gy_group = grad_y + geo.pixel_row(b, g, 0, geo.out_h, geo.out_w);
        const T* w_group = w + geo.weight_row(b, g, 0, 0, 0);
        // Output columns read by pixel 0 of a block run from iw0 + pad_w - (Kw-1) * dil_w up
        // to iw0 + pad_w, those of its last pixel nj - 1 further.
        const int64_t reach = (geo.kernel_w - 1) * geo.dil_w;
        for_column_blocks<8>(geo.input_blocks8, [&](auto nj, int64_t iw0)
                                                    INVOLUTION_LAMBDA_INLINE {
          constexpr int NJ = decltype(nj)::value;
          const int64_t first = iw0 + geo.pad_w - reach;
          const int64_t last = iw0 + geo.pad_w + NJ - 1;
          if (first >= 0 && last < geo.out_w) {
            backward_input_block16<T, NJ, false>(geo, gy_group, w_group, ih, iw0, acc_row.data());
          } else {
            backward_input_block16<T, NJ, true>(geo, gy_group, w_group, ih, iw0, acc_row.data());
          }
        });
        store_row(geo, acc_row.data(), grad_x, b, g, ih, geo.height, geo.width, cg);
        continue;
      }
    }
#endif
    std::fill(acc_row.begin(), acc_row.end(), T(0));
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      const int64_t i = geo.output_row(ih, kh);
      if (i < 0) {
        continue;
      }
      const T* __restrict gy_row = grad_y + geo.pixel_row(b, g, i, geo.out_h, geo.out_w);
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        const int64_t offset = kw * geo.dil_w - geo.pad_w;
        const ColumnRange cols = geo.columns[kw];
        const T* __restrict w_row = w + geo.weight_row(b, g, kh, kw, i);
        for (int64_t j = cols.lo; j < cols.hi; ++j) {
          accumulate(acc_row.data() + (j * geo.stride_w + offset) * cg, w_row[j * geo.w_j],
                     gy_row + j * pixel, cg);
        }
      }
    }
    store_row(geo, acc_row.data(), grad_x, b, g, ih, geo.height, geo.width, cg);
  }
}

// grad_w[b, g, kh, kw, i, j] = sum_{c in g} grad_y[b, i, j, c] * x[b, ih, iw, c] (zero where
// (ih, iw) is padding), for the items (b, g, i) of the tasks [begin, end). `x` is channels_last.
template <typename T, int64_t CG>
INVOLUTION_INLINE void backward_weight_tasks_impl(
    const Geometry& geo, const T* __restrict grad_y, const T* __restrict x,
    T* __restrict grad_w, int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  for (int64_t item = begin * geo.items_per_task(); item < end * geo.items_per_task(); ++item) {
    const auto [b, g, i] = geo.item(item, geo.out_h);
    const T* __restrict gy_row = grad_y + geo.pixel_row(b, g, i, geo.out_h, geo.out_w);
    // Zeros where the tap reads padding.
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      const int64_t ih = geo.input_row(i, kh);
      const bool row_inside = ih >= 0 && ih < geo.height;
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        T* __restrict gw_row = grad_w + geo.weight_row(b, g, kh, kw, i);
        const ColumnRange cols = row_inside ? geo.columns[kw] : ColumnRange{0, 0};
        for (int64_t j = 0; j < cols.lo; ++j) {
          gw_row[j * geo.w_j] = T(0);
        }
        for (int64_t j = cols.hi; j < geo.out_w; ++j) {
          gw_row[j * geo.w_j] = T(0);
        }
      }
    }
    // Calls tap(kh, kw, lo, hi, gw_row, in_tap) for the columns [lo, hi) of [first, last) that
    // read inside the image; input pixel of output column j: in_tap + j * stride_w * pixel.
    const auto for_taps = [&](int64_t first, int64_t last, const auto& tap)
                              INVOLUTION_LAMBDA_INLINE {
      for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
        const int64_t ih = geo.input_row(i, kh);
        if (ih < 0 || ih >= geo.height) {
          continue;
        }
        const T* x_row = x + geo.pixel_row(b, g, ih, geo.height, geo.width);
        for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
          const ColumnRange cols = geo.columns[kw];
          const int64_t lo = std::max(first, cols.lo);
          const int64_t hi = std::min(last, cols.hi);
          if (lo < hi) {
            tap(lo, hi, grad_w + geo.weight_row(b, g, kh, kw, i),
                x_row + (kw * geo.dil_w - geo.pad_w) * pixel);
          }
        }
      }
    };
#ifdef INVOLUTION_VECTOR_KERNELS
    if constexpr (CG == 16) {
      // Blocks of 16 columns outermost: a block's grad_y pixels, and with pixel-major kernels
      // its 16 x Kh*Kw gradient values, stay in L1 over the taps.
      for (int64_t first = 0; first < geo.out_w; first += 16) {
        for_taps(first, std::min(first + 16, geo.out_w),
                 [&](int64_t lo, int64_t hi, T* gw_row, const T* in_tap)
                     INVOLUTION_LAMBDA_INLINE {
                   for_power_of_two_blocks(lo, hi, [&](auto nj, int64_t j0)
                                                       INVOLUTION_LAMBDA_INLINE {
                     backward_weight_block16<T, decltype(nj)::value>(geo, gy_row, in_tap, j0,
                                                                     gw_row);
                   });
                 });
      }
      continue;
    }
#endif
    for_taps(0, geo.out_w, [&](int64_t lo, int64_t hi, T* gw_row, const T* in_tap)
                               INVOLUTION_LAMBDA_INLINE {
      for (int64_t j = lo; j < hi; ++j) {
        gw_row[j * geo.w_j] = dot(gy_row + j * pixel, in_tap + j * geo.stride_w * pixel, cg);
      }
    });
  }
}

// Non-template entry points, one per compute type, compiled once per instruction set. Groups of
// 16 channels (RedNet's width) get kernels where that width is a compile-time constant.
INVOLUTION_DEFINE_KERNELS(Geometry, forward_tasks, backward_input_tasks, backward_weight_tasks)

// Whether the (B, G, Kh, Kw, H_out, W_out) kernels are laid out (B, H_out, W_out, G, Kh, Kw).
bool is_pixel_major(const at::Tensor& weight) {
  return !weight.is_contiguous() && weight.permute({0, 4, 5, 1, 2, 3}).is_contiguous();
}

// Checks the arguments (the Python front door already validated them; these checks keep direct
// callers from reading out of bounds) and collects the sizes.
Geometry make_geometry(
    const at::Tensor& input, const at::Tensor& weight, Pair stride, Pair padding, Pair dilation) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(),
              "involution cpu backend: tensors must be on the CPU, got ", input.device(), " and ",
              weight.device());
  TORCH_CHECK(input.dim() == 4, "involution: input must be (B, C, H, W), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 6, "involution: weight must be (B, G, Kh, Kw, H_out, W_out), got ",
              weight.sizes());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "involution: input is ",
              input.scalar_type(), " but weight is ", weight.scalar_type());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "involution: bad stride (", stride[0], ", ", stride[1], "), padding (", padding[0], ", ",
              padding[1], ") or dilation (", dilation[0], ", ", dilation[1], ")");
  Geometry geo{};
  geo.batch = input.size(0);
  geo.channels = input.size(1);
  geo.height = input.size(2);
  geo.width = input.size(3);
  geo.groups = weight.size(1);
  geo.kernel_h = weight.size(2);
  geo.kernel_w = weight.size(3);
  geo.out_h = weight.size(4);
  geo.out_w = weight.size(5);
  involution_common::set_window(geo, stride, padding, dilation);
  TORCH_CHECK(weight.size(0) == geo.batch, "involution: weight batch ", weight.size(0),
              " != input batch ", geo.batch);
  TORCH_CHECK(geo.groups >= 1 && geo.channels % geo.groups == 0, "involution: groups ",
              geo.groups, " must divide channels ", geo.channels);
  geo.group_channels = geo.channels / geo.groups;
  geo.channels_last_result = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  using involution_common::output_size;
  TORCH_CHECK(
      geo.out_h == output_size(geo.height, geo.kernel_h, geo.stride_h, geo.pad_h, geo.dil_h) &&
          geo.out_w == output_size(geo.width, geo.kernel_w, geo.stride_w, geo.pad_w, geo.dil_w),
      "involution: weight ", weight.sizes(), " does not match input ", input.sizes());
  geo.padded_width = involution_common::padded_width(geo.width, geo.kernel_w, geo.out_w,
                                                     geo.stride_w, geo.pad_w, geo.dil_w);
  geo.set_kernel_layout(is_pixel_major(weight));
  geo.blocks8 = involution_common::column_blocks(geo.out_w, 8);
  geo.input_blocks8 = involution_common::column_blocks(geo.width, 8);
  geo.columns = involution_common::kernel_columns(geo.kernel_w, geo.stride_w, geo.pad_w,
                                                  geo.dil_w, geo.width, geo.out_w);
  return geo;
}

at::ScalarType compute_type(at::ScalarType dtype) {
  return involution_common::compute_type(dtype, "involution");
}

at::MemoryFormat result_format(const Geometry& geo) {
  return geo.channels_last_result ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// `t` as a channels_last tensor of the compute dtype (a no-op when it already is one).
at::Tensor as_channels_last(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::ChannelsLast);
}

// The kernels in the compute dtype and the layout make_geometry chose (a no-op for float32 and
// float64 kernels already in it).
at::Tensor kernel_operand(const at::Tensor& weight, at::ScalarType dtype, const Geometry& geo) {
  const at::Tensor w = weight.to(dtype);  // keeps the strides of a dense tensor
  return geo.pixel_major_kernels
             ? w.permute({0, 4, 5, 1, 2, 3}).contiguous().permute({0, 3, 4, 5, 1, 2})
             : w.contiguous();
}

// Uninitialised (B, G, Kh, Kw, H_out, W_out) kernels in the layout make_geometry chose.
at::Tensor empty_kernels(const Geometry& geo, const at::TensorOptions& options) {
  if (geo.pixel_major_kernels) {
    return at::empty({geo.batch, geo.out_h, geo.out_w, geo.groups, geo.kernel_h, geo.kernel_w},
                     options)
        .permute({0, 3, 4, 5, 1, 2});
  }
  return at::empty({geo.batch, geo.groups, geo.kernel_h, geo.kernel_w, geo.out_h, geo.out_w},
                   options);
}

// The input as a channels_last (B, H, padded_width, C) map of the compute dtype, zero outside
// the columns [pad_w, pad_w + W) (see Geometry::padded_width).
at::Tensor padded_input(const at::Tensor& input, const Geometry& geo, at::ScalarType dtype) {
  at::Tensor padded = at::empty({geo.batch, geo.height, geo.padded_width, geo.channels},
                                input.options().dtype(dtype));
  const int64_t right = geo.pad_w + geo.width;
  padded.narrow(2, 0, geo.pad_w).zero_();
  padded.narrow(2, right, geo.padded_width - right).zero_();
  padded.narrow(2, geo.pad_w, geo.width).copy_(input.permute({0, 2, 3, 1}));
  return padded;
}

at::Tensor forward(
    const at::Tensor& input, const at::Tensor& weight, Pair stride, Pair padding, Pair dilation) {
  const Geometry geo = make_geometry(input, weight, stride, padding, dilation);
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor x = padded_input(input, geo, dtype);
  const at::Tensor w = kernel_operand(weight, dtype, geo);
  at::Tensor y = at::empty({geo.batch, geo.channels, geo.out_h, geo.out_w},
                           x.options().memory_format(result_format(geo)));
  involution_common::run_forward(x, w, y, geo.tasks(geo.out_h), geo.task_work(),
                                 [&](auto... args) { forward_tasks(geo, args...); });
  return y.to(input.scalar_type());
}

// The gradients that are asked for (undefined tensors for the others). When both are, their
// tasks share one parallel region: on small maps starting the threads costs as much as a kernel.
std::tuple<at::Tensor, at::Tensor> gradients(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation, bool needs_input, bool needs_weight) {
  const Geometry geo = make_geometry(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({geo.batch, geo.channels, geo.out_h,
                                                       geo.out_w}),
              "involution: grad_output ", grad_output.sizes(), " does not match the output");
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor grad_y = as_channels_last(grad_output, dtype);
  // grad_weight comes in the layout the kernels are read in (make_geometry's choice).
  at::Tensor w, x, grad_x, grad_w;
  if (needs_input) {
    w = kernel_operand(weight, dtype, geo);
    grad_x = at::empty(input.sizes(), grad_y.options().memory_format(result_format(geo)));
  }
  if (needs_weight) {
    x = as_channels_last(input, dtype);
    grad_w = empty_kernels(geo, grad_y.options());
  }
  const int64_t input_tasks = needs_input ? geo.tasks(geo.height) : 0;
  const int64_t weight_tasks = needs_weight ? geo.tasks(geo.out_h) : 0;
  return involution_common::run_gradients(
      {grad_y, w, x, grad_x, grad_w}, input_tasks, weight_tasks, geo.task_work(),
      [&](auto... args) { backward_input_tasks(geo, args...); },
      [&](auto... args) { backward_weight_tasks(geo, args...); },
      {input.scalar_type(), weight.scalar_type()});
}

at::Tensor backward_input(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation) {
  return std::get<0>(
      gradients(grad_output, input, weight, stride, padding, dilation, true, false));
}

at::Tensor backward_weight(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation) {
  return std::get<1>(
      gradients(grad_output, input, weight, stride, padding, dilation, false, true));
}

std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation) {
  return gradients(grad_output, input, weight, stride, padding, dilation, true, true);
}

}  // namespace involution_cpu

// The fused inference kernel of the whole layer (involution_layer_cpu.cpp).
void register_layer_kernels(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fast CPU kernels of the involution operator (see involution.backends.cpu).";
  register_layer_kernels(m);
  m.def("forward", &involution_cpu::forward, "Involution forward -> (B, C, H_out, W_out)",
        py::arg("input"), py::arg("weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("backward_input", &involution_cpu::backward_input,
        "Gradient with respect to the input -> (B, C, H, W)", py::arg("grad_output"),
        py::arg("input"), py::arg("weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"));
  m.def("backward_weight", &involution_cpu::backward_weight,
        "Gradient with respect to the weight -> (B, G, Kh, Kw, H_out, W_out)",
        py::arg("grad_output"), py::arg("input"), py::arg("weight"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"));
  m.def("backward", &involution_cpu::backward, "(grad_input, grad_weight) in one call",
        py::arg("grad_output"), py::arg("input"), py::arg("weight"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"));
}
