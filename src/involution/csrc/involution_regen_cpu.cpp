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
//   region); the aggregation's two gradients are the loops below, over channels_last maps so the
//   innermost loop runs over a group's C/G channels with unit stride (a compile-time 16 for
//   RedNet).
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

#ifdef INVOLUTION_VECTOR_KERNELS
// grad_h at one tap of group g for the NJ pixels j0.. of an output row (16 channels per group):
// their 16-channel products of grad_y and the input reduced together (lane_sums), about one add
// per value instead of a horizontal sum each. `gy_row` points at the row's grad_y (group g),
// `in` at the input pixel read by output column 0, `gh_tap` at the tap's grad_h of column 0.
template <typename T, int NJ>
INVOLUTION_INLINE void kernel_gradient_block16(
    const SpanGeometry& geo, const T* __restrict gy_row, const T* __restrict in, int64_t j0,
    T* __restrict gh_tap) {
  using involution_common::load16;
  using involution_common::V16;
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
#endif

// grad_h[p, g, kh, kw] = sum_{c in g} grad_y[b, i, j, c] * x[b, ih, iw, c] (zero where the tap
// reads padding) for the pixels p = (i - i0) * W_out + j of the output rows [i0, i1) of image b,
// and grad_b1 += grad_h summed over them. `x` and `grad_y` are channels_last.
template <typename T, int64_t CG>
INVOLUTION_INLINE void kernel_gradient_rows_impl(
    const SpanGeometry& geo, const T* __restrict x, const T* __restrict grad_y,
    T* __restrict grad_h, T* __restrict grad_b1, int64_t b, int64_t i0, int64_t i1) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  const int64_t k = geo.kernel;
  for (int64_t i = i0; i < i1; ++i) {
    T* __restrict gh_row = grad_h + (i - i0) * geo.out_w * geo.kernels;
    for (int64_t g = 0; g < geo.groups; ++g) {
      const T* gy_row = grad_y + ((b * geo.out_h + i) * geo.out_w) * pixel + g * cg;
      for (int64_t kh = 0; kh < k; ++kh) {
        const int64_t ih = geo.input_row(i, kh);
        const bool row_inside = ih >= 0 && ih < geo.height;
        const T* x_row = x + ((b * geo.height + ih) * geo.width) * pixel + g * cg;
        for (int64_t kw = 0; kw < k; ++kw) {
          T* gh_tap = gh_row + g * geo.taps + kh * k + kw;
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
#ifdef INVOLUTION_VECTOR_KERNELS
          if constexpr (CG == 16) {
            involution_common::for_column_blocks<16>(
                geo.tap_blocks[kw], [&](auto nj, int64_t j0) INVOLUTION_LAMBDA_INLINE {
                  kernel_gradient_block16<T, decltype(nj)::value>(geo, gy_row, in,
                                                                  cols.lo + j0, gh_tap);
                });
            continue;
          }
#endif
          for (int64_t j = cols.lo; j < cols.hi; ++j) {
            gh_tap[j * geo.kernels] =
                involution_common::dot(gy_row + j * pixel, in + j * geo.stride * pixel, cg);
          }
        }
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

// The (W, C) row of grad_x at input row ih of image b: sum over the taps (kh, kw) and output
// pixels (i, j) that read it of h[i, j, g(c), kh, kw] * grad_y[b, i, j, c]. `h` holds the
// kernels of output rows lo.. pixel-major ((rows, W_out, G, K, K)); `row` is (W, C) scratch.
template <typename T, int64_t CG>
INVOLUTION_INLINE void input_gradient_row_impl(
    const SpanGeometry& geo, const T* __restrict grad_y, const T* __restrict h, int64_t lo,
    int64_t b, int64_t ih, T* __restrict row) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  const int64_t k = geo.kernel;
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

// Entry points compiled once per instruction set, with the group width a compile-time 16 for
// RedNet's groups.
#define INVOLUTION_REGEN_KERNELS(T)                                                            \
  INVOLUTION_TARGET_CLONES void kernel_gradient_rows(                                          \
      const SpanGeometry& geo, const T* x, const T* grad_y, T* grad_h, T* grad_b1, int64_t b, \
      int64_t i0, int64_t i1) {                                                                \
    if (geo.group_channels == 16) {                                                            \
      kernel_gradient_rows_impl<T, 16>(geo, x, grad_y, grad_h, grad_b1, b, i0, i1);            \
    } else {                                                                                   \
      kernel_gradient_rows_impl<T, 0>(geo, x, grad_y, grad_h, grad_b1, b, i0, i1);             \
    }                                                                                          \
  }                                                                                            \
  INVOLUTION_TARGET_CLONES void input_gradient_row(const SpanGeometry& geo, const T* grad_y,   \
                                                   const T* h, int64_t lo, int64_t b,          \
                                                   int64_t ih, T* row) {                       \
    if (geo.group_channels == 16) {                                                            \
      input_gradient_row_impl<T, 16>(geo, grad_y, h, lo, b, ih, row);                          \
    } else {                                                                                   \
      input_gradient_row_impl<T, 0>(geo, grad_y, h, lo, b, ih, row);                           \
    }                                                                                          \
  }
INVOLUTION_REGEN_KERNELS(float)
INVOLUTION_REGEN_KERNELS(double)
#undef INVOLUTION_REGEN_KERNELS

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

// The operands of one call: feature maps channels_last in the compute dtype, as (pixels,
// channels) matrices where the dense steps read them.
struct SpanOperands {
  at::Tensor x, grad_y;                 // (B, H, W, C), (B, H_out, W_out, C) in memory
  at::Tensor activated;                 // (B*H_out*W_out, M)
  at::Tensor span_weight;               // (G*K*K, M)
  std::optional<at::Tensor> span_bias;  // (G*K*K,)
  at::Tensor grad_x;                    // (B, C, H, W) in the result layout, or undefined
  at::Tensor grad_activated;            // (B*H_out*W_out, M): (B, M, H_out, W_out) channels_last
  at::Tensor grad_w1, grad_b1;          // (tasks, G*K*K, M), (tasks, G*K*K): per-task partials
};

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
  const int64_t first_pixel = band.b * geo.out_h * geo.out_w;
  // The band's kernels h (rows lo..hi, pixel-major) for grad_x: one matrix product.
  at::Tensor h;
  if (ops.grad_x.defined()) {
    const at::Tensor a = ops.activated.narrow(0, first_pixel + band.lo * geo.out_w,
                                              (band.hi - band.lo) * geo.out_w);
    h = ops.span_bias.has_value() ? at::addmm(*ops.span_bias, a, ops.span_weight.t())
                                  : at::mm(a, ops.span_weight.t());
  }
  // grad_h chunk by chunk of the own rows: grad_a, grad_W1 and grad_b1 from it.
  at::Tensor grad_w1 = ops.grad_w1.select(0, task);
  at::Tensor grad_b1 = ops.grad_b1.select(0, task);
  grad_w1.zero_();
  grad_b1.zero_();
  const int64_t step = chunk_rows(geo, sizeof(T));
  at::Tensor grad_h = at::empty({std::min(step, band.i1 - band.i0) * geo.out_w, geo.kernels},
                                ops.activated.options());
  const T* x = ops.x.const_data_ptr<T>();
  const T* grad_y = ops.grad_y.const_data_ptr<T>();
  for (int64_t i = band.i0; i < band.i1; i += step) {
    const int64_t rows = std::min(step, band.i1 - i);
    const int64_t pixels = rows * geo.out_w;
    const int64_t start = first_pixel + i * geo.out_w;
    at::Tensor gh = grad_h.narrow(0, 0, pixels);
    kernel_gradient_rows(geo, x, grad_y, gh.mutable_data_ptr<T>(), grad_b1.mutable_data_ptr<T>(),
                         band.b, i, i + rows);
    const at::Tensor a = ops.activated.narrow(0, start, pixels);
    at::Tensor grad_a = ops.grad_activated.narrow(0, start, pixels);
    at::mm_out(grad_a, gh, ops.span_weight);
    grad_w1.addmm_(gh.t(), a);
  }
  if (!ops.grad_x.defined()) {
    return;
  }
  std::vector<T> row(geo.width * geo.channels);
  for (int64_t ih = band.r0; ih < band.r1; ++ih) {
    input_gradient_row(geo, grad_y, h.const_data_ptr<T>(), band.lo, band.b, ih, row.data());
    store_input_row(geo, row.data(), ops.grad_x.mutable_data_ptr<T>(), band.b, ih);
  }
}

// Bands of output rows per image: whole images when the batch gives every thread about four
// tasks, else as many bands as that takes (a band's halo of regenerated kernels costs
// (K-1)*d/s rows of the span conv).
void set_bands(SpanGeometry& geo) {
  const int64_t wanted = 4 * at::get_num_threads();
  const int64_t bands = std::max<int64_t>(
      1, std::min(geo.out_h, (wanted + geo.batch - 1) / std::max<int64_t>(1, geo.batch)));
  geo.band_rows = (geo.out_h + bands - 1) / bands;
  geo.bands = (geo.out_h + geo.band_rows - 1) / std::max<int64_t>(1, geo.band_rows);
}

// The fused backward. input (B, C, H, W), grad_output (B, C, H_out, W_out), activated (B, M,
// H_out, W_out), span_weight (G*K*K, M[, 1, 1]), span_bias (G*K*K,) or None; padding
// dilation * (K - 1) / 2. Returns (grad_input (B, C, H, W) in the input's layout, or an empty
// tensor without needs_input; grad_activated (B, M, H_out, W_out) channels_last; grad_span_weight
// (G*K*K, M); grad_span_bias (G*K*K,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> span_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& activated,
    const at::Tensor& span_weight, const std::optional<at::Tensor>& span_bias,
    int64_t kernel_size, int64_t stride, int64_t dilation, bool needs_input) {
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
  // ops.layout.memory_format_of: channels_last only when not also contiguous.
  geo.channels_last_result =
      !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  set_bands(geo);
  const int64_t tasks = geo.batch * geo.bands;

  const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
  SpanOperands ops;
  ops.x = input.contiguous(cl);
  ops.grad_y = grad_output.contiguous(cl);
  ops.activated = activated.contiguous(cl).permute({0, 2, 3, 1}).reshape({-1, geo.reduced});
  ops.span_weight = w1;
  if (span_bias.has_value() && span_bias->defined()) {
    TORCH_CHECK(span_bias->numel() == geo.kernels && span_bias->scalar_type() == dtype,
                "involution span_backward: span_bias of ", geo.kernels, " values expected");
    ops.span_bias = span_bias->contiguous();
  }
  const at::TensorOptions options = input.options();
  at::Tensor grad_activated =
      at::empty({geo.batch, geo.reduced, geo.out_h, geo.out_w}, options.memory_format(cl));
  ops.grad_activated = grad_activated.permute({0, 2, 3, 1}).view({-1, geo.reduced});
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
  return {needs_input ? ops.grad_x : at::empty({0}, options), grad_activated, ops.grad_w1.sum(0),
          ops.grad_b1.sum(0)};
}

}  // namespace involution_regen_cpu

TORCH_LIBRARY(involution_regen_cpu, m) {
  m.def("span_backward(Tensor grad_output, Tensor input, Tensor activated, Tensor span_weight, "
        "Tensor? span_bias, int kernel_size, int stride, int dilation, bool needs_input) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(involution_regen_cpu, CPU, m) {
  m.impl("span_backward", &involution_regen_cpu::span_backward);
}
