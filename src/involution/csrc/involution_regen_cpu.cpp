// Fused CPU backward of the Involution2d layer's span conv and aggregation, the kernels
// regenerated per band of output rows and never stored whole (the training path of
// involution.ops.regenerate):
//
//   h   = W1 · a + b1                  a (B, M, H_out, W_out): the branch's activated features
//                                      (ReLU output), W1 (G*K*K, M): the span conv
//   y   = sum_{kh, kw} h[g(c), kh, kw] * x[c, i*s + kh*d - p, j*s + kw*d - p]
//
// Given grad_y, computes for each band of output rows of one image:
//   grad_h[g, kh, kw]  = sum_{c in g} grad_y[c] * x[c, tap]          (per pixel, band-local)
//   grad_a             = W1^T · grad_h                             -> (B, M, H_out, W_out)
//   grad_W1, grad_b1  += grad_h · a^T, sum grad_h                   (per-band partials)
//   grad_x[c, ih, iw]  = sum over the taps reading (ih, iw) of h * grad_y   (the input rows
//                        pooled into the band's output rows, so each band owns its input rows)
// Optionally (output_affine) grad_y = A * g + B + D * y per channel, y the layer's output
// aggregated again per band from the regenerated kernels: the gradient through a BatchNorm
// (batch statistics) after the layer, whose input y is then never stored.
// The (B, G*K*K, H_out, W_out) kernels and their gradient (about 3x the input each in RedNet)
// never reach memory whole: a band's h (with a halo of the output rows whose windows reach its
// input rows) and a chunk of rows of grad_h live in per-task scratch. The M-wide rest of the
// backward (the ReLU, BatchNorm, the reduce conv, the average pool) is ATen's, in Python.
//
// Design:
// - Tasks are (image, band of output rows), handed out on demand to the intra-op threads; each
//   writes its own input rows of grad_x and its own rows of grad_a, and its own partial sums of
//   grad_W1 and grad_b1, reduced in task order afterwards: deterministic, no atomics.
// - The dense steps (h = a·W1^T + b1, grad_a = grad_h·W1, grad_W1 += grad_h^T·a) are ATen
//   matrix products on band-local tensors (run on the calling thread inside the parallel
//   region), reading and writing the M-channel maps in place in either layout (pixel_rows: a
//   conversion there would cost more than the products, and would leave grad_a in a layout the
//   ATen ops after it run slowly on); the aggregation's two gradients are the loops below,
//   over channels_last x and grad_y so the innermost loop runs over a group's C/G channels with
//   unit stride (a compile-time 16 for RedNet). NCHW operands are transposed a band's rows at a
//   time into task-local images (channels_last_rows), which stay in cache for the loops.
// - Bands are whole images when there are enough images for the threads, else split so that
//   every thread gets tasks; a band's halo is (K-1)*d/s rows of regenerated kernels.
// - float32 and float64; grad_x is written in the input's layout (NCHW or channels_last).
// - Registered as torch.ops.involution_regen_cpu.span_backward (TORCH_LIBRARY); its fake
//   implementation is in involution/ops/backends/cpu.py.

#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace involution_regen_cpu {

using involution_common::ColumnRange;

struct SpanGeometry {
  int64_t batch, channels, height, width, out_h, out_w;
  int64_t groups, group_channels, kernel, stride, dil, pad;
  int64_t reduced;  // M
  int64_t taps;     // K*K
  int64_t kernels;  // G*K*K
  int64_t band_rows, bands;
  std::vector<ColumnRange> columns;  // per kernel column kw: the output columns inside
  // columns[kw] in near-equal blocks of at most 16: the kernel gradient's register blocks.
  std::vector<std::vector<int64_t>> tap_blocks;
  bool channels_last_result;
  // The register-blocked paths (16 channels per group, unit dilation, see Tiling). The kernel
  // gradient reads x with `x_pad` zero columns on each side (x_pad = pad with a tiling, else 0),
  // so every output column takes the tiled path, in blocks of at most the tiling's width. The
  // input gradient tiles the input columns whose taps all read output columns inside the map
  // (unit stride only).
  int tiling;
  int64_t x_pad;
  std::vector<int64_t> out_blocks;
  ColumnRange inner_in;
  std::vector<int64_t> inner_in_blocks;

  int64_t input_row(int64_t i, int64_t kh) const { return i * stride - pad + kh * dil; }
  // The output row that reads input row ih through kernel row kh, or -1 when none does.
  int64_t output_row(int64_t ih, int64_t kh) const {
    const int64_t shifted = ih + pad - kh * dil;
    if (shifted < 0 || shifted % stride != 0 || shifted / stride >= out_h) {
      return -1;
    }
    return shifted / stride;
  }
};

// One task's rows: its own output rows [i0, i1), its own input rows [r0, r1) (those pooled into
// its output rows) and the output rows [lo, hi) whose kernels it regenerates: its own, and with
// grad_x those whose windows reach its input rows.
struct Band {
  int64_t b, i0, i1, r0, r1, lo, hi;
};

Band band_of(const SpanGeometry& geo, int64_t task, bool needs_input) {
  Band band{};
  band.b = task / geo.bands;
  band.i0 = (task % geo.bands) * geo.band_rows;
  band.i1 = std::min(geo.out_h, band.i0 + geo.band_rows);
  band.r0 = band.i0 * geo.stride;
  band.r1 = std::min(geo.height, band.i1 * geo.stride);
  band.lo = band.i0;
  band.hi = band.i1;
  if (needs_input) {
    // Output rows i with i*s - pad + kh*d in [r0, r1) for some kh < K.
    const int64_t first = band.r0 + geo.pad - (geo.kernel - 1) * geo.dil;
    band.lo = std::min(band.lo, first <= 0 ? 0 : (first + geo.stride - 1) / geo.stride);
    band.hi = std::max(band.hi, std::min(geo.out_h, (band.r1 - 1 + geo.pad) / geo.stride + 1));
  }
  return band;
}

