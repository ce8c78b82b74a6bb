// One home for what the CPU kernels share (involution_cpu.cpp, involution_nd_cpu.cpp,
// involution_layer_cpu.cpp, involution_regen_cpu.cpp): compiler attributes, the 16-lane vector
// type and its transposing lane reduction, the valid output columns of a kernel column, column
// blocks, the per-tap accumulate loops, the compute dtype and the dynamic scheduling of rows over
// the intra-op threads. Everything here is inline or a template, so the kernels' hot loops
// compile exactly as if it were written in place.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// On x86-64 with GCC or Clang the hot loops are compiled for AVX-512, AVX2+FMA and baseline
// x86-64, and the best version is picked at load time (function multi-versioning).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define INVOLUTION_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INVOLUTION_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define INVOLUTION_INLINE inline __attribute__((always_inline))
// For lambdas in the kernels: a lambda is a function of its own, which would otherwise be
// compiled for the baseline instruction set rather than for the clone that calls it.
#define INVOLUTION_LAMBDA_INLINE __attribute__((always_inline))
// GCC/Clang vector types (V16 below).
#define INVOLUTION_VECTOR_TYPES 1
#else
#define INVOLUTION_INLINE inline
#define INVOLUTION_LAMBDA_INLINE
#endif

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
// Kernels that also shuffle lanes (the 2-D grad_weight reduction and the fused layer, the
// regenerating backward's kernel gradients: lane_sums below).
#define INVOLUTION_VECTOR_KERNELS 1
#endif
#endif

// A non-template kernel entry point NAME(geo, A, B, OUT, begin, end) for compute type T over
// the tasks [begin, end), compiled once per instruction set: it calls NAME_impl<T, CG> with
// CG = 16 for groups of 16 channels (RedNet's width, a compile-time constant in the hot loops)
// and CG = 0 (the width read from GEOMETRY::group_channels) otherwise.
#define INVOLUTION_DEFINE_KERNEL(NAME, GEOMETRY, T, A, B, OUT)                         \
  INVOLUTION_TARGET_CLONES void NAME(const GEOMETRY& geo, const T* A, const T* B, T* OUT, \
                                     int64_t begin, int64_t end) {                    \
    if (geo.group_channels == 16) {                                                  \
      NAME##_impl<T, 16>(geo, A, B, OUT, begin, end);                                \
    } else {                                                                         \
      NAME##_impl<T, 0>(geo, A, B, OUT, begin, end);                                 \
    }                                                                                \
  }

// The three kernels' entry points, FORWARD(geo, x, w, y, ...), INPUT(geo, grad_y, w, grad_x, ...)
// and WEIGHT(geo, grad_y, x, grad_w, ...), for float and double.
#define INVOLUTION_DEFINE_KERNELS_OF(GEOMETRY, FORWARD, INPUT, WEIGHT, T) \
  INVOLUTION_DEFINE_KERNEL(FORWARD, GEOMETRY, T, x, w, y)                 \
  INVOLUTION_DEFINE_KERNEL(INPUT, GEOMETRY, T, grad_y, w, grad_x)         \
  INVOLUTION_DEFINE_KERNEL(WEIGHT, GEOMETRY, T, grad_y, x, grad_w)
#define INVOLUTION_DEFINE_KERNELS(GEOMETRY, FORWARD, INPUT, WEIGHT)          \
  INVOLUTION_DEFINE_KERNELS_OF(GEOMETRY, FORWARD, INPUT, WEIGHT, float) \
  INVOLUTION_DEFINE_KERNELS_OF(GEOMETRY, FORWARD, INPUT, WEIGHT, double)

