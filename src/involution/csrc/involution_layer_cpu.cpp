// Fused inference kernel of the whole Involution2d layer on CPU:
//
//   xk  = avg_pool(x, stride)                 (kernel branch input; x itself when stride 1)
//   r   = ReLU(W0 · xk + b0)                  W0: (M, C), the reduce conv with its BN folded in
//   h   = W1 · r + b1                         W1: (G*Kh*Kw, M), the span conv
//   y   = sum_{kh, kw} h[g(c), kh, kw] * x[c, i*s + kh*d - p, j*s + kw*d - p]   (involution)
//   out = [ReLU](scale * y + shift)           optional epilogue: the following BN (+ ReLU)
//   out = [ReLU](W3 · out + b3 + residual)    optional projection: a bottleneck's last 1x1 conv
//                                             (BN folded in), its shortcut and ReLU
//
// computed per block of up to 8 output pixels of one row, so the (B, G*Kh*Kw, H_out, W_out)
// kernel tensor h (about 3x the activation in RedNet), the reduced features r and the pooled
// input never reach memory: each block's r and h live in a few KiB of per-thread scratch.
//
// Design:
// - Feature maps are read channels_last: one pixel's C channels are contiguous, so the 1x1 convs
//   are small matrix products over a block's pixels and the aggregation's innermost loop runs
//   over a group's C/G channels with unit stride (C/G = 16 in RedNet: one AVX-512 register).
// - Both 1x1 convs are register-blocked matrix products: up to 8 pixels x 32 output channels of
//   accumulators, one broadcast per pixel and two vector loads of the (pre-transposed) weights
//   per reduction step.
// - The aggregation keeps the block's pixels in registers over the taps. With RedNet's 7x7
//   kernels at unit stride, each input pixel of a kernel row is loaded once and reused by the 7
//   taps that read it (zero outside the image); otherwise taps whose input column is outside the
//   image are skipped per pixel in the blocks that touch the border (the valid output columns of
//   each kernel column are computed once per call).
// - The 1x1 convs' weights are transposed and padded to whole vectors once (layer_pack); the
//   Python backend keeps the result while the weights are unchanged.
// - Tasks are output rows (a channels_last input) or bands of an image's output rows (NCHW: each
//   band's input rows are transposed into a task-local image that stays in cache, instead of a
//   channels_last copy of the whole input written and read back), handed out on demand to the
//   intra-op threads (a thread slowed down by other processes does not hold the others back);
//   every task writes its own output pixels.
// - float32 and float64; the output is written in the input's layout (NCHW or channels_last).
// - As in involution_cpu.cpp, the hot loops are compiled for AVX-512, AVX2+FMA and baseline
//   x86-64 and the best version is picked at load time.