// The register-blocked paths, for 16 channels per group and unit dilation: the kernel size and
// the column stride are compile-time (RedNet's 7x7 at strides 1 and 2, its stem's 3x3).
enum Tiling { kGeneral = 0, kK7S1 = 1, kK7S2 = 2, kK3S1 = 3 };

// Maps of at most this many pixels: the M-channel maps go through the matrix products
// channels_last.
constexpr int64_t kSmallMap = 256;

// The tiling of a geometry: on maps at least 4 * (K - 1) wide, where most columns are away from
// the borders (on narrower ones the padded taps and the border pixels cost more than tiling
// saves).
Tiling tiling_of(int64_t group_channels, int64_t kernel, int64_t stride, int64_t dilation,
                 int64_t width) {
  if (group_channels != 16 || dilation != 1 || width < 4 * (kernel - 1)) {
    return kGeneral;
  }
  if (kernel == 7) {
    return stride == 1 ? kK7S1 : stride == 2 ? kK7S2 : kGeneral;
  }
  return kernel == 3 && stride == 1 ? kK3S1 : kGeneral;
}

#ifdef INVOLUTION_VECTOR_KERNELS
using involution_common::load16;
using involution_common::V16;

// grad_h at one tap of group g for the NJ pixels j0.. of an output row (16 channels per group):
// their 16-channel products of grad_y and the input reduced together (lane_sums), about one add
// per value instead of a horizontal sum each. `gy_row` points at the row's grad_y (group g),
// `in` at the input pixel read by output column 0, `gh_tap` at the tap's grad_h of column 0.
template <typename T, int NJ>
INVOLUTION_INLINE void kernel_gradient_block16(
    const SpanGeometry& geo, const T* __restrict gy_row, const T* __restrict in, int64_t j0,
    T* __restrict gh_tap) {
  const int64_t pixel = geo.channels;
  V16<T> products[NJ];
  for (int n = 0; n < NJ; ++n) {
    products[n] = load16(gy_row + (j0 + n) * pixel) * load16(in + (j0 + n) * geo.stride * pixel);
  }
  const V16<T> sums = involution_common::lane_sums<NJ>(products);
  for (int n = 0; n < NJ; ++n) {
    gh_tap[(j0 + n) * geo.kernels] = sums[n];
  }
}

// grad_h of group g at the K taps of one kernel row for NJ output pixels whose windows lie inside
// the image (K = KW, column stride S, unit dilation): the input pixels of the row that the block
// reads are loaded once for every tap that reads them, and each pixel's K dot products are
// reduced together (lane_sums) and stored as one run (a pixel's taps are contiguous in grad_h).
// `gy` holds the pixels' grad_y, `in` points at the input pixel of pixel 0's tap 0, `gh` at pixel
// 0's grad_h of the row's tap 0.
template <typename T, int NJ, int KW, int S>
INVOLUTION_INLINE void kernel_gradient_row_taps16(const V16<T>* gy, const T* __restrict in,
                                                  int64_t pixel, T* __restrict gh,
                                                  int64_t kernels) {
  V16<T> x[(NJ - 1) * S + KW];
  for (int q = 0; q < (NJ - 1) * S + KW; ++q) {
    x[q] = load16(in + q * pixel);
  }
  for (int n = 0; n < NJ; ++n) {
    V16<T> products[KW];
    for (int kw = 0; kw < KW; ++kw) {
      products[kw] = gy[n] * x[n * S + kw];
    }
    const V16<T> sums = involution_common::lane_sums<KW>(products);
    std::memcpy(gh + n * kernels, &sums, KW * sizeof(T));
  }
}

// grad_h of group g for the NJ output pixels j0.. of row i (kernel_gradient_row_taps16 per kernel
// row; zero for the rows outside the image). `x_image` is image b's input with x_pad zero
// columns each side (group g), `gy_row` row i's grad_y (group g), `gh_row` row i's grad_h
// (group g).
template <typename T, int NJ, int KW, int S>
INVOLUTION_INLINE void kernel_gradient_tile16(const SpanGeometry& geo,
                                              const T* __restrict x_image,
                                              const T* __restrict gy_row, int64_t i, int64_t j0,
                                              T* __restrict gh_row) {
  const int64_t pixel = geo.channels;
  V16<T> gy[NJ];
  for (int n = 0; n < NJ; ++n) {
    gy[n] = load16(gy_row + (j0 + n) * pixel);
  }
  for (int kh = 0; kh < KW; ++kh) {
    const int64_t ih = geo.input_row(i, kh);
    T* __restrict gh = gh_row + j0 * geo.kernels + kh * KW;
    if (ih < 0 || ih >= geo.height) {
      for (int n = 0; n < NJ; ++n) {
        std::fill_n(gh + n * geo.kernels, KW, T(0));
      }
      continue;
    }
    // Input column j * S - pad + kw sits at j * S + kw in the padded rows.
    const T* in = x_image + (ih * (geo.width + 2 * geo.x_pad) + j0 * S) * pixel;
    kernel_gradient_row_taps16<T, NJ, KW, S>(gy, in, pixel, gh, geo.kernels);
  }
}

