// Would int4 weights stored in the span loop's order pay? (docs/BENCHMARKS.md session 23, issue #17)
// The AVX-512 VNNI span loop (gemv_i8_wide.h span_rows) at one activation row, Q4_0 (no zero points,
// fp16 scales), as it runs now — a 4 x 4 dword transpose of every 256-byte span of a weight row, and
// the span's scales permuted to match — against the same loop over weights and scales stored already
// transposed / permuted (what a load-time layout would give). Random codes; timings only, no results
// checked. Two threads split the rows as the GEMVs do, a barrier after each matrix. Build and run:
//     g++ -O3 -march=native -fopenmp scripts/span_layout_bench.cpp -o /tmp/span_layout_bench
//     /tmp/span_layout_bench K MB COPIES THREADS [ROUNDS]   (K a multiple of 512)
// e.g. `1536 0.75 1 1 31` (L2-resident, one core's compute rate), `1536 0.664 100 2 11` (layer-sized
// matrices, each call a fresh stream), `512 66 1 2 11` (one matrix streamed from memory).
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
static void* huge(size_t bytes) {
  void* p = nullptr; size_t al = 2 << 20; bytes = (bytes + al - 1) / al * al;
  posix_memalign(&p, al, bytes); madvise(p, bytes, MADV_HUGEPAGE); memset(p, 0, bytes); return p;
}
template <bool kPre, int AHEAD>
__attribute__((noinline)) void rows(const uint8_t* W, const uint16_t* SH, const int8_t* xq, const int32_t* so, const float* sd,
                                    float* y, long n0, long n1, long spans) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const long rowb = 256 * spans, G = 16 * spans;
  for (long n = n0; n < n1; ++n) {
    const uint8_t* w = W + n * rowb;
    const uint16_t* sh = SH + n * G;
    __m512 acc = _mm512_setzero_ps();
    for (long s = 0; s < spans; ++s) {
      const uint8_t* p = w + 256 * s;
      if (AHEAD > 0) for (int q = 0; q < 4; ++q) _mm_prefetch((const char*)p + 64 * q + AHEAD, _MM_HINT_T0);
      __m512i tr[4];
      const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 64);
      const __m512i v2 = _mm512_loadu_si512(p + 128), v3 = _mm512_loadu_si512(p + 192);
      if constexpr (kPre) {
        tr[0] = v0, tr[1] = v1, tr[2] = v2, tr[3] = v3;
      } else {
        const __m512i t0 = _mm512_unpacklo_epi32(v0, v1), t1 = _mm512_unpackhi_epi32(v0, v1);
        const __m512i t2 = _mm512_unpacklo_epi32(v2, v3), t3 = _mm512_unpackhi_epi32(v2, v3);
        tr[0] = _mm512_unpacklo_epi64(t0, t2), tr[1] = _mm512_unpackhi_epi64(t0, t2);
        tr[2] = _mm512_unpacklo_epi64(t1, t3), tr[3] = _mm512_unpackhi_epi64(t1, t3);
      }
      __m512i lo[4], hi[4];
      for (int j = 0; j < 4; ++j) lo[j] = _mm512_and_si512(tr[j], mask), hi[j] = _mm512_and_si512(_mm512_srli_epi16(tr[j], 4), mask);
      const __m512 h = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sh + 16 * s)));
      const __m512 ws = kPre ? h : _mm512_permutexvar_ps(order, h);
      const int8_t* x = xq + 512 * s;
      __m512i even = _mm512_loadu_si512(so + 16 * s), odd = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        even = _mm512_dpbusd_epi32(even, lo[j], _mm512_load_si512(x + 128 * j));
        odd = _mm512_dpbusd_epi32(odd, hi[j], _mm512_load_si512(x + 128 * j + 64));
      }
      const __m512 d = _mm512_loadu_ps(sd + 16 * s);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), _mm512_mul_ps(d, ws), acc);
    }
    y[n] = _mm512_reduce_add_ps(acc);
  }
}
using Fn = void (*)(const uint8_t*, const uint16_t*, const int8_t*, const int32_t*, const float*, float*, long, long, long);
int main(int argc, char** argv) {
  long K = atol(argv[1]); double mb = atof(argv[2]); int copies = atoi(argv[3]); int T = atoi(argv[4]); int rounds = argc > 5 ? atoi(argv[5]) : 15;
  long spans = K / 512, rowb = 256 * spans, G = 16 * spans;
  long N = std::max(64L, (long)(mb * (1 << 20)) / (rowb + 2 * G) / 64 * 64);
  std::vector<uint8_t*> Ws; std::vector<uint16_t*> Ss;
  for (int c = 0; c < copies; ++c) {
    uint8_t* w = (uint8_t*)huge(N * rowb); for (long i = 0; i < N * rowb; ++i) w[i] = (uint8_t)(i * 2654435761u >> 7);
    uint16_t* s = (uint16_t*)huge(N * G * 2); for (long i = 0; i < N * G; ++i) s[i] = 0x2000;  // fp16 ~0.0078
    Ws.push_back(w); Ss.push_back(s);
  }
  int8_t* xq = (int8_t*)huge(K + 4096); for (long k = 0; k < K; ++k) xq[k] = (int8_t)(k % 7);
  int32_t* so = (int32_t*)huge(4096 * 4); float* sd = (float*)huge(4096 * 4); for (int i = 0; i < 1024; ++i) so[i] = 0, sd[i] = 0.01f;
  float* y = (float*)huge(N * 4 + 4096);
  struct V { const char* name; Fn f; };
  std::vector<V> vs = {{"transpose in loop, pf 4K", rows<false, 4096>}, {"pre-transposed, pf 4K", rows<true, 4096>},
                       {"transpose in loop, no pf", rows<false, 0>}, {"pre-transposed, no pf", rows<true, 0>}};
  std::vector<std::vector<double>> r(vs.size());
  double bytes = (double)copies * N * (rowb + 2 * G);
  for (int it = 0; it < rounds; ++it)
    for (size_t v = 0; v < vs.size(); ++v) {
      double t = now();
#pragma omp parallel num_threads(T)
      { int id = omp_get_thread_num(); long h = N / T;
        for (int c = 0; c < copies; ++c) { vs[v].f(Ws[c], Ss[c], xq, so, sd, y, id * h, id == T - 1 ? N : (id + 1) * h, spans);
#pragma omp barrier
        } }
      r[v].push_back(bytes / (now() - t) / 1e9);
    }
  auto med = [](std::vector<double> a) { std::sort(a.begin(), a.end()); return a[a.size() / 2]; };
  printf("K=%ld N=%ld x %d copies (%.2f MB each), %d threads\n", K, N, copies, N * (rowb + 2 * G) / 1e6, T);
  for (size_t v = 0; v < vs.size(); ++v) {
    std::vector<double> rat; for (int i = 0; i < rounds; ++i) rat.push_back(r[0][i] / r[v][i]);
    printf("  %-26s %6.1f GB/s   time %.3fx the first\n", vs[v].name, med(r[v]), med(rat));
  }
}