#include <torch/extension.h>

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace involution_layer_cpu {

using involution_common::ColumnRange;

using Pair = std::array<int64_t, 2>;

// Pixels per block: the 1x1 convs' and the aggregation's register tile.
constexpr int64_t kBlock = 8;
// Lanes of the vector type; the transposed 1x1-conv weights are padded to a multiple of it.
constexpr int64_t kLanes = 16;

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

struct LayerGeometry {
  int64_t batch, channels, height, width, out_h, out_w;
  int64_t groups, group_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t reduced, reduced_padded;  // M = C/r, and M rounded up to kLanes
  int64_t taps;                     // Kh*Kw
  int64_t kernels_padded;           // G*Kh*Kw rounded up to kLanes: the scratch row of h
  std::vector<int64_t> blocks;      // the output columns in near-equal blocks of <= kBlock
  std::vector<ColumnRange> columns;  // per kernel column kw
  bool channels_last_result;
  bool has_scale, out_relu;
  // The optional projection epilogue: a 1x1 conv C -> out_channels (a multiple of kLanes) on
  // the layer's output, + residual, [ReLU]. Without it out_channels = C.
  int64_t out_channels;
  bool has_projection, has_residual, projection_relu;

  int64_t input_row(int64_t i, int64_t kh) const { return i * stride_h - pad_h + kh * dil_h; }
  int64_t input_column(int64_t j, int64_t kw) const { return j * stride_w - pad_w + kw * dil_w; }
};

// The parameters of one call, in the compute type, transposed and padded for the kernels.
template <typename T>
struct LayerParams {
  const T* x;        // image b's (H, W, C) channels_last input at x + b * x_image_size
  int64_t x_image_size;  // H * W * C for the whole input; 0 for one image's rows (a band)
  const T* w0t;      // (C, reduced_padded): reduce weight, transposed, zero columns past M
  const T* b0;       // (reduced_padded)
  const T* w1t;      // (M, kernels_padded): span weight, transposed
  const T* b1;       // (kernels_padded)
  const T* scale;    // (C) or nullptr
  const T* shift;    // (C) or nullptr
  const T* w3t;      // (C, out_channels): projection weight, transposed; or nullptr
  const T* b3;       // (out_channels) or nullptr
  const T* residual;  // (B, out_channels, H_out, W_out) in the result layout, or nullptr
  T* y;              // (B, out_channels, H_out, W_out) in the result layout
};

#ifdef INVOLUTION_VECTOR_KERNELS
using involution_common::load16;
using involution_common::V16;
static_assert(kLanes == 16, "V16 holds kLanes values");

template <typename T>
INVOLUTION_INLINE void store16(T* p, const V16<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// max(v, 0) that keeps NaN (like torch.relu): a NaN lane compares false and is kept.
template <typename V>
INVOLUTION_INLINE V relu16(const V& v) {
  const V zero = {};
  return v < zero ? zero : v;
}

// out[p, n] = bias[n] + sum_k a[p * lda + k] * b[k * ldb + n] (then ReLU when `relu`), for the
// NP pixels p of a block and the n in [0, ldb), ldb a multiple of 16: accumulators for NP pixels
// x NV vectors stay in registers over the reduction.
template <typename T, int NP, int NV>
INVOLUTION_INLINE void matmul_columns(
    const T* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb, int64_t depth,
    const T* __restrict bias, bool relu, T* __restrict out, int64_t n0) {
  V16<T> acc[NP][NV];
  for (int v = 0; v < NV; ++v) {
    const V16<T> start = load16(bias + n0 + v * kLanes);
    for (int p = 0; p < NP; ++p) {
      acc[p][v] = start;
    }
  }
  const T* __restrict b_col = b + n0;
  for (int64_t k = 0; k < depth; ++k) {
    V16<T> row[NV];
    for (int v = 0; v < NV; ++v) {
      row[v] = load16(b_col + k * ldb + v * kLanes);
    }
    for (int p = 0; p < NP; ++p) {
      const T scalar = a[p * lda + k];
      for (int v = 0; v < NV; ++v) {
        acc[p][v] += scalar * row[v];
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    for (int v = 0; v < NV; ++v) {
      store16(out + p * ldb + n0 + v * kLanes, relu ? relu16(acc[p][v]) : acc[p][v]);
    }
  }
}

template <typename T, int NP>
INVOLUTION_INLINE void matmul_block(
    const T* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb, int64_t depth,
    const T* __restrict bias, bool relu, T* __restrict out) {
  int64_t n0 = 0;
  for (; n0 + 2 * kLanes <= ldb; n0 += 2 * kLanes) {
    matmul_columns<T, NP, 2>(a, lda, b, ldb, depth, bias, relu, out, n0);
  }
  if (n0 < ldb) {
    matmul_columns<T, NP, 1>(a, lda, b, ldb, depth, bias, relu, out, n0);
  }
}

// The aggregation of group g for the NP pixels j0.. of output row i (16 channels per group),
// with the epilogue, written to the output. KW > 0: the layer has Kw = KW, unit column stride and
// no column dilation, and each input pixel of a kernel row is loaded once into a register (zero
// outside the image) and serves every tap that reads it: NP + KW - 1 loads for NP * KW
// multiply-adds instead of NP * KW. KW = 0: any layer, one load per tap and pixel.
template <typename T, int NP, int KW>
INVOLUTION_INLINE void aggregate_block16(
    const LayerGeometry& geo, const LayerParams<T>& prm, const T* __restrict h, int64_t b,
    int64_t i, int64_t j0, int64_t g, T* __restrict z) {
  V16<T> acc[NP] = {};
  const int64_t pixel = geo.channels;
  const T* __restrict x_batch = prm.x + b * prm.x_image_size + g * kLanes;
  const T* __restrict h_group = h + g * geo.taps;
  for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
    const int64_t ih = geo.input_row(i, kh);
    if (ih < 0 || ih >= geo.height) {
      continue;
    }
    const T* __restrict x_row = x_batch + ih * geo.width * pixel;
    if constexpr (KW > 0) {
      const int64_t column0 = j0 - geo.pad_w;  // the input column of pixel 0 and tap 0
      V16<T> in[NP + KW - 1];
      for (int q = 0; q < NP + KW - 1; ++q) {
        const int64_t column = column0 + q;
        in[q] = column >= 0 && column < geo.width ? load16(x_row + column * pixel) : V16<T>{};
      }
      const T* __restrict h_row = h_group + kh * KW;
      for (int kw = 0; kw < KW; ++kw) {
        for (int p = 0; p < NP; ++p) {
          acc[p] += h_row[p * geo.kernels_padded + kw] * in[p + kw];
        }
      }
      continue;
    }
    for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
      const T* __restrict h_tap = h_group + kh * geo.kernel_w + kw;
      const ColumnRange cols = geo.columns[kw];
      // Input column of pixel p: column0 + p * stride_w (outside the image where p is not in
      // cols, in which case it is never read).
      const int64_t column0 = geo.input_column(j0, kw);
      if (j0 >= cols.lo && j0 + NP <= cols.hi) {
        const T* __restrict in = x_row + column0 * pixel;
        for (int p = 0; p < NP; ++p) {
          acc[p] += h_tap[p * geo.kernels_padded] * load16(in + p * geo.stride_w * pixel);
        }
      } else {
        for (int p = 0; p < NP; ++p) {
          if (j0 + p >= cols.lo && j0 + p < cols.hi) {
            acc[p] += h_tap[p * geo.kernels_padded] *
                      load16(x_row + (column0 + p * geo.stride_w) * pixel);
          }
        }
      }
    }
  }
  const int64_t c0 = g * kLanes;
  if (geo.has_scale) {
    const V16<T> scale = load16(prm.scale + c0);
    const V16<T> shift = load16(prm.shift + c0);
    for (int p = 0; p < NP; ++p) {
      acc[p] = acc[p] * scale + shift;
    }
  }
  if (geo.out_relu) {
    for (int p = 0; p < NP; ++p) {
      acc[p] = relu16(acc[p]);
    }
  }
  if (z != nullptr) {  // the projection's input: (NP, C) scratch
    for (int p = 0; p < NP; ++p) {
      store16(z + p * pixel + c0, acc[p]);
    }
    return;
  }
  if (geo.channels_last_result) {
    T* __restrict out = prm.y + ((b * geo.out_h + i) * geo.out_w + j0) * pixel + c0;
    for (int p = 0; p < NP; ++p) {
      store16(out + p * pixel, acc[p]);
    }
    return;
  }
  const int64_t plane = geo.out_h * geo.out_w;
  T* __restrict out = prm.y + (b * geo.channels + c0) * plane + i * geo.out_w + j0;
  for (int64_t c = 0; c < kLanes; ++c) {
    for (int p = 0; p < NP; ++p) {
      out[c * plane + p] = acc[p][c];
    }
  }
}
#endif  // INVOLUTION_VECTOR_KERNELS

// Scalar versions of the three steps, for any group width and for compilers without vector
// types. acc is (np, C/G) scratch.
template <typename T>
void matmul_block_scalar(
    const T* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb, int64_t depth,
    const T* __restrict bias, bool relu, T* __restrict out, int64_t np) {
  for (int64_t p = 0; p < np; ++p) {
    T* __restrict row = out + p * ldb;
    std::copy_n(bias, ldb, row);
    for (int64_t k = 0; k < depth; ++k) {
      const T scalar = a[p * lda + k];
      const T* __restrict b_row = b + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < ldb; ++n) {
        row[n] += scalar * b_row[n];
      }
    }
    if (relu) {
      for (int64_t n = 0; n < ldb; ++n) {
        row[n] = row[n] < T(0) ? T(0) : row[n];
      }
    }
  }
}

template <typename T>
void aggregate_block_scalar(
    const LayerGeometry& geo, const LayerParams<T>& prm, const T* __restrict h, int64_t b,
    int64_t i, int64_t j0, int64_t np, int64_t g, T* __restrict acc, T* __restrict z) {
  const int64_t cg = geo.group_channels;
  const int64_t pixel = geo.channels;
  const int64_t c0 = g * cg;
  std::fill_n(acc, np * cg, T(0));
  for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
    const int64_t ih = geo.input_row(i, kh);
    if (ih < 0 || ih >= geo.height) {
      continue;
    }
    const T* __restrict x_row = prm.x + b * prm.x_image_size + ih * geo.width * pixel + c0;
    for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
      const ColumnRange cols = geo.columns[kw];
      const int64_t lo = std::max(j0, cols.lo);
      const int64_t hi = std::min(j0 + np, cols.hi);
      for (int64_t j = lo; j < hi; ++j) {
        const T weight = h[(j - j0) * geo.kernels_padded + g * geo.taps + kh * geo.kernel_w + kw];
        const T* __restrict in = x_row + geo.input_column(j, kw) * pixel;
        T* __restrict a = acc + (j - j0) * cg;
#pragma omp simd
        for (int64_t c = 0; c < cg; ++c) {
          a[c] += weight * in[c];
        }
      }
    }
  }
  const int64_t plane = geo.out_h * geo.out_w;
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t c = 0; c < cg; ++c) {
      T value = acc[p * cg + c];
      if (geo.has_scale) {
        value = value * prm.scale[c0 + c] + prm.shift[c0 + c];
      }
      if (geo.out_relu) {
        value = value < T(0) ? T(0) : value;
      }
      const int64_t j = j0 + p;
      if (z != nullptr) {
        z[p * pixel + c0 + c] = value;
      } else if (geo.channels_last_result) {
        prm.y[((b * geo.out_h + i) * geo.out_w + j) * pixel + c0 + c] = value;
      } else {
        prm.y[(b * geo.channels + c0 + c) * plane + i * geo.out_w + j] = value;
      }
    }
  }
}