// grad_x of group g at the NP input pixels iw0.. of input row ih whose taps all read output
// pixels inside the map (K = KW, unit stride and dilation): the sums stay in registers over the
// taps, and per kernel row the grad_y of the output pixels the block reads are loaded once for
// every tap that reads them. `gy_image` is image b's grad_y (group g), `h` the band's kernels
// from output row lo (group g), `row` the (W, C) scratch (group g).
template <typename T, int NP, int KW>
INVOLUTION_INLINE void input_gradient_tile16(const SpanGeometry& geo,
                                             const T* __restrict gy_image, const T* __restrict h,
                                             int64_t lo, int64_t ih, int64_t iw0,
                                             T* __restrict row) {
  const int64_t pixel = geo.channels;
  V16<T> acc[NP] = {};
  for (int kh = 0; kh < KW; ++kh) {
    const int64_t i = geo.output_row(ih, kh);
    if (i < 0) {
      continue;
    }
    // Output column of q = 0: pixel n reads output column first + n + KW - 1 - kw at tap kw.
    const int64_t first = iw0 + geo.pad - (KW - 1);
    V16<T> gy[NP + KW - 1];
    for (int q = 0; q < NP + KW - 1; ++q) {
      gy[q] = load16(gy_image + (i * geo.out_w + first + q) * pixel);
    }
    const T* __restrict h_row = h + ((i - lo) * geo.out_w + first) * geo.kernels + kh * KW;
    for (int kw = 0; kw < KW; ++kw) {
      for (int n = 0; n < NP; ++n) {
        const int q = n + KW - 1 - kw;
        acc[n] += h_row[q * geo.kernels + kw] * gy[q];
      }
    }
  }
  for (int n = 0; n < NP; ++n) {
    std::memcpy(row + (iw0 + n) * pixel, &acc[n], sizeof(acc[n]));
  }
}
#endif

// grad_h of group g at every tap of output pixel (i, j), any geometry, x unpadded (zero where a
// tap reads padding). `x_image`, `gy` (the pixel's grad_y) and `gh` (the pixel's grad_h) at group g.
template <typename T, int64_t CG>
INVOLUTION_INLINE void kernel_gradient_pixel(const SpanGeometry& geo, const T* __restrict x_image,
                                             const T* __restrict gy, int64_t i, int64_t j,
                                             T* __restrict gh) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  for (int64_t kh = 0; kh < geo.kernel; ++kh) {
    const int64_t ih = geo.input_row(i, kh);
    const bool row_inside = ih >= 0 && ih < geo.height;
    for (int64_t kw = 0; kw < geo.kernel; ++kw) {
      const int64_t iw = j * geo.stride - geo.pad + kw * geo.dil;
      gh[kh * geo.kernel + kw] =
          row_inside && iw >= 0 && iw < geo.width
              ? involution_common::dot(gy, x_image + (ih * geo.width + iw) * geo.channels, cg)
              : T(0);
    }
  }
}

// grad_h[p, g, kh, kw] = sum_{c in g} grad_y[b, i, j, c] * x[b, ih, iw, c] (zero where the tap
// reads padding) for the pixels p = (i - i0) * W_out + j of the output rows [i0, i1) of image b,
// and grad_b1 += grad_h summed over them. `x` and `grad_y` are channels_last, x with x_pad zero
// columns each side. With a tiling (TILE) every pixel takes the tiled path; otherwise (16
// channels per group) tap by tap in blocks of 16 pixels (kernel_gradient_block16), or pixel by
// pixel (kernel_gradient_pixel).
template <typename T, int64_t CG, int TILE>
INVOLUTION_INLINE void kernel_gradient_rows_impl(
    const SpanGeometry& geo, const T* __restrict x, const T* __restrict grad_y,
    T* __restrict grad_h, T* __restrict grad_b1, int64_t b, int64_t i0, int64_t i1) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  const T* x_batch = x + b * geo.height * geo.width * pixel;
  for (int64_t i = i0; i < i1; ++i) {
    T* __restrict gh_row = grad_h + (i - i0) * geo.out_w * geo.kernels;
    for (int64_t g = 0; g < geo.groups; ++g) {
      const T* gy_row = grad_y + ((b * geo.out_h + i) * geo.out_w) * pixel + g * cg;
      const T* x_image = x_batch + g * cg;
      T* gh_group = gh_row + g * geo.taps;
      const auto pixel_at = [&](int64_t j) {
        kernel_gradient_pixel<T, CG>(geo, x_image, gy_row + j * pixel, i, j,
                                     gh_group + j * geo.kernels);
      };
#ifdef INVOLUTION_VECTOR_KERNELS
      if constexpr (TILE != kGeneral) {
        constexpr int KW = TILE == kK3S1 ? 3 : 7;
        constexpr int S = TILE == kK7S2 ? 2 : 1;
        constexpr int MAX = S == 1 ? 8 : 4;  // the loaded pixels stay within the registers
        involution_common::for_column_blocks<MAX>(
            geo.out_blocks, [&](auto nj, int64_t j0) INVOLUTION_LAMBDA_INLINE {
              kernel_gradient_tile16<T, decltype(nj)::value, KW, S>(geo, x_image, gy_row, i, j0,
                                                                    gh_group);
            });
        continue;
      }
      if constexpr (CG == 16) {
        const int64_t k = geo.kernel;
        for (int64_t kh = 0; kh < k; ++kh) {
          const int64_t ih = geo.input_row(i, kh);
          const bool row_inside = ih >= 0 && ih < geo.height;
          const T* x_row = x_image + ih * geo.width * pixel;
          for (int64_t kw = 0; kw < k; ++kw) {
            T* gh_tap = gh_group + kh * k + kw;
            const ColumnRange cols = row_inside ? geo.columns[kw] : ColumnRange{0, 0};
            for (int64_t j = 0; j < cols.lo; ++j) {
              gh_tap[j * geo.kernels] = T(0);
            }
            for (int64_t j = cols.hi; j < geo.out_w; ++j) {
              gh_tap[j * geo.kernels] = T(0);
            }
            if (cols.lo >= cols.hi) {
              continue;
            }
            // The input pixel read by output column j: in + j * stride * pixel.
            const T* in = x_row + (kw * geo.dil - geo.pad) * pixel;
            involution_common::for_column_blocks<16>(
                geo.tap_blocks[kw], [&](auto nj, int64_t j0) INVOLUTION_LAMBDA_INLINE {
                  kernel_gradient_block16<T, decltype(nj)::value>(geo, gy_row, in,
                                                                  cols.lo + j0, gh_tap);
                });
          }
        }
        continue;
      }
#endif
      for (int64_t j = 0; j < geo.out_w; ++j) {
        pixel_at(j);
      }
    }
  }
  for (int64_t p = 0; p < (i1 - i0) * geo.out_w; ++p) {
    const T* __restrict gh = grad_h + p * geo.kernels;
#pragma omp simd
    for (int64_t n = 0; n < geo.kernels; ++n) {
      grad_b1[n] += gh[n];
    }
  }
}

