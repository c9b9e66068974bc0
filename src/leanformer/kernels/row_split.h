// Weight rows split over the threads with the ends balanced: each thread streams its own contiguous part
// front to back, a block of rows at a time, and a thread done with its part takes the blocks still left
// at the back of the others' parts (the int8-activation GEMVs, gemv_i8.cpp run_rows).
//
// Why: the fused decode step (decode.cpp) runs ~120 small GEMVs per token (SmolLM2: 0.2-1.1 MB each,
// 5-23 us on 2 threads) and each one waits for its slower thread. With one fixed half per thread
// (for_row_blocks) the calling thread finished first in 94 of 120 calls and then waited a median
// 1.4 us, since the worker starts ~0.6 us late (the fork) and a VM's vCPUs run at different speeds
// from moment to moment: ~0.26 ms of a ~2.8 ms token (Zen 5, 2 threads, traced per call). With blocks
// taken from the back the wait fell to a median 0.4 us, and the 120 block GEMVs took 0.96-0.98x the
// time (scripts/i8_rows_ab.py). Taking blocks from the back keeps each part one sequential stream for
// its owner (what the prefetchers want, see for_row_blocks) and moves only the last few blocks.
//
// Which rows a thread computes never changes a row's result: every row runs the same loop in any block.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "common.h"  // kMinTaskBytes, parallel_for / num_threads (team.h)

namespace leanformer {

// Rows per claimed block: about this many bytes of weights. Small enough that the last block leaves
// the other thread a fraction of a microsecond, large enough that a claim (one compare-exchange on
// the part's own cache line) and the block's first prefetches stay negligible.
constexpr int64_t kBlockBytes = 16 << 10;

// One thread's part of the rows: blocks [front, back) still unclaimed, packed in one word so that
// the owner (taking front) and a thief (taking back - 1) can never both get the same block.
struct alignas(64) RowPart {
  std::atomic<uint64_t> left{0};  // back << 32 | front
  int64_t first = 0, end = 0;     // the part's rows [first, end)

  // The next block index from the front (own = true) or the back, or -1 when none is left.
  int64_t claim(bool own) {
    uint64_t v = left.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t front = v & 0xFFFFFFFFu, back = v >> 32;
      if (front >= back) return -1;
      const uint64_t next = own ? v + 1 : v - (uint64_t{1} << 32);
      if (left.compare_exchange_weak(v, next, std::memory_order_relaxed)) return own ? front : back - 1;
    }
  }
};

// Runs fn(n0, n1, first, last, warm) over rows [0, N) in blocks: first = the row the block's part
// starts at, last = whether the block is its owner's final one of its own part (where a GEMV requests
// the next call's weights, I8Next), warm = whether it continues the same thread's previous block (its
// owner's next one: that block's loop has already requested the first bytes). Blocks are multiples of `align` rows (the kernels' rows per pass)
// except at a part's end. Parts as for_row_blocks: one per thread, >= kMinTaskBytes of weights each;
// a single part (or a call from inside a parallel region) runs here as fn(0, N, 0, true, false).
template <class Fn>
void for_row_blocks_balanced(int64_t N, int64_t row_bytes, int64_t align, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, row_bytes));
  const int64_t parts = std::min<int64_t>(num_threads(), (N + grain - 1) / grain);
  if (parts <= 1 || (at::in_parallel_region() && !Team::current())) return fn(0, N, 0, true, false);
  const int64_t block = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, row_bytes) / align) * align;
  RowPart local[8];  // on the stack for up to 8 threads: this runs ~120 times a token
  std::unique_ptr<RowPart[]> heap(parts > 8 ? new RowPart[parts] : nullptr);
  RowPart* part = parts > 8 ? heap.get() : local;
  for (int64_t p = 0; p < parts; ++p) {
    part[p].first = N * p / parts, part[p].end = N * (p + 1) / parts;
    const uint64_t blocks = static_cast<uint64_t>((part[p].end - part[p].first + block - 1) / block);
    part[p].left.store(blocks << 32, std::memory_order_relaxed);
  }
  auto run = [&](int64_t p, int64_t b, bool own) {
    const int64_t n0 = part[p].first + b * block, n1 = std::min(part[p].end, n0 + block);
    const uint64_t v = part[p].left.load(std::memory_order_relaxed);
    const bool last = own && (v & 0xFFFFFFFFu) >= (v >> 32);
    fn(n0, n1, part[p].first, last, own && b > 0);
  };
  // parallel_for(0, parts, 1) runs task p on thread p (one each: parts <= threads)
  parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b; (b = part[p].claim(true)) >= 0;) run(p, b, true);
    for (int64_t i = 1; i < parts; ++i) {  // then the others' leftovers, from their backs
      const int64_t q = (p0 + i) % parts;
      for (int64_t b; (b = part[q].claim(false)) >= 0;) run(q, b, false);
    }
  });
}

}  // namespace leanformer
