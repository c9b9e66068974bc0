// Would a bf16-weight GEMV pay for bfloat16 decoder models? (docs/BENCHMARKS.md session 23)
// SmolLM2-135M's 121 decode matrices (30 x qkv, o, gate_up, down + the tied head) at one activation row,
// 2 threads with a barrier after each matrix, as the fused step runs them: fp32 weights (the one-row loop
// of gemv_avx512.cpp) vs bf16 weights widened to fp32 by a 16-bit shift (fp32 activations and sums),
// with and without a software prefetch. Huge pages; random values, timings only. Build and run:
//     g++ -O3 -march=native -fopenmp scripts/bf16_gemv_bench.cpp -o /tmp/bf16_gemv_bench && /tmp/bf16_gemv_bench
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>
#include <algorithm>
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
static void* huge(size_t bytes) { void* p; posix_memalign(&p, 2 << 20, (bytes + (2 << 20) - 1) / (2 << 20) * (2 << 20)); madvise(p, bytes, MADV_HUGEPAGE); memset(p, 0, bytes); return p; }
__attribute__((noinline)) void f32(const float* x, const float* w, float* y, long n0, long n1, long K) {
  for (long n = n0; n < n1; ++n) {
    const float* r = w + n * K; __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (long k = 0; k < K; k += 32) { a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0); a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 16), _mm512_loadu_ps(x + k + 16), a1); }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}
template <int AHEAD>
__attribute__((noinline)) void bf16(const float* x, const uint16_t* w, float* y, long n0, long n1, long K) {
  for (long n = n0; n < n1; ++n) {
    const uint16_t* r = w + n * K; __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (long k = 0; k < K; k += 32) {
      if (AHEAD) _mm_prefetch((const char*)(r + k) + AHEAD, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(r + k);  // 32 bf16
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
      a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + k), a0); a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + k + 16), a1);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}
int main() {
  struct M { long N, K; };
  std::vector<M> shapes; for (int l = 0; l < 30; ++l) { shapes.push_back({960, 576}); shapes.push_back({576, 576}); shapes.push_back({3072, 576}); shapes.push_back({576, 1536}); }
  shapes.push_back({49152, 576});
  std::vector<float*> wf; std::vector<uint16_t*> wb; long total = 0;
  for (auto& s : shapes) { wf.push_back((float*)huge(s.N * s.K * 4)); wb.push_back((uint16_t*)huge(s.N * s.K * 2)); total += s.N * s.K;
    for (long i = 0; i < s.N * s.K; ++i) { wf.back()[i] = 0.01f * (i % 13); wb.back()[i] = 0x3c00 + (i % 13); } }
  float* x = (float*)huge(8192 * 4); for (int i = 0; i < 8192; ++i) x[i] = 0.5f; float* y = (float*)huge(65536 * 4);
  std::vector<double> tf, tb, tb2;
  for (int it = 0; it < 15; ++it) {
    for (int v = 0; v < 3; ++v) {
      double t = now();
#pragma omp parallel num_threads(2)
      { int id = omp_get_thread_num();
        for (size_t i = 0; i < shapes.size(); ++i) { long h = shapes[i].N / 2, n0 = id * h, n1 = id ? shapes[i].N : h;
          if (v == 0) f32(x, wf[i], y, n0, n1, shapes[i].K); else if (v == 1) bf16<0>(x, wb[i], y, n0, n1, shapes[i].K); else bf16<4096>(x, wb[i], y, n0, n1, shapes[i].K);
#pragma omp barrier
        } }
      (v == 0 ? tf : v == 1 ? tb : tb2).push_back(now() - t);
    }
  }
  auto med = [](std::vector<double> a) { std::sort(a.begin(), a.end()); return a[a.size() / 2]; };
  std::vector<double> r1, r2; for (int i = 0; i < 15; ++i) r1.push_back(tb[i] / tf[i]), r2.push_back(tb2[i] / tf[i]);
  printf("%ld weights: fp32 %.2f ms (%.1f GB/s), bf16 %.2f ms (%.1f GB/s, %.3fx the time), bf16 + prefetch 4K %.2f ms (%.3fx)\n", total, med(tf) * 1e3,
         total * 4 / med(tf) / 1e9, med(tb) * 1e3, total * 2 / med(tb) / 1e9, med(r1), med(tb2) * 1e3, med(r2));
}