// grad_x of group g at input pixel (ih, iw) at unit stride (the tiled rows' border pixels): the
// sum over the taps (kh, kw) and output pixels (i, j) that read it of h[i, j, g, kh, kw] * grad_y[b, i, j, g]. `gy_image` is
// image b's grad_y (group g), `h` the band's kernels from output row lo (group g), `out` the
// pixel's (group g) grad_x in the row scratch.
template <typename T, int64_t CG>
INVOLUTION_INLINE void input_gradient_pixel(const SpanGeometry& geo,
                                            const T* __restrict gy_image, const T* __restrict h,
                                            int64_t lo, int64_t ih, int64_t iw,
                                            T* __restrict out) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  // Unit stride (the tiled rows'): input (ih, iw) is read by output (ih + pad - kh * d,
  // iw + pad - kw * d) through tap (kh, kw).
  const auto for_taps = [&](const auto& add) INVOLUTION_LAMBDA_INLINE {
    for (int64_t kh = 0; kh < geo.kernel; ++kh) {
      const int64_t i = ih + geo.pad - kh * geo.dil;
      if (i < 0 || i >= geo.out_h) {
        continue;
      }
      for (int64_t kw = 0; kw < geo.kernel; ++kw) {
        const int64_t j = iw + geo.pad - kw * geo.dil;
        if (j < 0 || j >= geo.out_w) {
          continue;
        }
        const int64_t p = i * geo.out_w + j;
        add(h[(p - lo * geo.out_w) * geo.kernels + kh * geo.kernel + kw],
            gy_image + p * geo.channels);
      }
    }
  };
#ifdef INVOLUTION_VECTOR_KERNELS
  if constexpr (CG == 16) {  // the sums in a register
    V16<T> acc = {};
    for_taps([&](T weight, const T* gy) INVOLUTION_LAMBDA_INLINE { acc += weight * load16(gy); });
    std::memcpy(out, &acc, sizeof(acc));
    return;
  }
#endif
  std::fill_n(out, cg, T(0));
  for_taps([&](T weight, const T* gy) INVOLUTION_LAMBDA_INLINE {
    involution_common::accumulate(out, weight, gy, cg);
  });
}

// The (W, C) row of grad_x at input row ih of image b: sum over the taps (kh, kw) and output
// pixels (i, j) that read it of h[i, j, g(c), kh, kw] * grad_y[b, i, j, c]. `h` holds the
// kernels of output rows lo.. pixel-major ((rows, W_out, G, K, K)); `row` is (W, C) scratch.
// With a unit-stride tiling, the pixels whose taps all read output pixels inside the map take
// input_gradient_tile16 and the others input_gradient_pixel; otherwise each output pixel adds
// its taps' products to the pixels they read.
template <typename T, int64_t CG, int TILE>
INVOLUTION_INLINE void input_gradient_row_impl(
    const SpanGeometry& geo, const T* __restrict grad_y, const T* __restrict h, int64_t lo,
    int64_t b, int64_t ih, T* __restrict row) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  const int64_t k = geo.kernel;
#ifdef INVOLUTION_VECTOR_KERNELS
  if constexpr (TILE == kK7S1 || TILE == kK3S1) {
    constexpr int KW = TILE == kK3S1 ? 3 : 7;
    for (int64_t g = 0; g < geo.groups; ++g) {
      const T* gy_image = grad_y + b * geo.out_h * geo.out_w * pixel + g * cg;
      const T* h_group = h + g * geo.taps;
      T* row_group = row + g * cg;
      const auto pixel_at = [&](int64_t iw) {
        input_gradient_pixel<T, CG>(geo, gy_image, h_group, lo, ih, iw, row_group + iw * pixel);
      };
      for (int64_t iw = 0; iw < geo.inner_in.lo; ++iw) {
        pixel_at(iw);
      }
      involution_common::for_column_blocks<8>(
          geo.inner_in_blocks, [&](auto np, int64_t j0) INVOLUTION_LAMBDA_INLINE {
            input_gradient_tile16<T, decltype(np)::value, KW>(geo, gy_image, h_group, lo, ih,
                                                              geo.inner_in.lo + j0, row_group);
          });
      for (int64_t iw = geo.inner_in.hi; iw < geo.width; ++iw) {
        pixel_at(iw);
      }
    }
    return;
  }
#endif
  std::fill_n(row, geo.width * pixel, T(0));
  for (int64_t kh = 0; kh < k; ++kh) {
    const int64_t i = geo.output_row(ih, kh);
    if (i < 0) {
      continue;
    }
    const T* __restrict gy_row = grad_y + ((b * geo.out_h + i) * geo.out_w) * pixel;
    const T* __restrict h_row = h + (i - lo) * geo.out_w * geo.kernels + kh * k;
    // Pixel by pixel, its kernel row's taps together: a pixel's kernels are contiguous.
    for (int64_t j = 0; j < geo.out_w; ++j) {
      const T* __restrict gy = gy_row + j * pixel;
      const T* __restrict h_pixel = h_row + j * geo.kernels;
      for (int64_t kw = 0; kw < k; ++kw) {
        const ColumnRange cols = geo.columns[kw];
        if (j < cols.lo || j >= cols.hi) {
          continue;
        }
        T* __restrict acc = row + (j * geo.stride - geo.pad + kw * geo.dil) * pixel;
        for (int64_t g = 0; g < geo.groups; ++g) {
          involution_common::accumulate(acc + g * cg, h_pixel[g * geo.taps + kw], gy + g * cg,
                                        cg);
        }
      }
    }
  }
}

