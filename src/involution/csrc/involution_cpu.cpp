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
//   grad_weight sums over those channels; for 16 channels the sum is a tree of vector adds.
//   The output and grad_input rows are accumulated in a small per-thread buffer and written in
//   the input's layout (NCHW or channels_last), so they need no conversion afterwards.
// - For each kernel column kw the range of output columns j whose input column j*s + kw*d - p lies
//   inside the image is computed once, so the inner loops have no bounds checks.
// - float32 and float64 are computed natively; float16 and bfloat16 are converted to float32 for
//   the computation (fp32 accumulation) and the result is converted back.
// - On x86-64 with GCC or Clang the hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64
//   and the best version is picked at load time (function multi-versioning), so the extension
//   stays portable while using the wide vector units of the machine it runs on.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define INVOLUTION_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INVOLUTION_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define INVOLUTION_INLINE inline __attribute__((always_inline))
#else
#define INVOLUTION_INLINE inline
#endif

namespace involution_cpu {

using Pair = std::array<int64_t, 2>;

// Sizes and convolution parameters shared by the three kernels.
struct Geometry {
  int64_t batch, channels, height, width;
  int64_t groups, group_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  // Layout of the forward output and of grad_input: that of the input, so that the caller does
  // not have to convert them (channels_last, or NCHW contiguous when false).
  bool channels_last_result;

  // Offset of weight[b, g, kh, kw, i, 0] in the contiguous (B, G, Kh, Kw, H_out, W_out) weight.
  int64_t weight_row(int64_t b, int64_t g, int64_t kh, int64_t kw, int64_t i) const {
    return ((((b * groups + g) * kernel_h + kh) * kernel_w + kw) * out_h + i) * out_w;
  }
  // Offset of x[b, g * C/G, h, 0] in a channels_last (B, H, W, C) map of width `row_width`.
  int64_t pixel_row(int64_t b, int64_t g, int64_t h, int64_t rows, int64_t row_width) const {
    return ((b * rows + h) * row_width) * channels + g * group_channels;
  }
  // Work (multiply-adds) of one task, used to size the parallel chunks.
  int64_t task_work() const { return kernel_h * kernel_w * out_w * group_channels; }
};

// Output columns j in [lo, hi) whose input column j * stride + offset lies in [0, width).
struct ColumnRange {
  int64_t lo, hi;
};

INVOLUTION_INLINE ColumnRange valid_columns(
    int64_t offset, int64_t stride, int64_t width, int64_t out_w) {
  const int64_t lo = offset >= 0 ? 0 : std::min(out_w, (-offset + stride - 1) / stride);
  const int64_t last = width - 1 - offset;
  const int64_t hi = last < 0 ? 0 : std::min(out_w, last / stride + 1);
  return {lo, std::max(lo, hi)};  // empty when no column is inside
}

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

// y[b, i, j, g-slice] = sum_{kh, kw} w[b, g, kh, kw, i, j] * x[b, ih, iw, g-slice]
// for the tasks (b, g, i) in [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void forward_tasks_impl(
    const Geometry& geo, const T* __restrict x, const T* __restrict w, T* __restrict y,
    int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;  // channels_last stride between neighbouring pixels
  std::vector<T> acc_row(geo.out_w * cg);  // the task's output row, (W_out, C/G)
  for (int64_t task = begin; task < end; ++task) {
    const int64_t i = task % geo.out_h;
    const int64_t g = (task / geo.out_h) % geo.groups;
    const int64_t b = task / (geo.out_h * geo.groups);
    std::fill(acc_row.begin(), acc_row.end(), T(0));
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      const int64_t ih = i * geo.stride_h - geo.pad_h + kh * geo.dil_h;
      if (ih < 0 || ih >= geo.height) {
        continue;
      }
      const T* __restrict in_row = x + geo.pixel_row(b, g, ih, geo.height, geo.width);
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        const int64_t offset = kw * geo.dil_w - geo.pad_w;
        const ColumnRange cols = valid_columns(offset, geo.stride_w, geo.width, geo.out_w);
        const T* __restrict w_row = w + geo.weight_row(b, g, kh, kw, i);
        for (int64_t j = cols.lo; j < cols.hi; ++j) {
          const T weight = w_row[j];
          const T* __restrict in = in_row + (j * geo.stride_w + offset) * pixel;
          T* __restrict acc = acc_row.data() + j * cg;
#pragma omp simd  // acc and in never overlap
          for (int64_t c = 0; c < cg; ++c) {
            acc[c] += weight * in[c];
          }
        }
      }
    }
    store_row(geo, acc_row.data(), y, b, g, i, geo.out_h, geo.out_w, cg);
  }
}