// The projection epilogue's last step for the np pixels j0.. of output row i: o (np,
// out_channels) is the 1x1 conv with its bias; adds the residual, applies the ReLU and writes.
template <typename T>
void store_projected(
    const LayerGeometry& geo, const LayerParams<T>& prm, const T* __restrict o, int64_t b,
    int64_t i, int64_t j0, int64_t np) {
  const int64_t n_out = geo.out_channels;
  const int64_t plane = geo.out_h * geo.out_w;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t pixel_index = (b * geo.out_h + i) * geo.out_w + j0 + p;  // channels_last
    const int64_t plane_index = b * n_out * plane + i * geo.out_w + j0 + p;  // NCHW, channel 0
    const T* __restrict row = o + p * n_out;
    if (geo.channels_last_result) {
      T* __restrict out = prm.y + pixel_index * n_out;
      const T* __restrict res = geo.has_residual ? prm.residual + pixel_index * n_out : nullptr;
#pragma omp simd
      for (int64_t n = 0; n < n_out; ++n) {
        T value = row[n] + (res != nullptr ? res[n] : T(0));
        out[n] = geo.projection_relu && value < T(0) ? T(0) : value;
      }
      continue;
    }
    for (int64_t n = 0; n < n_out; ++n) {
      T value = row[n] + (geo.has_residual ? prm.residual[plane_index + n * plane] : T(0));
      prm.y[plane_index + n * plane] = geo.projection_relu && value < T(0) ? T(0) : value;
    }
  }
}