// Calls body(tile) with the geometry's tiling as a compile-time Tiling.
template <typename Body>
INVOLUTION_INLINE void with_tiling(int tiling, const Body& body) {
  switch (tiling) {
    case kK7S1:
      body(std::integral_constant<int, kK7S1>{});
      return;
    case kK7S2:
      body(std::integral_constant<int, kK7S2>{});
      return;
    case kK3S1:
      body(std::integral_constant<int, kK3S1>{});
      return;
    default:
      body(std::integral_constant<int, kGeneral>{});
  }
}

// Entry points compiled once per instruction set, with the group width a compile-time 16 for
// RedNet's groups.
#define INVOLUTION_REGEN_KERNELS(T)                                                            \
  INVOLUTION_TARGET_CLONES void kernel_gradient_rows(                                          \
      const SpanGeometry& geo, const T* x, const T* grad_y, T* grad_h, T* grad_b1, int64_t b, \
      int64_t i0, int64_t i1) {                                                                \
    if (geo.group_channels == 16) {                                                            \
      with_tiling(geo.tiling, [&](auto tile) INVOLUTION_LAMBDA_INLINE {                        \
        kernel_gradient_rows_impl<T, 16, decltype(tile)::value>(geo, x, grad_y, grad_h,        \
                                                                grad_b1, b, i0, i1);           \
      });                                                                                      \
    } else {                                                                                   \
      kernel_gradient_rows_impl<T, 0, kGeneral>(geo, x, grad_y, grad_h, grad_b1, b, i0, i1);   \
    }                                                                                          \
  }                                                                                            \
  INVOLUTION_TARGET_CLONES void input_gradient_row(const SpanGeometry& geo, const T* grad_y,   \
                                                   const T* h, int64_t lo, int64_t b,          \
                                                   int64_t ih, T* row) {                       \
    if (geo.group_channels == 16) {                                                            \
      with_tiling(geo.tiling, [&](auto tile) INVOLUTION_LAMBDA_INLINE {                        \
        input_gradient_row_impl<T, 16, decltype(tile)::value>(geo, grad_y, h, lo, b, ih, row); \
      });                                                                                      \
    } else {                                                                                   \
      input_gradient_row_impl<T, 0, kGeneral>(geo, grad_y, h, lo, b, ih, row);                 \
    }                                                                                          \
  }
INVOLUTION_REGEN_KERNELS(float)
INVOLUTION_REGEN_KERNELS(double)
#undef INVOLUTION_REGEN_KERNELS

// The layer's output gradient A * g + B + D * y (output_affine's rows A, B, D per channel) over
// the output rows [lo, hi) of one band, into `out` (channels_last, at their own rows), y the
// layer's output aggregated again from the band's kernels h (pixel-major, from row lo) and the
// channels_last x image (x_pad zero columns each side); g channels_last like `out`.
// Pixel by pixel, one load per tap and pixel (any geometry).
template <typename T, int64_t CG>
INVOLUTION_INLINE void rebuilt_gradient_pixels(const SpanGeometry& geo, const T* __restrict x,
                                               const T* __restrict h,
                                               const T* __restrict coefficients,
                                               const T* __restrict g, T* __restrict out,
                                               int64_t lo, int64_t i) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  const int64_t k = geo.kernel;
  const int64_t x_row_size = (geo.width + 2 * geo.x_pad) * pixel;
  for (int64_t j = 0; j < geo.out_w; ++j) {
    T* __restrict acc = out + (i * geo.out_w + j) * pixel;
    std::fill_n(acc, pixel, T(0));
    const T* __restrict h_pixel = h + ((i - lo) * geo.out_w + j) * geo.kernels;
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t ih = geo.input_row(i, kh);
      if (ih < 0 || ih >= geo.height) {
        continue;
      }
      const T* x_row = x + ih * x_row_size + (geo.x_pad + j * geo.stride - geo.pad) * pixel;
      for (int64_t kw = 0; kw < k; ++kw) {
        const ColumnRange cols = geo.columns[kw];
        if (j < cols.lo || j >= cols.hi) {  // the tap reads a zero padding column
          continue;
        }
        const T* x_pixel = x_row + kw * geo.dil * pixel;
        for (int64_t group = 0; group < geo.groups; ++group) {
          involution_common::accumulate(acc + group * cg,
                                        h_pixel[group * geo.taps + kh * k + kw],
                                        x_pixel + group * cg, cg);
        }
      }
    }
    const T* __restrict g_pixel = g + (i * geo.out_w + j) * pixel;
#pragma omp simd
    for (int64_t c = 0; c < pixel; ++c) {
      acc[c] = coefficients[c] * g_pixel[c] + coefficients[pixel + c] +
               coefficients[2 * pixel + c] * acc[c];
    }
  }
}

#ifdef INVOLUTION_VECTOR_KERNELS
// The same for NP pixels j0.. of output row i and group `group` (16 channels, the tiled
// geometries: x zero-padded by x_pad = pad columns, so no border tests): y in registers, each
// input pixel of a kernel row loaded once for the taps that read it.
template <typename T, int NP, int KW, int S>
INVOLUTION_INLINE void rebuilt_gradient_tile16(const SpanGeometry& geo, const T* __restrict x,
                                               const T* __restrict h,
                                               const T* __restrict coefficients,
                                               const T* __restrict g, T* __restrict out,
                                               int64_t lo, int64_t i, int64_t j0, int64_t group) {
  constexpr int NQ = S * (NP - 1) + KW;
  V16<T> acc[NP] = {};
  const int64_t pixel = geo.channels;
  const int64_t c0 = group * 16;
  const T* __restrict h_pixels = h + ((i - lo) * geo.out_w + j0) * geo.kernels + group * geo.taps;
  for (int kh = 0; kh < KW; ++kh) {
    const int64_t ih = geo.input_row(i, kh);
    if (ih < 0 || ih >= geo.height) {
      continue;
    }
    const T* __restrict x_row =
        x + (ih * (geo.width + 2 * geo.x_pad) + j0 * S) * pixel + c0;
    V16<T> in[NQ];
    for (int q = 0; q < NQ; ++q) {
      in[q] = load16(x_row + q * pixel);
    }
    for (int kw = 0; kw < KW; ++kw) {
      for (int p = 0; p < NP; ++p) {
        acc[p] += h_pixels[p * geo.kernels + kh * KW + kw] * in[S * p + kw];
      }
    }
  }
  const V16<T> a = load16(coefficients + c0);
  const V16<T> b = load16(coefficients + pixel + c0);
  const V16<T> d = load16(coefficients + 2 * pixel + c0);
  const int64_t offset = (i * geo.out_w + j0) * pixel + c0;
  for (int p = 0; p < NP; ++p) {
    const V16<T> value = a * load16(g + offset + p * pixel) + b + d * acc[p];
    std::memcpy(out + offset + p * pixel, &value, sizeof(value));
  }
}
#endif