// grad_x[b, ih, iw, g-slice] = sum over (kh, kw, i, j) that read (ih, iw) of
// w[b, g, kh, kw, i, j] * grad_y[b, i, j, g-slice], for the tasks (b, g, ih) in [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void backward_input_tasks_impl(
    const Geometry& geo, const T* __restrict grad_y, const T* __restrict w,
    T* __restrict grad_x, int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  std::vector<T> acc_row(geo.width * cg);  // the task's grad_input row, (W, C/G)
  for (int64_t task = begin; task < end; ++task) {
    const int64_t ih = task % geo.height;
    const int64_t g = (task / geo.height) % geo.groups;
    const int64_t b = task / (geo.height * geo.groups);
    std::fill(acc_row.begin(), acc_row.end(), T(0));
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      // The output row i that reads input row ih through kernel row kh, if any.
      const int64_t shifted = ih + geo.pad_h - kh * geo.dil_h;
      if (shifted < 0 || shifted % geo.stride_h != 0 || shifted / geo.stride_h >= geo.out_h) {
        continue;
      }
      const int64_t i = shifted / geo.stride_h;
      const T* __restrict gy_row = grad_y + geo.pixel_row(b, g, i, geo.out_h, geo.out_w);
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        const int64_t offset = kw * geo.dil_w - geo.pad_w;
        const ColumnRange cols = valid_columns(offset, geo.stride_w, geo.width, geo.out_w);
        const T* __restrict w_row = w + geo.weight_row(b, g, kh, kw, i);
        for (int64_t j = cols.lo; j < cols.hi; ++j) {
          const T weight = w_row[j];
          const T* __restrict gy = gy_row + j * pixel;
          T* __restrict acc = acc_row.data() + (j * geo.stride_w + offset) * cg;
#pragma omp simd  // acc and gy never overlap
          for (int64_t c = 0; c < cg; ++c) {
            acc[c] += weight * gy[c];
          }
        }
      }
    }
    store_row(geo, acc_row.data(), grad_x, b, g, ih, geo.height, geo.width, cg);
  }
}

#if defined(__GNUC__) || defined(__clang__)
// A GCC/Clang vector of N values of T, compiled to the widest registers of the target.
template <typename T, int64_t N>
struct Vector {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

// The sum of the N lanes of v, added as a balanced tree of vector adds (halving the width each
// step): log2(N) dependent adds instead of the chain of N scalar adds that the compiler emits for
// a plain loop without -ffast-math.
template <typename T, int64_t N>
INVOLUTION_INLINE T sum_lanes(typename Vector<T, N>::type v) {
  if constexpr (N == 2) {
    return v[0] + v[1];
  } else {
    using Half = typename Vector<T, N / 2>::type;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return sum_lanes<T, N / 2>(low + high);
  }
}
#define INVOLUTION_VECTOR_DOT 1
#endif

// sum_{c < n} a[c] * b[c] (n == CG when CG > 0).
template <typename T, int64_t CG>
INVOLUTION_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
#ifdef INVOLUTION_VECTOR_DOT
  if constexpr (CG >= 2 && (CG & (CG - 1)) == 0) {
    typename Vector<T, CG>::type va, vb;
    std::memcpy(&va, a, sizeof(va));
    std::memcpy(&vb, b, sizeof(vb));
    return sum_lanes<T, CG>(va * vb);
  }
#endif
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    sum += a[c] * b[c];
  }
  return sum;
}