namespace involution_common {

// Output columns j in [lo, hi) whose input column j * stride + offset lies in [0, width).
struct ColumnRange {
  int64_t lo, hi;
};

inline ColumnRange valid_columns(int64_t offset, int64_t stride, int64_t width, int64_t out_w) {
  const int64_t lo = offset >= 0 ? 0 : std::min(out_w, (-offset + stride - 1) / stride);
  const int64_t last = width - 1 - offset;
  const int64_t hi = last < 0 ? 0 : std::min(out_w, last / stride + 1);
  return {lo, std::max(lo, hi)};  // empty when no column is inside
}

// valid_columns of each kernel column kw < kernel (input column j * stride - pad + kw * dil).
inline std::vector<ColumnRange> kernel_columns(int64_t kernel, int64_t stride, int64_t pad,
                                               int64_t dil, int64_t width, int64_t out_w) {
  std::vector<ColumnRange> columns;
  for (int64_t kw = 0; kw < kernel; ++kw) {
    columns.push_back(valid_columns(kw * dil - pad, stride, width, out_w));
  }
  return columns;
}

// `columns` split into the fewest blocks of at most `max_size`, of near-equal sizes: the
// register blocks of the kernels (a block's pixels are independent chains of multiply-adds,
// and small blocks would leave the vector units waiting on latency).
inline std::vector<int64_t> column_blocks(int64_t columns, int64_t max_size) {
  const int64_t count = (columns + max_size - 1) / max_size;
  std::vector<int64_t> sizes;
  for (int64_t k = 0; k < count; ++k) {
    sizes.push_back(columns / count + (k < columns % count ? 1 : 0));
  }
  return sizes;
}

// Calls block(nj, j0), nj a std::integral_constant <= MAX, for block sizes 1..MAX.
template <int MAX, int NJ = MAX, typename Block>
INVOLUTION_INLINE void call_block(int64_t size, int64_t j0, const Block& block) {
  if constexpr (NJ > 1) {
    if (size < NJ) {
      call_block<MAX, NJ - 1>(size, j0, block);
      return;
    }
  }
  block(std::integral_constant<int, NJ>{}, j0);
}

// Calls block(nj, j0) over the columns, in the blocks of `sizes` (column_blocks(columns, MAX)).
template <int MAX, typename Block>
INVOLUTION_INLINE void for_column_blocks(const std::vector<int64_t>& sizes, const Block& block) {
  int64_t j0 = 0;
  for (const int64_t size : sizes) {
    call_block<MAX>(size, j0, block);
    j0 += size;
  }
}

// Output size along one dimension of size n (kernel k, stride s, padding p, dilation d).
inline int64_t output_size(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (n + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Width of a row padded with zero columns so that input column iw sits at iw + pad and every
// column an output column reads is inside it.
inline int64_t padded_width(int64_t width, int64_t kernel, int64_t out_w, int64_t stride,
                            int64_t pad, int64_t dil) {
  return std::max(pad + width, (out_w - 1) * stride + (kernel - 1) * dil + 1);
}

// The dtype the kernels compute in: float64 natively, every other floating type in float32.
inline at::ScalarType compute_type(at::ScalarType dtype, const char* op) {
  TORCH_CHECK(at::isFloatingType(dtype), op, ": unsupported dtype ", dtype);
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// acc[c] += weight * in[c] for c < n: one tap of one pixel of a group (channels_last).
template <typename T>
INVOLUTION_INLINE void accumulate(T* __restrict acc, T weight, const T* __restrict in,
                                  int64_t n) {
#pragma omp simd  // acc and in never overlap
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += weight * in[c];
  }
}

// sum_{c < n} a[c] * b[c].
template <typename T>
INVOLUTION_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    sum += a[c] * b[c];
  }
  return sum;
}

#ifdef INVOLUTION_VECTOR_TYPES
// 16 values of T (a group of 16 channels, RedNet's width), compiled to the widest registers
// of the target.
template <typename T>
struct Lanes16 {
  typedef T type __attribute__((vector_size(16 * sizeof(T))));
};
template <typename T>
using V16 = typename Lanes16<T>::type;

template <typename T>
INVOLUTION_INLINE V16<T> load16(const T* p) {
  V16<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#endif

#ifdef INVOLUTION_VECTOR_KERNELS
// One step of the transposing reduction. a and b hold segments of `SEGMENT` lanes, each the
// partial sums of one dot product; the result holds a's then b's dot products in segments of
// half the size: the low halves of the segments plus their high halves.
template <int SEGMENT, typename V>
INVOLUTION_INLINE V fold(V a, V b) {
  if constexpr (SEGMENT == 16) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  } else if constexpr (SEGMENT == 8) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                   31);
  } else if constexpr (SEGMENT == 4) {
    return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                   31);
  } else {
    static_assert(SEGMENT == 2);
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                   30) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                   31);
  }
}