template <typename T, int64_t CG, int TILE>
INVOLUTION_INLINE void rebuilt_gradient_rows_impl(const SpanGeometry& geo, const T* x,
                                                  const T* h, const T* coefficients, const T* g,
                                                  T* out, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
#ifdef INVOLUTION_VECTOR_KERNELS
    if constexpr (TILE != kGeneral) {
      constexpr int KW = TILE == kK3S1 ? 3 : 7;
      constexpr int S = TILE == kK7S2 ? 2 : 1;
      constexpr int MAX = S == 1 ? 8 : 4;
      for (int64_t group = 0; group < geo.groups; ++group) {
        involution_common::for_column_blocks<MAX>(
            geo.out_blocks, [&](auto np, int64_t j0) INVOLUTION_LAMBDA_INLINE {
              rebuilt_gradient_tile16<T, decltype(np)::value, KW, S>(geo, x, h, coefficients, g,
                                                                    out, lo, i, j0, group);
            });
      }
      continue;
    }
#endif
    rebuilt_gradient_pixels<T, CG>(geo, x, h, coefficients, g, out, lo, i);
  }
}

#define INVOLUTION_REBUILT_GRADIENT(T)                                                          \
  INVOLUTION_TARGET_CLONES void rebuilt_gradient_rows(const SpanGeometry& geo, const T* x,      \
                                                      const T* h, const T* coefficients,        \
                                                      const T* g, T* out, int64_t lo,           \
                                                      int64_t hi) {                             \
    if (geo.group_channels == 16) {                                                             \
      with_tiling(geo.tiling, [&](auto tile) INVOLUTION_LAMBDA_INLINE {                         \
        rebuilt_gradient_rows_impl<T, 16, decltype(tile)::value>(geo, x, h, coefficients, g,    \
                                                                 out, lo, hi);                  \
      });                                                                                       \
    } else {                                                                                    \
      rebuilt_gradient_rows_impl<T, 0, kGeneral>(geo, x, h, coefficients, g, out, lo, hi);      \
    }                                                                                           \
  }
INVOLUTION_REBUILT_GRADIENT(float)
INVOLUTION_REBUILT_GRADIENT(double)
#undef INVOLUTION_REBUILT_GRADIENT

// Writes the (W, C) row `row` to input row ih of image b of grad_x, in the result layout.
template <typename T>
void store_input_row(const SpanGeometry& geo, const T* __restrict row, T* __restrict grad_x,
                     int64_t b, int64_t ih) {
  const int64_t pixel = geo.channels;
  if (geo.channels_last_result) {
    std::copy_n(row, geo.width * pixel, grad_x + ((b * geo.height + ih) * geo.width) * pixel);
    return;
  }
  const int64_t plane = geo.height * geo.width;
  for (int64_t c = 0; c < pixel; ++c) {
    T* __restrict dst = grad_x + (b * pixel + c) * plane + ih * geo.width;
    for (int64_t iw = 0; iw < geo.width; ++iw) {
      dst[iw] = row[iw * pixel + c];
    }
  }
}

// The operands of one call, in the layouts they came in (NCHW or channels_last): x and grad_y
// read by the loops channels_last through channels_last_rows, the M-channel maps read and
// written as (pixels, M) matrices through pixel_rows.
struct SpanOperands {
  at::Tensor x, grad_y;                 // (B, C, H, W), (B, C, H_out, W_out): NCHW or
                                        // channels_last (channels_last_rows)
  at::Tensor activated;                 // (B, M, H_out, W_out)
  at::Tensor span_weight;               // (G*K*K, M)
  std::optional<at::Tensor> span_bias;  // (G*K*K,)
  at::Tensor output_affine;             // (3, C) contiguous, or undefined (span_backward)
  at::Tensor grad_x;                    // (B, C, H, W) in the result layout, or undefined
  at::Tensor grad_activated;            // (B, M, H_out, W_out) in activated's layout
  at::Tensor grad_w1, grad_b1;          // (tasks, G*K*K, M), (tasks, G*K*K): per-task partials
};

// The (count, M) matrix of the pixels [start, start + count) of image b of a (B, M, H, W) map,
// NCHW or channels_last: a strided view (column-major for NCHW, row-major for channels_last)
// that the matrix products read and write in place, so no layout is converted.
at::Tensor pixel_rows(const at::Tensor& map, int64_t b, int64_t start, int64_t count) {
  return map.select(0, b).flatten(1).narrow(1, start, count).t();
}

// Rows of grad_h computed together: about 256 KiB of scratch, so it stays in L2 between the
// loops that write it and the matrix products that read it.
int64_t chunk_rows(const SpanGeometry& geo, int64_t element_size) {
  const int64_t row_bytes = geo.out_w * geo.kernels * element_size;
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, row_bytes));
}