// The kernel branch's input for the block's pixels: the average of each pixel's stride x stride
// window (clipped at the bottom/right border, dividing by the pixels inside, like
// avg_pool2d(ceil_mode=True)), as np rows of C values.
template <typename T>
void pool_block(
    const LayerGeometry& geo, const T* __restrict x_image, int64_t i, int64_t j0, int64_t np,
    T* __restrict out) {
  const int64_t pixel = geo.channels;
  const int64_t h0 = i * geo.stride_h, h1 = std::min(h0 + geo.stride_h, geo.height);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t w0 = (j0 + p) * geo.stride_w, w1 = std::min(w0 + geo.stride_w, geo.width);
    T* __restrict row = out + p * pixel;
    std::fill_n(row, pixel, T(0));
    for (int64_t ih = h0; ih < h1; ++ih) {
      for (int64_t iw = w0; iw < w1; ++iw) {
        const T* __restrict in = x_image + (ih * geo.width + iw) * pixel;
#pragma omp simd
        for (int64_t c = 0; c < pixel; ++c) {
          row[c] += in[c];
        }
      }
    }
    const T inv_count = T(1) / T((h1 - h0) * (w1 - w0));
#pragma omp simd
    for (int64_t c = 0; c < pixel; ++c) {
      row[c] *= inv_count;
    }
  }
}

// Calls block(np) with np a std::integral_constant in 1..kBlock equal to `size`.
template <int NP = kBlock, typename Block>
INVOLUTION_INLINE void with_block_size(int64_t size, const Block& block) {
  if constexpr (NP > 1) {
    if (size < NP) {
      with_block_size<NP - 1>(size, block);
      return;
    }
  }
  block(std::integral_constant<int, NP>{});
}

