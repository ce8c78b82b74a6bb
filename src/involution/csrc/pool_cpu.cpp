// CPU pooling ops of the training paths, on NCHW or channels_last maps:
// - norm_relu_max_pool: a BatchNorm with the batch's statistics, a ReLU and a max pool in one op,
//   RedNet's deep stem tail (bn3 -> act3 -> maxpool, involution.models.pooling), below;
// - average_pool: the involution kernel branch's AvgPool2d(s, s, ceil_mode=True) and its
//   backward added into the input's gradient (involution.ops.regenerate), further down.
//
// norm_relu_max_pool:
//   y        = relu(z * scale + shift)    scale = weight * invstd, shift = bias - mean * scale
//   p[o]     = max of y over window o, the first maximum in row-major order (ATen's ties)
//
// Forward: the batch's mean and invstd per channel (one pass over z, double sums), then the
// pooled map and each window's argmax as its position in the window (uint8), y never written.
// Autograd keeps z (BatchNorm's backward reads it anyway), the pooled map (the next layer's
// input, kept there anyway) and the uint8 positions, instead of y and int64 indices beside z.
// Backward: the gradient g reaching z through the pool and the ReLU is zero outside the windows'
// argmaxes, so BatchNorm's two sums per channel, sum(g) and sum(g * (z - mean)), come from the
// pooled map; then the dense part of
//   grad_z = k * g - k * sum(g) / N - k * invstd^2 * sum(g * (z - mean)) / N * (z - mean)
// (k = weight * invstd) is written and the windows' k * g added at their argmaxes.
//
// Design:
// - NCHW: each (image, channel) plane is one task, the output columns in the inner loops
//   (vectorised; the stride a compile-time 2 where RedNet's is). The max pool writes the plane's
//   y, with -inf in the padding, to task scratch and pools it row by row with the window's taps
//   in ATen's order.
// - channels_last: one task per output row (forward) or per image (the max pool's backward),
//   the channels in the inner loops; the max pool writes its pooled map NCHW or channels_last
//   (RedNet runs its stem in channels_last and hands NCHW maps on when its input is NCHW).
// - Per-channel sums are per task (a channel, or an image's partials summed in image order),
//   so the ops are deterministic. float32 and float64.
// - Registered as torch.ops.involution_pool_cpu.* (TORCH_LIBRARY). norm_relu_max_pool is eager
//   only (involution.models.pooling calls it inside an autograd Function that compiled and
//   traced code never reaches); average_pool has fake implementations
//   (involution/ops/backends/cpu.py), so compiled graphs call it too.

#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace involution_pool_cpu {

struct PoolGeometry {
  int64_t batch, channels, height, width, out_h, out_w, kernel, stride, pad;
  // kh * width + kw of each position kh * kernel + kw in a window (no division in the loops).
  std::vector<int64_t> window_offsets;
  // The pooled map's (and the positions') strides of b, c, oh and ow: NCHW or channels_last.
  std::array<int64_t, 4> out_strides;

  int64_t plane() const { return height * width; }
  int64_t out_plane() const { return out_h * out_w; }
  // Values per channel: BatchNorm's N.
  int64_t count() const { return batch * plane(); }
  // The padded plane's rows and columns that the windows cover.
  int64_t padded_h() const { return (out_h - 1) * stride + kernel; }
  int64_t padded_w() const { return (out_w - 1) * stride + kernel; }
};

// Sums of z and z^2 over one channel's planes, in double lanes (sixteen independent chains, so
// the loop vectorises without reassociating a sum).
template <typename T>
INVOLUTION_INLINE std::pair<double, double> channel_sums_impl(const PoolGeometry& geo, const T* z,
                                                             int64_t c) {
  constexpr int LANES = 16;
  double sum[LANES] = {};
  double squares[LANES] = {};
  const int64_t plane = geo.plane();
  const int64_t body = plane / LANES * LANES;
  double tail_sum = 0, tail_squares = 0;
  for (int64_t b = 0; b < geo.batch; ++b) {
    const T* values = z + (b * geo.channels + c) * plane;
    for (int64_t i = 0; i < body; i += LANES) {
      for (int l = 0; l < LANES; ++l) {
        const double v = values[i + l];
        sum[l] += v;
        squares[l] += v * v;
      }
    }
    for (int64_t i = body; i < plane; ++i) {
      const double v = values[i];
      tail_sum += v;
      tail_squares += v * v;
    }
  }
  for (int l = 0; l < LANES; ++l) {
    tail_sum += sum[l];
    tail_squares += squares[l];
  }
  return {tail_sum, tail_squares};
}