template <typename T>
void run_band(const SpanGeometry& geo, const SpanOperands& ops, int64_t task) {
  // The band's matrix products write into the results (out= variants): below autograd, which
  // would refuse them on inputs that require grad (the op itself is not differentiable). Per
  // task, since the guard is thread-local.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Band band = band_of(geo, task, ops.grad_x.defined());
  // With output_affine, grad_y is rebuilt from the layer's output, aggregated here.
  const bool rebuild = ops.output_affine.defined();
  // The band's kernels h (rows lo..hi, pixel-major) for grad_x and the output: one product.
  at::Tensor h;
  if (ops.grad_x.defined() || rebuild) {
    const at::Tensor a = pixel_rows(ops.activated, band.b, band.lo * geo.out_w,
                                    (band.hi - band.lo) * geo.out_w);
    h = ops.span_bias.has_value() ? at::addmm(*ops.span_bias, a, ops.span_weight.t())
                                  : at::mm(a, ops.span_weight.t());
  }
  // grad_h chunk by chunk of the own rows: grad_a, grad_W1 and grad_b1 from it.
  at::Tensor grad_w1 = ops.grad_w1.select(0, task);
  at::Tensor grad_b1 = ops.grad_b1.select(0, task);
  grad_b1.zero_();
  const int64_t step = chunk_rows(geo, sizeof(T));
  at::Tensor grad_h = at::empty({std::min(step, band.i1 - band.i0) * geo.out_w, geo.kernels},
                                ops.activated.options());
  // Image b's x and grad_y channels_last, as the loops read them (as image 0): in place, or the
  // rows the band reads transposed into task-local images.
  // x: the rows that the own output rows read (and the halo's, to rebuild their output).
  const int64_t row_lo = rebuild ? band.lo : band.i0;
  const int64_t row_hi = rebuild ? band.hi : band.i1;
  const int64_t x_first = std::max<int64_t>(0, row_lo * geo.stride - geo.pad);
  const int64_t x_last = std::min(
      geo.height, (row_hi - 1) * geo.stride - geo.pad + (geo.kernel - 1) * geo.dil + 1);
  const at::Tensor x_image =
      involution_common::channels_last_rows(ops.x, band.b, x_first, x_last, geo.x_pad);
  const T* x = x_image.const_data_ptr<T>();
  at::Tensor gy_image =
      involution_common::channels_last_rows(ops.grad_y, band.b, band.lo, band.hi);
  if (rebuild) {
    at::Tensor rebuilt = at::empty({geo.out_h, geo.out_w, geo.channels}, ops.x.options());
    rebuilt_gradient_rows(geo, x, h.const_data_ptr<T>(), ops.output_affine.const_data_ptr<T>(),
                          gy_image.const_data_ptr<T>(), rebuilt.mutable_data_ptr<T>(), band.lo,
                          band.hi);
    gy_image = rebuilt;
  }
  const T* grad_y = gy_image.const_data_ptr<T>();
  for (int64_t i = band.i0; i < band.i1; i += step) {
    const int64_t rows = std::min(step, band.i1 - i);
    const int64_t pixels = rows * geo.out_w;
    at::Tensor gh = grad_h.narrow(0, 0, pixels);
    kernel_gradient_rows(geo, x, grad_y, gh.mutable_data_ptr<T>(), grad_b1.mutable_data_ptr<T>(),
                         0, i, i + rows);
    const at::Tensor a = pixel_rows(ops.activated, band.b, i * geo.out_w, pixels);
    at::Tensor grad_a = pixel_rows(ops.grad_activated, band.b, i * geo.out_w, pixels);
    at::mm_out(grad_a, gh, ops.span_weight);
    if (i == band.i0) {  // the first chunk writes the partial sums: no zeroing pass
      at::mm_out(grad_w1, gh.t(), a);
    } else {
      grad_w1.addmm_(gh.t(), a);
    }
  }
  if (!ops.grad_x.defined()) {
    return;
  }
  std::vector<T> row(geo.width * geo.channels);
  for (int64_t ih = band.r0; ih < band.r1; ++ih) {
    input_gradient_row(geo, grad_y, h.const_data_ptr<T>(), band.lo, 0, ih, row.data());
    store_input_row(geo, row.data(), ops.grad_x.mutable_data_ptr<T>(), band.b, ih);
  }
}

// The tiled paths' columns: every output column for the kernel gradient (x zero-padded), and at
// unit stride the input columns iw whose taps read output columns iw + pad - K + 1 .. iw + pad,
// all inside the map, for the input gradient.
void set_tiling(SpanGeometry& geo) {
  geo.tiling = tiling_of(geo.group_channels, geo.kernel, geo.stride, geo.dil, geo.width);
  geo.x_pad = geo.tiling == kGeneral ? 0 : geo.pad;
  geo.out_blocks = involution_common::column_blocks(geo.out_w, geo.stride == 1 ? 8 : 4);
  const int64_t end = std::clamp<int64_t>(geo.out_w - geo.pad, 0, geo.width);
  geo.inner_in = ColumnRange{std::clamp<int64_t>(geo.kernel - 1 - geo.pad, 0, end), end};
  geo.inner_in_blocks = involution_common::column_blocks(geo.inner_in.hi - geo.inner_in.lo, 8);
}

// Bands of output rows per image (image_bands; a band's halo of regenerated kernels costs
// (K-1)*d/s rows of the span conv).
void set_bands(SpanGeometry& geo) {
  std::tie(geo.band_rows, geo.bands) = involution_common::image_bands(geo.batch, geo.out_h);
}

