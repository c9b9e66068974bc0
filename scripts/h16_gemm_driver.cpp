// Standalone driver of the fp16 GEMM's tile loop (src/leanformer/kernels/gemm_h16_avx512fp16.cpp) on
// all-MiniLM-L6-v2's four products at 2,048 rows, one thread, tasks in the extension's order: GF/s per
// product, best of 15 repeats. For tuning the tile loop without rebuilding the extension (~1 s here vs ~4
// minutes); needs a CPU with AVX512-FP16. docs/BENCHMARKS.md, session 30.
//
//   K=src/leanformer/kernels
//   g++ -O3 -mavx2 -mfma -mf16c -std=c++17 -I$K scripts/h16_gemm_driver.cpp $K/gemm_h16_avx512fp16.cpp -o /tmp/h16drv
//   /tmp/h16drv   # run variants in interleaved rounds and compare the best of each: this VM's noise is ±10%
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gemm_h16.h"

using namespace leanformer;

static uint16_t to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  __builtin_memcpy(&u, &h, 2);
  return u;
}

struct Shape {
  int64_t K, N;
  bool gelu16;  // the FFN's first product: GELU, fp16 output
  bool whole;   // tasks of whole rows (every panel), as the normalizing output projections run
  const char* name;
};

int main() {
  const int64_t M = 2048;
  const Shape shapes[] = {{384, 1152, false, false, "qkv ->h16"},
                          {384, 384, false, true, "out whole rows"},
                          {384, 1536, true, false, "ffn_in gelu->h16"},
                          {1536, 384, false, true, "ffn_out whole rows"}};
  srand(1);
  double flops = 0, seconds = 0;
  for (const Shape& s : shapes) {
    const int64_t K2 = s.K / 2, P = (s.N + kH16Panel - 1) / kH16Panel;
    std::vector<uint16_t> x(M * 2 * K2), panels(P * K2 * kH16Panel * 2), y16(M * s.N);
    for (auto& v : x) v = to_half((rand() % 2000 - 1000) / 1000.f);
    for (auto& v : panels) v = to_half((rand() % 2000 - 1000) / 20000.f);
    std::vector<float> y(M * s.N), bias(s.N, 0.1f);
    double best = 1e9;
    for (int rep = 0; rep < 15; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t m0 = 0; m0 < M; m0 += kH16Rows) {
        const int64_t rows = std::min(kH16Rows, M - m0);
        H16Out o;
        float amax = 0.f;
        o.bias = bias.data();
        o.gelu = s.gelu16;
        if (!s.whole) {
          o.y16 = y16.data() + m0 * s.N, o.ldy16 = s.N, o.absmax = &amax;
        } else {
          o.y = y.data() + m0 * s.N, o.ldy = s.N;
        }
        if (s.whole)
          h16_tiles(x.data() + m0 * 2 * K2, 2 * K2, rows, panels.data(), K2, 0, P, s.N, o);
        else
          for (int64_t p = 0; p < P; ++p) h16_tiles(x.data() + m0 * 2 * K2, 2 * K2, rows, panels.data(), K2, p, p + 1, s.N, o);
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double f = 2.0 * M * s.N * s.K;
    flops += f, seconds += best;
    printf("%-20s %6.1f GF/s\n", s.name, f / best / 1e9);
  }
  printf("%-20s %6.1f GF/s\n", "all", flops / seconds / 1e9);
}