// grad_w[b, g, kh, kw, i, j] = sum_{c in g} grad_y[b, i, j, c] * x[b, ih, iw, c] (zero where
// (ih, iw) is padding), for the tasks (b, g, i) in [begin, end).
template <typename T, int64_t CG>
INVOLUTION_INLINE void backward_weight_tasks_impl(
    const Geometry& geo, const T* __restrict grad_y, const T* __restrict x,
    T* __restrict grad_w, int64_t begin, int64_t end) {
  const int64_t cg = CG > 0 ? CG : geo.group_channels;
  const int64_t pixel = geo.channels;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t i = task % geo.out_h;
    const int64_t g = (task / geo.out_h) % geo.groups;
    const int64_t b = task / (geo.out_h * geo.groups);
    const T* __restrict gy_row = grad_y + geo.pixel_row(b, g, i, geo.out_h, geo.out_w);
    for (int64_t kh = 0; kh < geo.kernel_h; ++kh) {
      const int64_t ih = i * geo.stride_h - geo.pad_h + kh * geo.dil_h;
      const bool row_inside = ih >= 0 && ih < geo.height;
      const T* __restrict in_row =
          row_inside ? x + geo.pixel_row(b, g, ih, geo.height, geo.width) : nullptr;
      for (int64_t kw = 0; kw < geo.kernel_w; ++kw) {
        T* __restrict gw_row = grad_w + geo.weight_row(b, g, kh, kw, i);
        if (!row_inside) {
          std::fill_n(gw_row, geo.out_w, T(0));
          continue;
        }
        const int64_t offset = kw * geo.dil_w - geo.pad_w;
        const ColumnRange cols = valid_columns(offset, geo.stride_w, geo.width, geo.out_w);
        std::fill_n(gw_row, cols.lo, T(0));
        std::fill(gw_row + cols.hi, gw_row + geo.out_w, T(0));
        for (int64_t j = cols.lo; j < cols.hi; ++j) {
          const T* __restrict gy = gy_row + j * pixel;
          const T* __restrict in = in_row + (j * geo.stride_w + offset) * pixel;
          gw_row[j] = dot<T, CG>(gy, in, cg);
        }
      }
    }
  }
}

// Non-template entry points, one per compute type, compiled once per instruction set. Groups of
// 16 channels (RedNet's width) get kernels where that width is a compile-time constant.
#define INVOLUTION_DEFINE_KERNEL(NAME, T, A, B, OUT)                                         \
  INVOLUTION_TARGET_CLONES void NAME(                                                      \
      const Geometry& geo, const T* A, const T* B, T* OUT, int64_t begin, int64_t end) {   \
    if (geo.group_channels == 16) {                                                        \
      NAME##_impl<T, 16>(geo, A, B, OUT, begin, end);                                      \
    } else {                                                                               \
      NAME##_impl<T, 0>(geo, A, B, OUT, begin, end);                                       \
    }                                                                                      \
  }
#define INVOLUTION_DEFINE_KERNELS(T)                                 \
  INVOLUTION_DEFINE_KERNEL(forward_tasks, T, x, w, y)                \
  INVOLUTION_DEFINE_KERNEL(backward_input_tasks, T, grad_y, w, grad_x) \
  INVOLUTION_DEFINE_KERNEL(backward_weight_tasks, T, grad_y, x, grad_w)

INVOLUTION_DEFINE_KERNELS(float)
INVOLUTION_DEFINE_KERNELS(double)
#undef INVOLUTION_DEFINE_KERNELS
#undef INVOLUTION_DEFINE_KERNEL

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
  geo.stride_h = stride[0];
  geo.stride_w = stride[1];
  geo.pad_h = padding[0];
  geo.pad_w = padding[1];
  geo.dil_h = dilation[0];
  geo.dil_w = dilation[1];
  TORCH_CHECK(weight.size(0) == geo.batch, "involution: weight batch ", weight.size(0),
              " != input batch ", geo.batch);
  TORCH_CHECK(geo.groups >= 1 && geo.channels % geo.groups == 0, "involution: groups ",
              geo.groups, " must divide channels ", geo.channels);
  geo.group_channels = geo.channels / geo.groups;
  geo.channels_last_result = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto out_size = [](int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
    return (n + 2 * p - d * (k - 1) - 1) / s + 1;
  };
  TORCH_CHECK(
      geo.out_h == out_size(geo.height, geo.kernel_h, geo.stride_h, geo.pad_h, geo.dil_h) &&
          geo.out_w == out_size(geo.width, geo.kernel_w, geo.stride_w, geo.pad_w, geo.dil_w),
      "involution: weight ", weight.sizes(), " does not match input ", input.sizes());
  return geo;
}

at::ScalarType compute_type(at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "involution: unsupported dtype ", dtype);
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::MemoryFormat result_format(const Geometry& geo) {
  return geo.channels_last_result ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// `t` as a channels_last tensor of the compute dtype (a no-op when it already is one).
at::Tensor as_channels_last(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::ChannelsLast);
}