// Plane (b, c) pooled: out and positions (out_h, out_w). `padded` (padded_h, padded_w) scratch
// receives y with -inf in the padding, `best` and `where` (out_w) one output row's running
// maximum and its position. STRIDE: the pool's stride at compile time (2, the stem's, so the
// strided loads vectorise), or 0 to read geo.stride.
template <typename T, int STRIDE>
INVOLUTION_INLINE void pool_plane_impl(const PoolGeometry& geo, const T* z, T scale, T shift,
                                       T* out, uint8_t* positions, T* padded, T* best,
                                       int32_t* where) {
  const int64_t s = STRIDE > 0 ? STRIDE : geo.stride;
  const int64_t padded_h = geo.padded_h(), padded_w = geo.padded_w();
  const int64_t right = std::min(geo.width, padded_w - geo.pad);  // input columns read
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < padded_h; ++r) {
    T* row = padded + r * padded_w;
    const int64_t ih = r - geo.pad;
    if (ih < 0 || ih >= geo.height) {
      std::fill(row, row + padded_w, lowest);
      continue;
    }
    std::fill(row, row + geo.pad, lowest);
    const T* in = z + ih * geo.width;
    T* y = row + geo.pad;
    for (int64_t iw = 0; iw < right; ++iw) {
      const T v = in[iw] * scale + shift;
      y[iw] = v < 0 ? T(0) : v;  // NaN stays NaN, as through ATen's ReLU
    }
    std::fill(row + geo.pad + right, row + padded_w, lowest);
  }
  for (int64_t oh = 0; oh < geo.out_h; ++oh) {
    std::fill(best, best + geo.out_w, lowest);
    std::fill(where, where + geo.out_w, 0);
    for (int64_t kh = 0; kh < geo.kernel; ++kh) {
      const T* row = padded + (oh * s + kh) * padded_w;
      for (int64_t kw = 0; kw < geo.kernel; ++kw) {
        const int32_t position = static_cast<int32_t>(kh * geo.kernel + kw);
        const T* tap = row + kw;
        // ATen's order and ties: row-major, a later element only where strictly greater or NaN
        // (the padding's -inf never wins: every window holds a ReLU output, >= 0 or NaN).
        for (int64_t ow = 0; ow < geo.out_w; ++ow) {
          const T v = tap[ow * s];
          const bool take = v > best[ow] || v != v;
          best[ow] = take ? v : best[ow];
          where[ow] = take ? position : where[ow];
        }
      }
    }
    std::copy(best, best + geo.out_w, out + oh * geo.out_w);
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      positions[oh * geo.out_w + ow] = static_cast<uint8_t>(where[ow]);
    }
  }
}

// The offset in its plane (the pixel ih * width + iw) of window (oh, ow)'s element `position`
// (kh * kernel + kw).
INVOLUTION_INLINE int64_t input_offset(const PoolGeometry& geo, int64_t oh, int64_t ow,
                                       uint8_t position) {
  return (oh * geo.stride - geo.pad) * geo.width + ow * geo.stride - geo.pad +
         geo.window_offsets[position];
}

// sum(g) and sum(g * (z - mean)) over channel c, g the pooled gradient where the pooled output
// is positive (the ReLU's mask), at the windows' argmaxes.
template <typename T>
INVOLUTION_INLINE std::pair<double, double> gradient_sums_impl(const PoolGeometry& geo,
                                                              const T* grad_out, const T* z,
                                                              const T* out,
                                                              const uint8_t* positions, T mean,
                                                              int64_t c) {
  // Lanes of independent sums (the loop is a chain of additions otherwise), no branches (the
  // ReLU's mask is a select: which windows it zeroes is data, not predictable).
  constexpr int LANES = 8;
  double sum[LANES] = {}, dot[LANES] = {};
  for (int64_t b = 0; b < geo.batch; ++b) {
    const int64_t plane = b * geo.channels + c;
    const T* zp = z + plane * geo.plane();
    const int64_t first = plane * geo.out_plane();
    for (int64_t oh = 0; oh < geo.out_h; ++oh) {
      for (int64_t ow = 0; ow < geo.out_w; ++ow) {
        const int64_t o = first + oh * geo.out_w + ow;
        const double g = out[o] > 0 ? static_cast<double>(grad_out[o]) : 0.0;
        const T value = zp[input_offset(geo, oh, ow, positions[o])];
        const double centred = static_cast<double>(value) - mean;
        sum[ow % LANES] += g;
        dot[ow % LANES] += g * centred;
      }
    }
  }
  for (int l = 1; l < LANES; ++l) {
    sum[0] += sum[l];
    dot[0] += dot[l];
  }
  return {sum[0], dot[0]};
}

// grad_z of plane (b, c): slope * (z - mean) + constant everywhere, plus k * g at the argmaxes.
template <typename T>
INVOLUTION_INLINE void gradient_plane_impl(const PoolGeometry& geo, const T* grad_out, const T* z,
                                           const T* out, const uint8_t* positions, T mean, T k,
                                           T slope, T constant, T* grad_z) {
  for (int64_t i = 0; i < geo.plane(); ++i) {
    grad_z[i] = (z[i] - mean) * slope + constant;
  }
  for (int64_t oh = 0; oh < geo.out_h; ++oh) {
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      const int64_t o = oh * geo.out_w + ow;
      grad_z[input_offset(geo, oh, ow, positions[o])] += out[o] > 0 ? k * grad_out[o] : T(0);
    }
  }
}

