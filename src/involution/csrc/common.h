// Dynamic scheduling shared by the CPU kernels (involution_cpu.cpp, involution_layer_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace involution_parallel {

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

}  // namespace involution_parallel