// Folds the N (<= 16) vectors in v down to one whose first N lanes are their lane sums, in order
// (an odd vector out is folded with itself; its duplicate lands past the first N lanes).
template <int N, int SEGMENT = 16, typename V>
INVOLUTION_INLINE V lane_sums(V* v) {
  if constexpr (SEGMENT == 1) {
    return v[0];
  } else {
    constexpr int kHalf = (N + 1) / 2;
    for (int k = 0; k < kHalf; ++k) {
      v[k] = fold<SEGMENT>(v[2 * k], 2 * k + 1 < N ? v[2 * k + 1] : v[2 * k]);
    }
    return lane_sums<kHalf, SEGMENT / 2>(v);
  }
}
#endif

// Sets the 2-D geometry's stride_h/w, pad_h/w and dil_h/w from (h, w) pairs.
template <typename Geometry, typename Pair>
void set_window(Geometry& geo, const Pair& stride, const Pair& padding, const Pair& dilation) {
  geo.stride_h = stride[0];
  geo.stride_w = stride[1];
  geo.pad_h = padding[0];
  geo.pad_w = padding[1];
  geo.dil_h = dilation[0];
  geo.dil_w = dilation[1];
}

// Tasks of (image, band of rows): whole images when the batch gives every thread about four
// tasks, else each image split into as many bands as that takes. Returns (rows per band,
// bands per image) for images of `rows` rows.
inline std::pair<int64_t, int64_t> image_bands(int64_t batch, int64_t rows) {
  const int64_t wanted = 4 * at::get_num_threads();
  const int64_t bands = std::max<int64_t>(
      1, std::min(rows, (wanted + batch - 1) / std::max<int64_t>(1, batch)));
  const int64_t band_rows = std::max<int64_t>(1, (rows + bands - 1) / bands);
  return {band_rows, (rows + band_rows - 1) / band_rows};
}

// Image b of a (B, C, H, W) map as an (H, W + 2 * pad, C) tensor holding at least its rows
// [first, last), with `pad` zero columns each side: a view of a channels_last map without
// padding, else those rows copied (transposed from NCHW) into a new tensor, the other rows left
// unset. Called per task by kernels that read channels_last rows: the rows stay in cache for
// the loops that read them, and no channels_last copy of the whole map is written and read back.
inline at::Tensor channels_last_rows(const at::Tensor& map, int64_t b, int64_t first,
                                     int64_t last, int64_t pad = 0) {
  const at::Tensor image = map.select(0, b);
  if (pad == 0 && map.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return image.permute({1, 2, 0});
  }
  const int64_t width = map.size(3);
  at::Tensor rows = at::empty({map.size(2), width + 2 * pad, map.size(1)}, map.options());
  if (last > first) {
    at::Tensor band = rows.narrow(0, first, last - first);
    band.narrow(1, pad, width).copy_(image.narrow(1, first, last - first).permute({1, 2, 0}));
    if (pad > 0) {
      band.narrow(1, 0, pad).zero_();
      band.narrow(1, pad + width, pad).zero_();
    }
  }
  return rows;
}