// channels_last maps (B, H, W, C): the loops run over the channels with unit stride.

// Image b's sums of z and z^2 per channel, into sum and squares (C,).
template <typename T>
INVOLUTION_INLINE void image_sums_cl_impl(const PoolGeometry& geo, const T* z, int64_t b,
                                          double* sum, double* squares) {
  const int64_t channels = geo.channels;
  std::fill(sum, sum + channels, 0.0);
  std::fill(squares, squares + channels, 0.0);
  const T* image = z + b * geo.plane() * channels;
  for (int64_t pixel = 0; pixel < geo.plane(); ++pixel) {
    const T* values = image + pixel * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double v = values[c];
      sum[c] += v;
      squares[c] += v * v;
    }
  }
}

// Output row (b, oh) pooled; best (out_w, C) and where (out_w, C) scratch, written to the
// pooled map (and positions) a channel at a time, so an NCHW map gets runs of out_w values.
template <typename T>
INVOLUTION_INLINE void pool_row_cl_impl(const PoolGeometry& geo, const T* z, const T* scale,
                                        const T* shift, T* out, uint8_t* positions, int64_t b,
                                        int64_t oh, T* best, int32_t* where) {
  const int64_t channels = geo.channels;
  const auto& st = geo.out_strides;
  std::fill(best, best + geo.out_w * channels, -std::numeric_limits<T>::infinity());
  std::fill(where, where + geo.out_w * channels, 0);
  for (int64_t ow = 0; ow < geo.out_w; ++ow) {
    T* best_c = best + ow * channels;
    int32_t* where_c = where + ow * channels;
    for (int64_t kh = 0; kh < geo.kernel; ++kh) {
      const int64_t ih = oh * geo.stride - geo.pad + kh;
      if (ih < 0 || ih >= geo.height) {
        continue;  // the padding's -inf never wins
      }
      for (int64_t kw = 0; kw < geo.kernel; ++kw) {
        const int64_t iw = ow * geo.stride - geo.pad + kw;
        if (iw < 0 || iw >= geo.width) {
          continue;
        }
        const int32_t position = static_cast<int32_t>(kh * geo.kernel + kw);
        const T* values = z + ((b * geo.height + ih) * geo.width + iw) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          T v = values[c] * scale[c] + shift[c];
          v = v < 0 ? T(0) : v;
          const bool take = v > best_c[c] || v != v;  // ATen's ties, as in pool_plane_impl
          best_c[c] = take ? v : best_c[c];
          where_c[c] = take ? position : where_c[c];
        }
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t first = b * st[0] + c * st[1] + oh * st[2];
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      out[first + ow * st[3]] = best[ow * channels + c];
      positions[first + ow * st[3]] = static_cast<uint8_t>(where[ow * channels + c]);
    }
  }
}

// Image b's sum(g) and sum(g * (z - mean)) per channel (as gradient_sums_impl), into sum and
// dot (C,). Pixels outside, channels inside: a window's pixels stay in cache for its channels.
template <typename T>
INVOLUTION_INLINE void image_gradient_sums_cl_impl(const PoolGeometry& geo, const T* grad_out,
                                                   const T* z, const T* out,
                                                   const uint8_t* positions, const T* mean,
                                                   int64_t b, double* sum, double* dot) {
  const int64_t channels = geo.channels;
  const auto& st = geo.out_strides;
  const T* image = z + b * geo.plane() * channels;
  std::fill(sum, sum + channels, 0.0);
  std::fill(dot, dot + channels, 0.0);
  for (int64_t oh = 0; oh < geo.out_h; ++oh) {
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      const int64_t first = b * st[0] + oh * st[2] + ow * st[3];
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t o = first + c * st[1];
        const double g = out[o] > 0 ? static_cast<double>(grad_out[o]) : 0.0;
        const T value = image[input_offset(geo, oh, ow, positions[o]) * channels + c];
        sum[c] += g;
        dot[c] += g * (static_cast<double>(value) - mean[c]);
      }
    }
  }
}

// Image b's grad_z (as gradient_plane_impl), every channel.
template <typename T>
INVOLUTION_INLINE void gradient_image_cl_impl(const PoolGeometry& geo, const T* grad_out,
                                              const T* z, const T* out, const uint8_t* positions,
                                              const T* mean, const T* k, const T* slope,
                                              const T* constant, int64_t b, T* grad_z) {
  const int64_t channels = geo.channels;
  const auto& st = geo.out_strides;
  const T* image = z + b * geo.plane() * channels;
  T* grad_image = grad_z + b * geo.plane() * channels;
  for (int64_t pixel = 0; pixel < geo.plane(); ++pixel) {
    const T* values = image + pixel * channels;
    T* grads = grad_image + pixel * channels;
    for (int64_t c = 0; c < channels; ++c) {
      grads[c] = (values[c] - mean[c]) * slope[c] + constant[c];
    }
  }
  for (int64_t oh = 0; oh < geo.out_h; ++oh) {
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      const int64_t first = b * st[0] + oh * st[2] + ow * st[3];
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t o = first + c * st[1];
        grad_image[input_offset(geo, oh, ow, positions[o]) * channels + c] +=
            out[o] > 0 ? k[c] * grad_out[o] : T(0);
      }
    }
  }
}