// Runs body(begin, end) over the tasks [0, total) on the intra-op threads. Chunks of at least
// ~32k multiply-adds are handed out on demand rather than split up front, so a thread that is
// slowed down (e.g. by other processes on the machine) does not hold the others back, and tiny
// problems stay on the calling thread.
template <typename Body>
void parallel_tasks(const Geometry& geo, int64_t total, const Body& body) {
  const int64_t chunk =
      std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, geo.task_work()));
  const int64_t chunks = (total + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    body(0, total);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t start = next.fetch_add(chunk); start < total; start = next.fetch_add(chunk)) {
      body(start, std::min(total, start + chunk));
    }
  });
}

at::Tensor forward(
    const at::Tensor& input, const at::Tensor& weight, Pair stride, Pair padding, Pair dilation) {
  const Geometry geo = make_geometry(input, weight, stride, padding, dilation);
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor x = as_channels_last(input, dtype);
  const at::Tensor w = weight.to(dtype).contiguous();
  at::Tensor y = at::empty({geo.batch, geo.channels, geo.out_h, geo.out_w},
                           x.options().memory_format(result_format(geo)));
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution_cpu_forward", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    parallel_tasks(geo, geo.batch * geo.groups * geo.out_h, [&](int64_t begin, int64_t end) {
      forward_tasks(geo, x_ptr, w_ptr, y_ptr, begin, end);
    });
  });
  return y.to(input.scalar_type());
}

at::Tensor backward_input(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation) {
  const Geometry geo = make_geometry(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({geo.batch, geo.channels, geo.out_h,
                                                       geo.out_w}),
              "involution: grad_output ", grad_output.sizes(), " does not match the output");
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor grad_y = as_channels_last(grad_output, dtype);
  const at::Tensor w = weight.to(dtype).contiguous();
  at::Tensor grad_x =
      at::empty(input.sizes(), grad_y.options().memory_format(result_format(geo)));
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution_cpu_backward_input", [&] {
    const scalar_t* gy_ptr = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    parallel_tasks(geo, geo.batch * geo.groups * geo.height, [&](int64_t begin, int64_t end) {
      backward_input_tasks(geo, gy_ptr, w_ptr, gx_ptr, begin, end);
    });
  });
  return grad_x.to(input.scalar_type());
}

at::Tensor backward_weight(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation) {
  const Geometry geo = make_geometry(input, weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({geo.batch, geo.channels, geo.out_h,
                                                       geo.out_w}),
              "involution: grad_output ", grad_output.sizes(), " does not match the output");
  const at::ScalarType dtype = compute_type(input.scalar_type());
  const at::Tensor grad_y = as_channels_last(grad_output, dtype);
  const at::Tensor x = as_channels_last(input, dtype);
  at::Tensor grad_w = at::empty(weight.sizes(), x.options().memory_format(
                                                    at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(dtype, "involution_cpu_backward_weight", [&] {
    const scalar_t* gy_ptr = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* gw_ptr = grad_w.mutable_data_ptr<scalar_t>();
    parallel_tasks(geo, geo.batch * geo.groups * geo.out_h, [&](int64_t begin, int64_t end) {
      backward_weight_tasks(geo, gy_ptr, x_ptr, gw_ptr, begin, end);
    });
  });
  return grad_w.to(weight.scalar_type());
}

// Both gradients. grad_output and the input are converted to channels_last (and the compute
// dtype) once for the two kernels, which then find them already converted.
std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, Pair stride,
    Pair padding, Pair dilation) {
  const at::ScalarType dtype = compute_type(input.scalar_type());
  if (input.scalar_type() != dtype) {  // half types: each kernel converts its own operands
    return {backward_input(grad_output, input, weight, stride, padding, dilation),
            backward_weight(grad_output, input, weight, stride, padding, dilation)};
  }
  const at::Tensor grad_y = as_channels_last(grad_output, dtype);
  // grad_input takes its layout from `input`, so it gets the original; grad_weight is contiguous.
  return {backward_input(grad_y, input, weight, stride, padding, dilation),
          backward_weight(grad_y, as_channels_last(input, dtype), weight, stride, padding,
                          dilation)};
}

}  // namespace involution_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fast CPU kernels of the involution operator (see involution.backends.cpu).";
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
