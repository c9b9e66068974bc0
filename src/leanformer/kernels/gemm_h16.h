// Interface between gemm_h16.cpp (bindings, threading, conversions: AVX2) and gemm_h16_avx512fp16.cpp (the
// AVX512-FP16 tile loop). Plain declarations only: see avx512.h for why no inline code is shared.
//
// The product: y[M, N] = x[M, K] @ w[N, K]^T with x and w rounded to fp16 and the products summed in fp16
// along chains of at most kH16Chain pairs of k, each chain then added into fp32. On CPUs with AVX512-FP16
// (Intel Sapphire Rapids and later) one vfmadd231ph does 32 multiply-adds, twice an fp32 FMA's 16.
#pragma once

#include <cstdint>

namespace leanformer {

// Columns per packed panel: 4 vectors of 16 columns, each lane pair holding (w[n, 2j], w[n, 2j + 1]).
constexpr int64_t kH16Panel = 64;
// k pairs summed in fp16 before the fp32 flush (128 values of k). Simulated end to end on all-MiniLM-L6-v2
// (every Linear): min cosine to fp32 0.999999 at 32 pairs, 0.999996 at 96 (docs/BENCHMARKS.md, session
// 28); the overflow guard in gemm_h16.cpp uses it.
constexpr int64_t kH16Chain = 64;

// Rows of x per h16_tiles call (at most): 4 register tiles of 6 rows. Their fp32 sums (24 x 512 B), x rows
// and the panel's current 16 KB then fit a 48 KB L1 together: MiniLM's four products 1.03x the rate at 48
// rows (min of 25 calls, one thread, 2-core Xeon), 1.16x the median rate of 96 rows taken panel-major.
constexpr int64_t kH16Rows = 24;

// Where a tile job's results go, and what is applied to them on the way (in fp32, this order): + bias[n]
// (null: none), GELU (erf form) when gelu, residual[m, n] + y (null: none; fp32 output only). Either y
// (fp32) or y16 (fp16; then *absmax = max(*absmax, max |written value|)). Pointers start at the job's
// first row.
struct H16Out {
  const float* bias = nullptr;
  bool gelu = false;
  const float* residual = nullptr;
  int64_t ldr = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  uint16_t* y16 = nullptr;
  int64_t ldy16 = 0;
  float* absmax = nullptr;
};

// Whether the CPU runs the AVX512-FP16 files (CPUID; defined in the AVX2 file gemm_h16.cpp).
bool has_avx512fp16();

// One tile job: rows [0, M) (M <= kH16Rows) of x16 (fp16 bits, row stride ldx >= K2 * 2) times panels
// [p0, p1) of the packed weight (each K2 * 64 * 2 fp16 values) into columns [p0 * 64, min(p1 * 64, N)) of
// out. K2 = ceil(K / 2) pairs (x16 and the panels zero-padded to 2 * K2).
void h16_tiles(const uint16_t* x16, int64_t ldx, int64_t M, const uint16_t* panels, int64_t K2, int64_t p0,
               int64_t p1, int64_t N, const H16Out& out);

}  // namespace leanformer