// The kernel branch's average pool, AvgPool2d(s, s, ceil_mode=True): windows of s x s at
// stride s, no padding, the last row and column of windows clipped to the map (divided by the
// values they hold, as ATen's). Each value is summed in ATen's order (row by row, left to right)
// and divided once, so the result is ATen's bitwise; backward adds each window's gradient share
// into the input's gradient in place (ATen's writes a zeroed map for a separate addition).

// NCHW plane: out (out_h, out_w).
template <typename T>
INVOLUTION_INLINE void average_plane_impl(const PoolGeometry& geo, const T* x, T* out) {
  const int64_t s = geo.stride;
  for (int64_t oh = 0; oh < geo.out_h; ++oh) {
    T* row = out + oh * geo.out_w;
    std::fill(row, row + geo.out_w, T(0));
    const int64_t h1 = std::min(oh * s + s, geo.height);
    for (int64_t ih = oh * s; ih < h1; ++ih) {
      const T* in = x + ih * geo.width;
      for (int64_t kw = 0; kw < s; ++kw) {
        const int64_t columns = (geo.width - kw + s - 1) / s;  // windows reaching column kw
        for (int64_t ow = 0; ow < columns; ++ow) {
          row[ow] += in[ow * s + kw];
        }
      }
    }
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      row[ow] /= static_cast<T>((h1 - oh * s) * (std::min(ow * s + s, geo.width) - ow * s));
    }
  }
}

// NCHW plane: grad_x (height, width) += each window's grad_out / its size. STRIDE as in
// pool_plane_impl.
template <typename T, int STRIDE>
INVOLUTION_INLINE void average_gradient_plane_impl(const PoolGeometry& geo, const T* grad_out,
                                                   T* grad_x, T* share) {
  const int64_t s = STRIDE > 0 ? STRIDE : geo.stride;
  for (int64_t oh = 0; oh < geo.out_h; ++oh) {
    const int64_t h1 = std::min(oh * s + s, geo.height);
    for (int64_t ow = 0; ow < geo.out_w; ++ow) {
      share[ow] = grad_out[oh * geo.out_w + ow] /
                  static_cast<T>((h1 - oh * s) * (std::min(ow * s + s, geo.width) - ow * s));
    }
    for (int64_t ih = oh * s; ih < h1; ++ih) {
      T* row = grad_x + ih * geo.width;
      for (int64_t kw = 0; kw < s; ++kw) {
        const int64_t columns = (geo.width - kw + s - 1) / s;  // windows reaching column kw
        for (int64_t ow = 0; ow < columns; ++ow) {
          row[ow * s + kw] += share[ow];
        }
      }
    }
  }
}

// channels_last output row (b, oh): out's (out_w, C) values of that row.
template <typename T>
INVOLUTION_INLINE void average_row_cl_impl(const PoolGeometry& geo, const T* x, T* out, int64_t b,
                                           int64_t oh) {
  const int64_t s = geo.stride, channels = geo.channels;
  const int64_t h1 = std::min(oh * s + s, geo.height);
  for (int64_t ow = 0; ow < geo.out_w; ++ow) {
    T* sums = out + ((b * geo.out_h + oh) * geo.out_w + ow) * channels;
    std::fill(sums, sums + channels, T(0));
    const int64_t w1 = std::min(ow * s + s, geo.width);
    for (int64_t ih = oh * s; ih < h1; ++ih) {
      for (int64_t iw = ow * s; iw < w1; ++iw) {
        const T* values = x + ((b * geo.height + ih) * geo.width + iw) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          sums[c] += values[c];
        }
      }
    }
    const T size = static_cast<T>((h1 - oh * s) * (w1 - ow * s));
    for (int64_t c = 0; c < channels; ++c) {
      sums[c] /= size;
    }
  }
}

// channels_last output row (b, oh): its windows' shares added into grad_x; share (C,) scratch.
template <typename T>
INVOLUTION_INLINE void average_gradient_row_cl_impl(const PoolGeometry& geo, const T* grad_out,
                                                    T* grad_x, int64_t b, int64_t oh, T* share) {
  const int64_t s = geo.stride, channels = geo.channels;
  const int64_t h1 = std::min(oh * s + s, geo.height);
  for (int64_t ow = 0; ow < geo.out_w; ++ow) {
    const int64_t w1 = std::min(ow * s + s, geo.width);
    const T size = static_cast<T>((h1 - oh * s) * (w1 - ow * s));
    const T* g = grad_out + ((b * geo.out_h + oh) * geo.out_w + ow) * channels;
    for (int64_t c = 0; c < channels; ++c) {
      share[c] = g[c] / size;
    }
    for (int64_t ih = oh * s; ih < h1; ++ih) {
      for (int64_t iw = ow * s; iw < w1; ++iw) {
        T* grads = grad_x + ((b * geo.height + ih) * geo.width + iw) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          grads[c] += share[c];
        }
      }
    }
  }
}