// The rows (b, i) in [begin, end): for each block of pixels, pool, reduce, span, aggregate.
template <typename T>
INVOLUTION_INLINE void layer_rows_impl(
    const LayerGeometry& geo, const LayerParams<T>& prm, int64_t begin, int64_t end) {
  const bool pooled = geo.stride_h > 1 || geo.stride_w > 1;
  // Each thread's buffers, kept across calls (only grown): allocating and zeroing them for every
  // chunk of rows cost more than the work of a chunk on small maps. Every step writes its
  // buffer before reading it.
  thread_local std::vector<T> buffers[6];
  const auto scratch = [](std::vector<T>& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) {
      buffer.resize(size);
    }
    return buffer.data();
  };
  T* const pool_scratch = scratch(buffers[0], pooled ? kBlock * geo.channels : 0);
  T* const reduced = scratch(buffers[1], kBlock * geo.reduced_padded);
  T* const kernels = scratch(buffers[2], kBlock * geo.kernels_padded);
  T* const acc = scratch(buffers[3], kBlock * geo.group_channels);
  // With the projection: the layer's output (np, C) and the projection's (np, out_channels).
  T* const z_ptr = geo.has_projection ? scratch(buffers[4], kBlock * geo.channels) : nullptr;
  T* const o = scratch(buffers[5], geo.has_projection ? kBlock * geo.out_channels : 0);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t i = task % geo.out_h;
    const int64_t b = task / geo.out_h;
    int64_t j0 = 0;
    for (const int64_t np : geo.blocks) {
      // The kernel branch's input rows: the block's own pixels of x (stride 1) or their pools.
      const T* x_image = prm.x + b * prm.x_image_size;
      const T* branch = x_image + (i * geo.width + j0) * geo.channels;
      if (pooled) {
        pool_block(geo, x_image, i, j0, np, pool_scratch);
        branch = pool_scratch;
      }
#ifdef INVOLUTION_VECTOR_KERNELS
      with_block_size(np, [&](auto size) INVOLUTION_LAMBDA_INLINE {
        constexpr int NP = decltype(size)::value;
        matmul_block<T, NP>(branch, geo.channels, prm.w0t, geo.reduced_padded, geo.channels,
                            prm.b0, true, reduced);
        matmul_block<T, NP>(reduced, geo.reduced_padded, prm.w1t, geo.kernels_padded,
                            geo.reduced, prm.b1, false, kernels);
        const bool unit_columns = geo.stride_w == 1 && geo.dil_w == 1;
        for (int64_t g = 0; g < geo.groups; ++g) {
          if (geo.group_channels == kLanes && unit_columns && geo.kernel_w == 7) {
            aggregate_block16<T, NP, 7>(geo, prm, kernels, b, i, j0, g, z_ptr);
          } else if (geo.group_channels == kLanes) {
            aggregate_block16<T, NP, 0>(geo, prm, kernels, b, i, j0, g, z_ptr);
          } else {
            aggregate_block_scalar(geo, prm, kernels, b, i, j0, NP, g, acc, z_ptr);
          }
        }
        if (geo.has_projection) {
          matmul_block<T, NP>(z_ptr, geo.channels, prm.w3t, geo.out_channels, geo.channels,
                              prm.b3, false, o);
          store_projected(geo, prm, o, b, i, j0, NP);
        }
      });
#else
      matmul_block_scalar(branch, geo.channels, prm.w0t, geo.reduced_padded, geo.channels,
                          prm.b0, true, reduced, np);
      matmul_block_scalar(reduced, geo.reduced_padded, prm.w1t, geo.kernels_padded,
                          geo.reduced, prm.b1, false, kernels, np);
      for (int64_t g = 0; g < geo.groups; ++g) {
        aggregate_block_scalar(geo, prm, kernels, b, i, j0, np, g, acc, z_ptr);
      }
      if (geo.has_projection) {
        matmul_block_scalar(z_ptr, geo.channels, prm.w3t, geo.out_channels, geo.channels, prm.b3,
                            false, o, np);
        store_projected(geo, prm, o, b, i, j0, np);
      }
#endif
      j0 += np;
    }
  }
}

INVOLUTION_TARGET_CLONES void layer_rows(
    const LayerGeometry& geo, const LayerParams<float>& prm, int64_t begin, int64_t end) {
  layer_rows_impl<float>(geo, prm, begin, end);
}
INVOLUTION_TARGET_CLONES void layer_rows(
    const LayerGeometry& geo, const LayerParams<double>& prm, int64_t begin, int64_t end) {
  layer_rows_impl<double>(geo, prm, begin, end);
}

// `src` (n, m) row-major, transposed into `dst` (m, padded_n) with zero columns past n. Plain
// loops: on the small weights a parallel ATen copy costs more in thread start-up than it saves.
template <typename T>
void transpose_padded(const T* __restrict src, int64_t n, int64_t m, int64_t padded_n,
                      T* __restrict dst) {
  for (int64_t k = 0; k < m; ++k) {
    T* __restrict row = dst + k * padded_n;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = src[j * m + k];
    }
    std::fill(row + n, row + padded_n, T(0));
  }
}