// The fused backward. input (B, C, H, W), grad_output (B, C, H_out, W_out), activated (B, M,
// H_out, W_out), span_weight (G*K*K, M[, 1, 1]), span_bias (G*K*K,) or None; padding
// dilation * (K - 1) / 2. Returns (grad_input (B, C, H, W) in the input's layout, or an empty
// tensor without needs_input; grad_activated (B, M, H_out, W_out) in activated's layout (NCHW or
// channels_last); grad_span_weight (G*K*K, M); grad_span_bias (G*K*K,)). With output_affine
// (3, C) = (A, B, D), grad_output is g and the layer's output gradient is A * g + B + D * y,
// y the layer's output, aggregated again per band (a BatchNorm's backward after the layer,
// without y stored).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> span_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& activated,
    const at::Tensor& span_weight, const std::optional<at::Tensor>& span_bias,
    int64_t kernel_size, int64_t stride, int64_t dilation, bool needs_input,
    const std::optional<at::Tensor>& output_affine) {
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "involution span_backward: float32 or float64 expected, got ", dtype);
  TORCH_CHECK(input.dim() == 4 && grad_output.dim() == 4 && activated.dim() == 4,
              "involution span_backward: 4-D input, grad_output and activated expected");
  for (const at::Tensor& t : {grad_output, activated, span_weight}) {
    TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(),
                "involution span_backward: CPU tensors of the input's dtype expected");
  }
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1 && stride >= 1 && dilation >= 1,
              "involution span_backward: odd kernel size, stride >= 1 and dilation >= 1 expected");
  SpanGeometry geo{};
  geo.batch = input.size(0);
  geo.channels = input.size(1);
  geo.height = input.size(2);
  geo.width = input.size(3);
  geo.kernel = kernel_size;
  geo.stride = stride;
  geo.dil = dilation;
  geo.pad = dilation * (kernel_size - 1) / 2;
  geo.taps = kernel_size * kernel_size;
  geo.out_h = involution_common::output_size(geo.height, geo.kernel, stride, geo.pad, dilation);
  geo.out_w = involution_common::output_size(geo.width, geo.kernel, stride, geo.pad, dilation);
  geo.reduced = activated.size(1);
  const at::Tensor w1 = span_weight.reshape({span_weight.size(0), -1}).contiguous();
  geo.kernels = w1.size(0);
  geo.groups = geo.kernels / geo.taps;
  TORCH_CHECK(w1.size(1) == geo.reduced && geo.groups * geo.taps == geo.kernels &&
                  geo.groups >= 1 && geo.channels % geo.groups == 0,
              "involution span_backward: span_weight ", span_weight.sizes(), " does not match ",
              geo.reduced, " reduced channels, kernel size ", kernel_size, " and ", geo.channels,
              " channels");
  const std::array<int64_t, 4> activated_size{geo.batch, geo.reduced, geo.out_h, geo.out_w};
  const std::array<int64_t, 4> output_size{geo.batch, geo.channels, geo.out_h, geo.out_w};
  TORCH_CHECK(activated.sizes() == at::IntArrayRef(activated_size) &&
                  grad_output.sizes() == at::IntArrayRef(output_size),
              "involution span_backward: activated ", activated.sizes(), " or grad_output ",
              grad_output.sizes(), " does not match input ", input.sizes());
  geo.group_channels = geo.channels / geo.groups;
  geo.columns = involution_common::kernel_columns(geo.kernel, stride, geo.pad, dilation,
                                                  geo.width, geo.out_w);
  for (const ColumnRange& cols : geo.columns) {
    geo.tap_blocks.push_back(involution_common::column_blocks(cols.hi - cols.lo, 16));
  }
  set_tiling(geo);
  // ops.layout.memory_format_of: channels_last only when not also contiguous.
  geo.channels_last_result =
      !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  set_bands(geo);
  const int64_t tasks = geo.batch * geo.bands;

  const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
  SpanOperands ops;
  // channels_last_rows reads them in place (channels_last) or transposes rows per task (NCHW).
  ops.x = input.is_contiguous(cl) ? input : input.contiguous();
  ops.grad_y = grad_output.is_contiguous(cl) ? grad_output : grad_output.contiguous();
  const bool activated_last = !activated.is_contiguous() && activated.is_contiguous(cl);
  // On small maps the products run slower on NCHW's short columns than a copy costs there.
  const bool products_last = activated_last || geo.out_h * geo.out_w <= kSmallMap;
  ops.activated = products_last ? activated.contiguous(cl) : activated.contiguous();
  ops.span_weight = w1;
  if (span_bias.has_value() && span_bias->defined()) {
    TORCH_CHECK(span_bias->numel() == geo.kernels && span_bias->scalar_type() == dtype,
                "involution span_backward: span_bias of ", geo.kernels, " values expected");
    ops.span_bias = span_bias->contiguous();
  }
  if (output_affine.has_value() && output_affine->defined()) {
    TORCH_CHECK(output_affine->sizes() == at::IntArrayRef({3, geo.channels}) &&
                    output_affine->scalar_type() == dtype,
                "involution span_backward: output_affine of shape (3, ", geo.channels,
                ") and the input's dtype expected, got ", output_affine->sizes());
    ops.output_affine = output_affine->contiguous();
  }
  const at::TensorOptions options = input.options();
  ops.grad_activated =
      at::empty({geo.batch, geo.reduced, geo.out_h, geo.out_w},
                options.memory_format(products_last ? cl : at::MemoryFormat::Contiguous));
  ops.grad_w1 = at::empty({tasks, geo.kernels, geo.reduced}, options);
  ops.grad_b1 = at::empty({tasks, geo.kernels}, options);
  ops.grad_x = needs_input ? at::empty(input.sizes(), options.memory_format(
                                                          geo.channels_last_result
                                                              ? cl
                                                              : at::MemoryFormat::Contiguous))
                           : at::Tensor();
  if (tasks > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "involution_span_backward", [&] {
      involution_common::parallel_chunks(tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          run_band<scalar_t>(geo, ops, task);
        }
      });
    });
  }
  // The per-task partials summed in task order: the same result whichever thread ran a task.
  return {needs_input ? ops.grad_x : at::empty({0}, options),
          activated_last ? ops.grad_activated : ops.grad_activated.contiguous(),
          ops.grad_w1.sum(0), ops.grad_b1.sum(0)};
}

}  // namespace involution_regen_cpu

TORCH_LIBRARY(involution_regen_cpu, m) {
  m.def("span_backward(Tensor grad_output, Tensor input, Tensor activated, Tensor span_weight, "
        "Tensor? span_bias, int kernel_size, int stride, int dilation, bool needs_input, "
        "Tensor? output_affine=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(involution_regen_cpu, CPU, m) {
  m.impl("span_backward", &involution_regen_cpu::span_backward);
}