// Entry points compiled once per instruction set (INVOLUTION_TARGET_CLONES), for float and double.
#define INVOLUTION_DEFINE_POOL_KERNELS(T)                                                      \
  INVOLUTION_TARGET_CLONES std::pair<double, double> channel_sums(const PoolGeometry& geo,     \
                                                                  const T* z, int64_t c) {     \
    return channel_sums_impl<T>(geo, z, c);                                                     \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void pool_plane(const PoolGeometry& geo, const T* z, T scale,       \
                                           T shift, T* out, uint8_t* positions, T* padded,     \
                                           T* best, int32_t* where) {                          \
    if (geo.stride == 2) {                                                                      \
      pool_plane_impl<T, 2>(geo, z, scale, shift, out, positions, padded, best, where);         \
    } else {                                                                                    \
      pool_plane_impl<T, 0>(geo, z, scale, shift, out, positions, padded, best, where);         \
    }                                                                                           \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES std::pair<double, double> gradient_sums(                            \
      const PoolGeometry& geo, const T* grad_out, const T* z, const T* out,                    \
      const uint8_t* positions, T mean, int64_t c) {                                            \
    return gradient_sums_impl<T>(geo, grad_out, z, out, positions, mean, c);                    \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void gradient_plane(const PoolGeometry& geo, const T* grad_out,     \
                                               const T* z, const T* out,                       \
                                               const uint8_t* positions, T mean, T k, T slope, \
                                               T constant, T* grad_z) {                        \
    gradient_plane_impl<T>(geo, grad_out, z, out, positions, mean, k, slope, constant, grad_z); \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void image_sums_cl(const PoolGeometry& geo, const T* z, int64_t b,  \
                                              double* sum, double* squares) {                  \
    image_sums_cl_impl<T>(geo, z, b, sum, squares);                                             \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void pool_row_cl(const PoolGeometry& geo, const T* z,               \
                                            const T* scale, const T* shift, T* out,            \
                                            uint8_t* positions, int64_t b, int64_t oh,         \
                                            T* best, int32_t* where) {                         \
    pool_row_cl_impl<T>(geo, z, scale, shift, out, positions, b, oh, best, where);              \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void image_gradient_sums_cl(                                        \
      const PoolGeometry& geo, const T* grad_out, const T* z, const T* out,                    \
      const uint8_t* positions, const T* mean, int64_t b, double* sum, double* dot) {          \
    image_gradient_sums_cl_impl<T>(geo, grad_out, z, out, positions, mean, b, sum, dot);        \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void gradient_image_cl(                                             \
      const PoolGeometry& geo, const T* grad_out, const T* z, const T* out,                    \
      const uint8_t* positions, const T* mean, const T* k, const T* slope, const T* constant,  \
      int64_t b, T* grad_z) {                                                                   \
    gradient_image_cl_impl<T>(geo, grad_out, z, out, positions, mean, k, slope, constant, b,    \
                              grad_z);                                                          \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void average_plane(const PoolGeometry& geo, const T* x, T* out) {   \
    average_plane_impl<T>(geo, x, out);                                                         \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void average_gradient_plane(const PoolGeometry& geo,                \
                                                       const T* grad_out, T* grad_x,           \
                                                       T* share) {                             \
    if (geo.stride == 2) {                                                                      \
      average_gradient_plane_impl<T, 2>(geo, grad_out, grad_x, share);                          \
    } else {                                                                                    \
      average_gradient_plane_impl<T, 0>(geo, grad_out, grad_x, share);                          \
    }                                                                                           \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void average_row_cl(const PoolGeometry& geo, const T* x, T* out,    \
                                               int64_t b, int64_t oh) {                        \
    average_row_cl_impl<T>(geo, x, out, b, oh);                                                 \
  }                                                                                             \
  INVOLUTION_TARGET_CLONES void average_gradient_row_cl(const PoolGeometry& geo,               \
                                                        const T* grad_out, T* grad_x,          \
                                                        int64_t b, int64_t oh, T* share) {     \
    average_gradient_row_cl_impl<T>(geo, grad_out, grad_x, b, oh, share);                       \
  }

INVOLUTION_DEFINE_POOL_KERNELS(float)
INVOLUTION_DEFINE_POOL_KERNELS(double)

// Whether `input` is read as channels_last: contiguous in that layout and not NCHW-contiguous
// (one channel, or 1 x 1 maps, are both: NCHW then).
bool channels_last_input(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The pooled map's strides: NCHW, or channels_last where `channels_last_output`.
std::array<int64_t, 4> pooled_strides(const PoolGeometry& geo, bool channels_last_output) {
  const int64_t plane = geo.out_plane();
  if (channels_last_output) {
    return {plane * geo.channels, 1, geo.out_w * geo.channels, geo.channels};
  }
  return {geo.channels * plane, plane, geo.out_w, 1};
}

// The ops' map: 4-D, contiguous in NCHW or channels_last, float32 or float64.
void check_map(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 4 && (input.is_contiguous() || channels_last_input(input)), op,
              ": input must be a 4-D tensor contiguous in NCHW or channels_last, got shape ",
              input.sizes(), " and strides ", input.strides());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": input must be float32 or float64, got ", input.scalar_type());
}

PoolGeometry geometry_of(const at::Tensor& input, int64_t kernel, int64_t stride, int64_t pad,
                         bool channels_last_output) {
  check_map(input, "norm_relu_max_pool");
  TORCH_CHECK(!channels_last_output || channels_last_input(input),
              "norm_relu_max_pool: a channels_last output needs a channels_last input");
  TORCH_CHECK(kernel >= 1 && kernel * kernel <= 256 && stride >= 1 && pad >= 0 &&
                  2 * pad <= kernel,
              "norm_relu_max_pool: needs 1 <= kernel <= 16, stride >= 1 and 0 <= padding <= "
              "kernel / 2, got kernel ",
              kernel, ", stride ", stride, ", padding ", pad);
  PoolGeometry geo{input.size(0), input.size(1), input.size(2), input.size(3), 0, 0,
                   kernel,        stride,        pad,           {},            {}};
  for (int64_t kh = 0; kh < kernel; ++kh) {
    for (int64_t kw = 0; kw < kernel; ++kw) {
      geo.window_offsets.push_back(kh * geo.width + kw);
    }
  }
  geo.out_h = involution_common::output_size(geo.height, kernel, stride, pad, 1);
  geo.out_w = involution_common::output_size(geo.width, kernel, stride, pad, 1);
  TORCH_CHECK(geo.batch > 0 && geo.channels > 0 && geo.out_h > 0 && geo.out_w > 0,
              "norm_relu_max_pool: empty input or output, input shape ", input.sizes());
  TORCH_CHECK(geo.count() > 1,
              "norm_relu_max_pool: BatchNorm needs more than one value per channel, got input "
              "shape ",
              input.sizes());
  geo.out_strides = pooled_strides(geo, channels_last_output);
  return geo;
}

void check_channel_vector(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1) &&
                  t.scalar_type() == input.scalar_type() && t.device() == input.device(),
              "norm_relu_max_pool: ", name,
              " must be a (C,) tensor of the input's dtype and device, got ", t.sizes(), " ",
              t.scalar_type());
}

at::Tensor empty_pooled(const PoolGeometry& geo, const at::TensorOptions& options) {
  return at::empty_strided({geo.batch, geo.channels, geo.out_h, geo.out_w},
                           {geo.out_strides[0], geo.out_strides[1], geo.out_strides[2],
                            geo.out_strides[3]},
                           options);
}

// Sums of the images' per-channel partials (B, 2, C), in image order: deterministic.
std::vector<double> image_order_sums(const std::vector<double>& partials, int64_t batch,
                                     int64_t channels) {
  std::vector<double> sums(2 * channels, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < 2 * channels; ++i) {
      sums[i] += partials[b * 2 * channels + i];
    }
  }
  return sums;
}

// -> (pooled (B, C, H_out, W_out), positions uint8 (B, C, H_out, W_out), mean (C,), invstd (C,)).
// input NCHW or channels_last; pooled and positions NCHW, or channels_last where
// `channels_last_output` (channels_last inputs only).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_relu_max_pool(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
    int64_t kernel, int64_t stride, int64_t padding, bool channels_last_output) {
  const PoolGeometry geo = geometry_of(input, kernel, stride, padding, channels_last_output);
  const bool channels_last = channels_last_input(input);
  check_channel_vector(weight, input, "weight");
  check_channel_vector(bias, input, "bias");
  at::Tensor out = empty_pooled(geo, input.options());
  at::Tensor positions = empty_pooled(geo, input.options().dtype(at::kByte));
  at::Tensor mean = at::empty({geo.channels}, input.options());
  at::Tensor invstd = at::empty({geo.channels}, input.options());
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.contiguous();
  const int64_t channels = geo.channels;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "norm_relu_max_pool", [&] {
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    scalar_t* mean_ptr = mean.mutable_data_ptr<scalar_t>();
    scalar_t* invstd_ptr = invstd.mutable_data_ptr<scalar_t>();
    const auto set_statistics = [&](int64_t c, double sum, double squares) {
      const double m = sum / geo.count();
      const double variance = std::max(0.0, squares / geo.count() - m * m);
      mean_ptr[c] = static_cast<scalar_t>(m);
      invstd_ptr[c] = static_cast<scalar_t>(1.0 / std::sqrt(variance + eps));
    };
    if (channels_last) {
      std::vector<double> partials(geo.batch * 2 * channels);
      involution_common::parallel_chunks(geo.batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t image = begin; image < end; ++image) {
          double* sums = partials.data() + image * 2 * channels;
          image_sums_cl(geo, z, image, sums, sums + channels);
        }
      });
      const std::vector<double> sums = image_order_sums(partials, geo.batch, channels);
      for (int64_t c = 0; c < channels; ++c) {
        set_statistics(c, sums[c], sums[channels + c]);
      }
    } else {
      involution_common::parallel_chunks(channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const auto [sum, squares] = channel_sums(geo, z, c);
          set_statistics(c, sum, squares);
        }
      });
    }
    // ATen's BatchNorm's form of the affine map.
    std::vector<scalar_t> scale(channels), shift(channels);
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      scale[c] = invstd_ptr[c] * w_ptr[c];
      shift[c] = b_ptr[c] - mean_ptr[c] * scale[c];
    }
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    uint8_t* positions_ptr = positions.mutable_data_ptr<uint8_t>();
    if (channels_last) {
      involution_common::parallel_chunks(geo.batch * geo.out_h, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> best(geo.out_w * channels);
        std::vector<int32_t> where(geo.out_w * channels);
        for (int64_t row = begin; row < end; ++row) {
          pool_row_cl(geo, z, scale.data(), shift.data(), out_ptr, positions_ptr,
                      row / geo.out_h, row % geo.out_h, best.data(), where.data());
        }
      });
      return;
    }
    involution_common::parallel_chunks(geo.batch * channels, 4, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> padded(geo.padded_h() * geo.padded_w()), best(geo.out_w);
      std::vector<int32_t> where(geo.out_w);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        pool_plane(geo, z + plane * geo.plane(), scale[c], shift[c],
                   out_ptr + plane * geo.out_plane(), positions_ptr + plane * geo.out_plane(),
                   padded.data(), best.data(), where.data());
      }
    });
  });
  return {out, positions, mean, invstd};
}