// The 1x1 convs' parameters in the layout of the kernels: (w0t, b0, w1t, b1) with w0t (C,
// M_padded) the transposed reduce weight, b0 (M_padded), w1t (M, N_padded) the transposed span
// weight, b1 (N_padded); padded entries are zero, a missing bias is zeros. M = reduce_weight
// rows, N = span_weight rows, both padded to a multiple of 16 lanes. With a projection weight
// (P, C[, 1, 1]), P a multiple of 16, also w3t (C, P) and b3 (P). Pack once per set of weights
// (the Python backend caches the result) and pass to layer_forward.
std::vector<at::Tensor> layer_pack(
    const at::Tensor& reduce_weight, const std::optional<at::Tensor>& reduce_bias,
    const at::Tensor& span_weight, const std::optional<at::Tensor>& span_bias,
    const std::optional<at::Tensor>& proj_weight, const std::optional<at::Tensor>& proj_bias) {
  const at::ScalarType dtype = reduce_weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "involution layer: float32 or float64 weights expected, got ", dtype);
  const at::Tensor w0 = reduce_weight.reshape({reduce_weight.size(0), -1}).contiguous();
  const at::Tensor w1 = span_weight.reshape({span_weight.size(0), -1}).to(dtype).contiguous();
  const int64_t reduced = w0.size(0), channels = w0.size(1), kernels = w1.size(0);
  TORCH_CHECK(w1.size(1) == reduced, "involution layer: span_weight ", span_weight.sizes(),
              " does not take the ", reduced, " reduced channels");
  const int64_t reduced_padded = round_up(reduced, kLanes);
  const int64_t kernels_padded = round_up(kernels, kLanes);
  const at::TensorOptions options = reduce_weight.options().dtype(dtype);
  at::Tensor w0t = at::empty({channels, reduced_padded}, options);
  at::Tensor w1t = at::empty({reduced, kernels_padded}, options);
  at::Tensor b0 = at::empty({reduced_padded}, options);
  at::Tensor b1 = at::empty({kernels_padded}, options);
  const auto bias = [&](const std::optional<at::Tensor>& v, int64_t n, at::Tensor& out) {
    TORCH_CHECK(!v.has_value() || !v->defined() || v->numel() == n,
                "involution layer: a bias of ", n, " values expected");
    AT_DISPATCH_FLOATING_TYPES(dtype, "involution_layer_pack_bias", [&] {
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      std::fill_n(dst, out.numel(), scalar_t(0));
      if (v.has_value() && v->defined()) {
        const at::Tensor src = v->to(dtype).contiguous();
        std::copy_n(src.const_data_ptr<scalar_t>(), n, dst);
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution_layer_pack", [&] {
    transpose_padded(w0.const_data_ptr<scalar_t>(), reduced, channels, reduced_padded,
                     w0t.mutable_data_ptr<scalar_t>());
    transpose_padded(w1.const_data_ptr<scalar_t>(), kernels, reduced, kernels_padded,
                     w1t.mutable_data_ptr<scalar_t>());
  });
  bias(reduce_bias, reduced, b0);
  bias(span_bias, kernels, b1);
  if (!proj_weight.has_value() || !proj_weight->defined()) {
    TORCH_CHECK(!proj_bias.has_value() || !proj_bias->defined(),
                "involution layer: a projection bias without a projection weight");
    return {w0t, b0, w1t, b1};
  }
  const at::Tensor w3 = proj_weight->reshape({proj_weight->size(0), -1}).to(dtype).contiguous();
  const int64_t projected = w3.size(0);
  TORCH_CHECK(w3.size(1) == channels && projected % kLanes == 0,
              "involution layer: projection weight ", proj_weight->sizes(), " must take the ",
              channels, " channels to a multiple of ", kLanes);
  at::Tensor w3t = at::empty({channels, projected}, options);
  at::Tensor b3 = at::empty({projected}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution_layer_pack_projection", [&] {
    transpose_padded(w3.const_data_ptr<scalar_t>(), projected, channels, projected,
                     w3t.mutable_data_ptr<scalar_t>());
  });
  bias(proj_bias, projected, b3);
  return {w0t, b0, w1t, b1, w3t, b3};
}