// Runs body(begin, end) over [0, total) on the intra-op threads, handing out chunks of `chunk`
// items on demand, so a thread slowed down (e.g. by other processes on the machine) does not
// hold the others back; problems of one chunk, or calls from inside a parallel region, stay on
// the calling thread.
template <typename Body>
void parallel_chunks(int64_t total, int64_t chunk, const Body& body) {
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

// parallel_chunks over `total` tasks of `task_work` multiply-adds each, in chunks of at least
// `chunk_work` multiply-adds.
template <typename Body>
void parallel_work(int64_t total, int64_t task_work, int64_t chunk_work, const Body& body) {
  const int64_t chunk = std::max<int64_t>(1, chunk_work / std::max<int64_t>(1, task_work));
  parallel_chunks(total, chunk, body);
}

// The tasks of both gradients in one parallel region (on small maps starting the threads costs
// as much as a kernel): first(begin, end) over [0, first_tasks), then second(begin, end) over
// [0, second_tasks), in chunks of at least ~32k multiply-adds.
template <typename First, typename Second>
void parallel_pair(int64_t first_tasks, int64_t second_tasks, int64_t task_work,
                   const First& first, const Second& second) {
  parallel_work(first_tasks + second_tasks, task_work, int64_t{1} << 15,
                [&](int64_t begin, int64_t end) {
                  if (begin < first_tasks) {
                    first(begin, std::min(end, first_tasks));
                  }
                  if (end > first_tasks) {
                    second(std::max(begin, first_tasks) - first_tasks, end - first_tasks);
                  }
                });
}

// The forward's kernel(x, w, y, begin, end) over `tasks` tasks of `task_work` multiply-adds, in
// parallel, with the data of x, w and y (tensors of the compute dtype).
template <typename Kernel>
void run_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, int64_t tasks,
                 int64_t task_work, const Kernel& kernel) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_cpu_forward", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    parallel_work(tasks, task_work, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
      kernel(x_ptr, w_ptr, y_ptr, begin, end);
    });
  });
}

// The operands of a backward call, of the compute dtype; those only a gradient that is not
// asked for needs are undefined.
struct GradientTensors {
  at::Tensor grad_y, w, x, grad_x, grad_w;
};

// Both gradients in one parallel region (parallel_pair): input_kernel(grad_y, w, grad_x, begin,
// end) over the `input_tasks` grad_input tasks and weight_kernel(grad_y, x, grad_w, begin, end)
// over the `weight_tasks` grad_weight tasks, on the tensors' data (nullptr where undefined).
// Returns (grad_x, grad_w) converted to `dtypes` (those of the input and the weight).
template <typename InputKernel, typename WeightKernel>
std::tuple<at::Tensor, at::Tensor> run_gradients(
    const GradientTensors& t, int64_t input_tasks, int64_t weight_tasks, int64_t task_work,
    const InputKernel& input_kernel, const WeightKernel& weight_kernel,
    std::array<at::ScalarType, 2> dtypes) {
  AT_DISPATCH_FLOATING_TYPES(t.grad_y.scalar_type(), "involution_cpu_backward", [&] {
    const auto in = [](const at::Tensor& u) -> const scalar_t* {
      return u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    };
    const auto out = [](const at::Tensor& u) -> scalar_t* {
      return u.defined() ? u.mutable_data_ptr<scalar_t>() : nullptr;
    };
    const scalar_t* gy_ptr = in(t.grad_y);
    const scalar_t* w_ptr = in(t.w);
    const scalar_t* x_ptr = in(t.x);
    scalar_t* gx_ptr = out(t.grad_x);
    scalar_t* gw_ptr = out(t.grad_w);
    parallel_pair(
        input_tasks, weight_tasks, task_work,
        [&](int64_t begin, int64_t end) { input_kernel(gy_ptr, w_ptr, gx_ptr, begin, end); },
        [&](int64_t begin, int64_t end) { weight_kernel(gy_ptr, x_ptr, gw_ptr, begin, end); });
  });
  return {t.grad_x.defined() ? t.grad_x.to(dtypes[0]) : t.grad_x,
          t.grad_w.defined() ? t.grad_w.to(dtypes[1]) : t.grad_w};
}

}  // namespace involution_common