// -> (grad_input (B, C, H, W) in the input's layout, grad_weight (C,), grad_bias (C,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_relu_max_pool_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
    const at::Tensor& positions, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, int64_t kernel, int64_t stride, int64_t padding) {
  const bool channels_last_output = output.dim() == 4 && !output.is_contiguous() &&
                                    output.is_contiguous(at::MemoryFormat::ChannelsLast);
  const PoolGeometry geo = geometry_of(input, kernel, stride, padding, channels_last_output);
  const bool channels_last = channels_last_input(input);
  const std::vector<int64_t> pooled{geo.batch, geo.channels, geo.out_h, geo.out_w};
  const auto format = channels_last_output ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous;
  TORCH_CHECK(output.sizes() == pooled && positions.sizes() == pooled &&
                  output.is_contiguous(format) && positions.is_contiguous(format) &&
                  output.scalar_type() == input.scalar_type() &&
                  positions.scalar_type() == at::kByte,
              "norm_relu_max_pool_backward: output and positions must be the forward's");
  check_channel_vector(mean, input, "mean");
  check_channel_vector(invstd, input, "invstd");
  check_channel_vector(weight, input, "weight");
  TORCH_CHECK(grad_output.sizes() == pooled,
              "norm_relu_max_pool_backward: grad_output must be of shape ", pooled, ", got ",
              grad_output.sizes());
  const at::Tensor g = grad_output.to(input.scalar_type()).contiguous(format);
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_weight = at::empty({geo.channels}, input.options());
  at::Tensor grad_bias = at::empty({geo.channels}, input.options());
  const int64_t channels = geo.channels;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "norm_relu_max_pool_backward", [&] {
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = output.const_data_ptr<scalar_t>();
    const uint8_t* where_ptr = positions.const_data_ptr<uint8_t>();
    const at::Tensor m = mean.contiguous(), s = invstd.contiguous(), w = weight.contiguous();
    const scalar_t* mean_ptr = m.const_data_ptr<scalar_t>();
    const scalar_t* invstd_ptr = s.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    scalar_t* gw_ptr = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb_ptr = grad_bias.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> slope(channels), constant(channels), k(channels);
    const auto set_coefficients = [&](int64_t c, double sum, double dot) {
      const double inv = invstd_ptr[c];
      const double scale = inv * w_ptr[c];
      gw_ptr[c] = static_cast<scalar_t>(dot * inv);
      gb_ptr[c] = static_cast<scalar_t>(sum);
      k[c] = static_cast<scalar_t>(scale);
      constant[c] = static_cast<scalar_t>(-scale * sum / geo.count());
      slope[c] = static_cast<scalar_t>(-scale * inv * inv * dot / geo.count());
    };
    scalar_t* gz = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      std::vector<double> partials(geo.batch * 2 * channels);
      involution_common::parallel_chunks(geo.batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t image = begin; image < end; ++image) {
          double* sums = partials.data() + image * 2 * channels;
          image_gradient_sums_cl(geo, g_ptr, z, out_ptr, where_ptr, mean_ptr, image, sums,
                                 sums + channels);
        }
      });
      const std::vector<double> sums = image_order_sums(partials, geo.batch, channels);
      for (int64_t c = 0; c < channels; ++c) {
        set_coefficients(c, sums[c], sums[channels + c]);
      }
      involution_common::parallel_chunks(geo.batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t image = begin; image < end; ++image) {
          gradient_image_cl(geo, g_ptr, z, out_ptr, where_ptr, mean_ptr, k.data(),
                            slope.data(), constant.data(), image, gz);
        }
      });
      return;
    }
    involution_common::parallel_chunks(channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const auto [sum, dot] = gradient_sums(geo, g_ptr, z, out_ptr, where_ptr, mean_ptr[c], c);
        set_coefficients(c, sum, dot);
      }
    });
    involution_common::parallel_chunks(geo.batch * channels, 4, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const int64_t o = plane * geo.out_plane();
        gradient_plane(geo, g_ptr + o, z + plane * geo.plane(), out_ptr + o, where_ptr + o,
                       mean_ptr[c], k[c], slope[c], constant[c], gz + plane * geo.plane());
      }
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