// Whole involution layer, inference only. Shapes: input (B, C, H, W); `packed` from layer_pack;
// out_scale, out_shift (C) or None (both or neither). Returns (B, C, H_out, W_out) in the
// input's layout; with a packed projection (P, C) relu?(projection(out) + residual), (B, P,
// H_out, W_out), residual (B, P, H_out, W_out) or None.
at::Tensor layer_forward(
    const at::Tensor& input, const std::vector<at::Tensor>& packed, Pair kernel_size, Pair stride,
    Pair padding, Pair dilation, int64_t groups, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_shift, bool out_relu,
    const std::optional<at::Tensor>& residual, bool proj_relu) {
  TORCH_CHECK(input.device().is_cpu(), "involution layer: input must be on the CPU, got ",
              input.device());
  TORCH_CHECK(input.dim() == 4, "involution layer: input must be (B, C, H, W), got ",
              input.sizes());
  TORCH_CHECK(packed.size() == 4 || packed.size() == 6,
              "involution layer: packed parameters from layer_pack expected");
  const at::Tensor &w0t = packed[0], &b0 = packed[1], &w1t = packed[2], &b1 = packed[3];
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "involution layer: float32 or float64 input expected, got ", dtype);
  for (const at::Tensor& t : packed) {
    TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu(),
                "involution layer: packed parameters of the input's dtype expected");
  }
  LayerGeometry geo{};
  geo.batch = input.size(0);
  geo.channels = input.size(1);
  geo.height = input.size(2);
  geo.width = input.size(3);
  geo.groups = groups;
  geo.kernel_h = kernel_size[0];
  geo.kernel_w = kernel_size[1];
  involution_common::set_window(geo, stride, padding, dilation);
  TORCH_CHECK(geo.kernel_h >= 1 && geo.kernel_w >= 1 && geo.stride_h >= 1 && geo.stride_w >= 1 &&
                  geo.dil_h >= 1 && geo.dil_w >= 1 && geo.pad_h >= 0 && geo.pad_w >= 0,
              "involution layer: bad kernel size, stride, padding or dilation");
  TORCH_CHECK(groups >= 1 && geo.channels % groups == 0, "involution layer: groups ", groups,
              " must divide channels ", geo.channels);
  geo.group_channels = geo.channels / groups;
  geo.taps = geo.kernel_h * geo.kernel_w;
  geo.reduced = w1t.size(0);
  geo.reduced_padded = w0t.size(1);
  geo.kernels_padded = w1t.size(1);
  TORCH_CHECK(w0t.dim() == 2 && w0t.size(0) == geo.channels &&
                  geo.reduced_padded == round_up(geo.reduced, kLanes) &&
                  b0.numel() == geo.reduced_padded && b1.numel() == geo.kernels_padded &&
                  geo.kernels_padded == round_up(groups * geo.taps, kLanes),
              "involution layer: packed parameters ", w0t.sizes(), ", ", w1t.sizes(),
              " do not match ", geo.channels, " channels and ", groups * geo.taps,
              " kernel channels");
  const auto out_size = [](int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
    return (n + 2 * p - d * (k - 1) - 1) / s + 1;
  };
  geo.out_h = out_size(geo.height, geo.kernel_h, geo.stride_h, geo.pad_h, geo.dil_h);
  geo.out_w = out_size(geo.width, geo.kernel_w, geo.stride_w, geo.pad_w, geo.dil_w);
  // The kernel branch sees the input pooled by the stride: its size must be the output's.
  TORCH_CHECK(geo.out_h == (geo.height + geo.stride_h - 1) / geo.stride_h &&
                  geo.out_w == (geo.width + geo.stride_w - 1) / geo.stride_w,
              "involution layer: output size (", geo.out_h, ", ", geo.out_w,
              ") differs from the input pooled by the stride; use 'same' padding");
  geo.channels_last_result = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  geo.has_scale = out_scale.has_value() && out_scale->defined();
  TORCH_CHECK(geo.has_scale == (out_shift.has_value() && out_shift->defined()),
              "involution layer: out_scale and out_shift go together");
  geo.out_relu = out_relu;
  geo.has_projection = packed.size() == 6;
  geo.out_channels = geo.has_projection ? packed[4].size(1) : geo.channels;
  TORCH_CHECK(!geo.has_projection || packed[4].size(0) == geo.channels,
              "involution layer: the packed projection does not take ", geo.channels, " channels");
  geo.has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!geo.has_residual || geo.has_projection,
              "involution layer: a residual goes with a projection");
  geo.projection_relu = proj_relu;
  geo.blocks = involution_common::column_blocks(geo.out_w, kBlock);
  geo.columns = involution_common::kernel_columns(geo.kernel_w, geo.stride_w, geo.pad_w,
                                                  geo.dil_w, geo.width, geo.out_w);

  // A channels_last input is read in place; an NCHW one a band of rows at a time
  // (channels_last_rows), each band's rows transposed into a task-local image.
  const bool in_place = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = in_place ? input : input.contiguous();
  at::Tensor scale, shift;
  if (geo.has_scale) {
    scale = out_scale->to(dtype).contiguous();
    shift = out_shift->to(dtype).contiguous();
    TORCH_CHECK(scale.numel() == geo.channels && shift.numel() == geo.channels,
                "involution layer: out_scale and out_shift must have ", geo.channels,
                " values");
  }
  const at::MemoryFormat result_format =
      geo.channels_last_result ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor res;
  if (geo.has_residual) {
    TORCH_CHECK(residual->sizes() ==
                    at::IntArrayRef({geo.batch, geo.out_channels, geo.out_h, geo.out_w}),
                "involution layer: residual ", residual->sizes(), " does not match the output");
    res = residual->to(dtype).contiguous(result_format);
  }
  at::Tensor y = at::empty({geo.batch, geo.out_channels, geo.out_h, geo.out_w},
                           input.options().memory_format(result_format));
  if (y.numel() == 0) {
    return y;
  }
  // About 64k multiply-adds per chunk of rows.
  const int64_t row_work =
      geo.out_w * (geo.channels * geo.reduced + geo.reduced * groups * geo.taps +
                   geo.channels * geo.taps +
                   (geo.has_projection ? geo.channels * geo.out_channels : 0));
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution_layer_forward", [&] {
    LayerParams<scalar_t> prm{};
    prm.x = x.const_data_ptr<scalar_t>();
    prm.x_image_size = geo.height * geo.width * geo.channels;
    prm.w0t = w0t.const_data_ptr<scalar_t>();
    prm.b0 = b0.const_data_ptr<scalar_t>();
    prm.w1t = w1t.const_data_ptr<scalar_t>();
    prm.b1 = b1.const_data_ptr<scalar_t>();
    prm.scale = geo.has_scale ? scale.const_data_ptr<scalar_t>() : nullptr;
    prm.shift = geo.has_scale ? shift.const_data_ptr<scalar_t>() : nullptr;
    prm.w3t = geo.has_projection ? packed[4].const_data_ptr<scalar_t>() : nullptr;
    prm.b3 = geo.has_projection ? packed[5].const_data_ptr<scalar_t>() : nullptr;
    prm.residual = geo.has_residual ? res.const_data_ptr<scalar_t>() : nullptr;
    prm.y = y.mutable_data_ptr<scalar_t>();
    if (in_place) {
      involution_common::parallel_work(
          geo.batch * geo.out_h, row_work, int64_t{1} << 16,
          [&](int64_t begin, int64_t end) { layer_rows(geo, prm, begin, end); });
      return;
    }
    const auto [band_rows, bands] = involution_common::image_bands(geo.batch, geo.out_h);
    involution_common::parallel_chunks(geo.batch * bands, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / bands;
        const int64_t i0 = (task % bands) * band_rows;
        const int64_t i1 = std::min(geo.out_h, i0 + band_rows);
        // The input rows the band reads: its windows' and its pooling windows'.
        const int64_t first = std::max<int64_t>(0, i0 * geo.stride_h - geo.pad_h);
        const int64_t last =
            std::min(geo.height, std::max((i1 - 1) * geo.stride_h - geo.pad_h +
                                              (geo.kernel_h - 1) * geo.dil_h + 1,
                                          i1 * geo.stride_h));
        const at::Tensor rows = involution_common::channels_last_rows(x, b, first, last);
        LayerParams<scalar_t> band = prm;
        band.x = rows.const_data_ptr<scalar_t>();
        band.x_image_size = 0;
        layer_rows(geo, band, b * geo.out_h + i0, b * geo.out_h + i1);
      }
    });
  });
  return y;
}

}  // namespace involution_layer_cpu

// Called from involution_cpu.cpp's PYBIND11_MODULE: one extension, one module.
void register_layer_kernels(pybind11::module& m) {
  m.def("layer_pack", &involution_layer_cpu::layer_pack,
        "The 1x1 convs' parameters in the fused layer kernel's layout -> [w0t, b0, w1t, b1]",
        py::arg("reduce_weight"), py::arg("reduce_bias"), py::arg("span_weight"),
        py::arg("span_bias"), py::arg("proj_weight") = py::none(),
        py::arg("proj_bias") = py::none());
  m.def("layer_forward", &involution_layer_cpu::layer_forward,
        "Whole involution layer, inference: pool, reduce (+bias) + ReLU, span, aggregation, an "
        "optional per-channel affine (+ ReLU) epilogue and an optional 1x1 projection (+ residual, "
        "+ ReLU) -> (B, C or P, H_out, W_out)",
        py::arg("input"), py::arg("packed"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("out_scale"),
        py::arg("out_shift"), py::arg("out_relu"), py::arg("residual") = py::none(),
        py::arg("proj_relu") = false);
}
