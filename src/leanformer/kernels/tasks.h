// Tasks handed to torch's threads from a shared counter (AVX2 translation units only: it includes ATen).
// For the fp16 encoder kernels (gemm_h16.cpp, attention_h16.cpp), whose tasks are small and equal: on a
// shared VM one core is often slower for a while (another guest's load), and at::parallel_for's fixed
// halves then leave the other thread spinning at the region's end (libgomp's wait measured ~7% of an fp16
// encoder forward on a 2-core Xeon VM).
//
// Guided grabs: a thread takes 1/(4 threads) of what is left at once, so a run of n tasks costs about
// 4 threads ln(n) atomic adds, not n, while the last grabs stay single tasks. One grab per task measured
// ~2% of an fp16 MiniLM forward in the locked add alone (it waits for the task's output stores to drain).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace leanformer {

// f(t) for t in [0, n), on every thread of torch's pool (or inline when already inside a parallel region).
template <class F>
void parallel_tasks(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t share = 4 * static_cast<int64_t>(at::get_num_threads());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t seen = next.load(std::memory_order_relaxed);
      if (seen >= n) break;
      const int64_t grab = std::max<int64_t>(1, (n - seen) / share);
      const int64_t t0 = next.fetch_add(grab, std::memory_order_relaxed);
      for (int64_t t = t0, end = std::min(n, t0 + grab); t < end; ++t) f(t);
    }
  });
}

}  // namespace leanformer