// The average pool's geometry: kernel = stride, no padding, ceil mode.
PoolGeometry average_geometry(const at::Tensor& input, int64_t stride) {
  check_map(input, "average_pool");
  TORCH_CHECK(stride >= 1, "average_pool: stride must be positive, got ", stride);
  PoolGeometry geo{input.size(0), input.size(1), input.size(2), input.size(3), 0, 0,
                   stride,        stride,        0,             {},            {}};
  geo.out_h = (geo.height + stride - 1) / stride;
  geo.out_w = (geo.width + stride - 1) / stride;
  geo.out_strides = pooled_strides(geo, channels_last_input(input));
  return geo;
}

// (B, C, H, W) -> (B, C, ceil(H / s), ceil(W / s)) in the input's layout: F.avg_pool2d(input, s,
// s, ceil_mode=True)'s values bitwise.
at::Tensor average_pool(const at::Tensor& input, int64_t stride) {
  const PoolGeometry geo = average_geometry(input, stride);
  at::Tensor out = empty_pooled(geo, input.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "average_pool", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    if (channels_last_input(input)) {
      involution_common::parallel_chunks(geo.batch * geo.out_h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          average_row_cl(geo, x, out_ptr, row / geo.out_h, row % geo.out_h);
        }
      });
      return;
    }
    involution_common::parallel_chunks(geo.batch * geo.channels, 4, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        average_plane(geo, x + plane * geo.plane(), out_ptr + plane * geo.out_plane());
      }
    });
  });
  return out;
}

