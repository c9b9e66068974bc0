// Tasks handed to torch's threads one at a time from a shared counter (AVX2 translation units only: it
// includes ATen). For the fp16 encoder kernels (gemm_h16.cpp, attention_h16.cpp), whose tasks are small and
// equal: on a shared VM one core is often slower for a while (another guest's load), and at::parallel_for's
// fixed halves then leave the other thread spinning at the region's end (libgomp's wait measured ~7% of an
// fp16 encoder forward on a 2-core Xeon VM).
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace leanformer {

// f(t) for t in [0, n), on every thread of torch's pool (or inline when already inside a parallel region).
template <class F>
void parallel_tasks(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n; t = next.fetch_add(1, std::memory_order_relaxed))
      f(t);
  });
}

}  // namespace leanformer