// grad_input += avg_pool2d_backward(grad_output, ...) in place (grad_input: the pool's input's
// shape and layout, float32 or float64).
void average_pool_backward_add_(at::Tensor grad_input, const at::Tensor& grad_output,
                                int64_t stride) {
  const PoolGeometry geo = average_geometry(grad_input, stride);
  const bool channels_last = channels_last_input(grad_input);
  const std::vector<int64_t> pooled{geo.batch, geo.channels, geo.out_h, geo.out_w};
  TORCH_CHECK(grad_output.sizes() == pooled,
              "average_pool_backward_add_: grad_output must be of shape (", geo.batch, ", ",
              geo.channels, ", ", geo.out_h, ", ", geo.out_w, "), got ", grad_output.sizes());
  const at::Tensor g = grad_output.to(grad_input.scalar_type())
                           .contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                                     : at::MemoryFormat::Contiguous);
  if (g.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "average_pool_backward_add_", [&] {
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      involution_common::parallel_chunks(geo.batch * geo.out_h, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> share(geo.channels);
        for (int64_t row = begin; row < end; ++row) {
          average_gradient_row_cl(geo, g_ptr, gx, row / geo.out_h, row % geo.out_h, share.data());
        }
      });
      return;
    }
    involution_common::parallel_chunks(geo.batch * geo.channels, 4, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> share(geo.out_w);
      for (int64_t plane = begin; plane < end; ++plane) {
        average_gradient_plane(geo, g_ptr + plane * geo.out_plane(), gx + plane * geo.plane(),
                               share.data());
      }
    });
  });
}

}  // namespace involution_pool_cpu

TORCH_LIBRARY(involution_pool_cpu, m) {
  m.def("norm_relu_max_pool(Tensor input, Tensor weight, Tensor bias, float eps, int kernel_size, "
        "int stride, int padding, bool channels_last_output=False) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("norm_relu_max_pool_backward(Tensor grad_output, Tensor input, Tensor output, "
        "Tensor positions, Tensor mean, Tensor invstd, Tensor weight, int kernel_size, "
        "int stride, int padding) -> (Tensor, Tensor, Tensor)");
  m.def("average_pool(Tensor input, int stride) -> Tensor");
  m.def("average_pool_backward_add_(Tensor(a!) grad_input, Tensor grad_output, int stride) -> ()");
}

TORCH_LIBRARY_IMPL(involution_pool_cpu, CPU, m) {
  m.impl("norm_relu_max_pool", &involution_pool_cpu::norm_relu_max_pool);
  m.impl("norm_relu_max_pool_backward", &involution_pool_cpu::norm_relu_max_pool_backward);
  m.impl("average_pool", &involution_pool_cpu::average_pool);
  m.impl("average_pool_backward_add_", &involution_pool_cpu::average_pool_backward_add_);
}
