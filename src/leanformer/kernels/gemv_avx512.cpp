// AVX-512 (F/BW/VL/DQ) versions of the GEMV hot loops, chosen at run time by gemv.cpp on CPUs that have
// them (the rest of the extension is built for AVX2 and never calls in here otherwise).
//
// Same math as the AVX2 kernels (fp32 activations, fp32 accumulation), with three changes that pay on
// AVX-512 CPUs, where the int4/int8 decode and not memory is the limit (see docs/BENCHMARKS.md):
//  * 16-wide vectors, and masked loads for every tail (no scalar loops).
//  * int4 decode by table: vpermps picks a float out of a 16-entry register by the low 4 bits of each
//    index lane, so with the table t[q] = (q - 8) * scale + zero (built once per group, one FMA) a
//    zero-extended byte gives the even column's finished weight and the byte >> 4 the odd one. No
//    int->float conversion, no nibble masking, and no separate scale/zero-point pass.
//  * Two weight rows per pass for int4/int8 (see pairs() below): each x vector loaded from L1 feeds
//    two rows' FMAs, and the two rows' decodes overlap.
// Measured (docs/BENCHMARKS.md): M = 8 then runs at about the FMA peak (2 x 16-wide per cycle), so the
// int4 decode is nearly free there; M = 1 gains 1.3-1.6x.
//
// Only this file is compiled for AVX-512 (the pragma below), and it includes no header with inline
// code that the AVX2 files also use: see avx512.h for why.
#include <immintrin.h>

#include <cstdint>

#include "avx512.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#endif

namespace leanformer {
namespace {

// Accumulator chains per (weight row, x row) for a kernel that takes `rows` weight rows per pass:
// rows * M * chains >= 8 independent FMA chains hide the FMA latency (4 cycles x 2 pipes), at most
// `cap`. Fixed per kernel and M, never per tile, so a row's summation order (and result) does not
// depend on whether the thread split left it paired or alone.
constexpr int chains(int rows, int M, int cap) {
  const int a = (8 + rows * M - 1) / (rows * M);
  return a < cap ? a : cap;
}

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << (n < 16 ? n : 16)) - 1); }

// Prefetch the line kAhead bytes ahead when a `bytes`-long chunk at `off` enters a new cache line. These
// loops consume W faster than the AVX2 ones, so they look further ahead: 4x LF_PREFETCH measured best
// on the streamed lm_head (int8 M = 1: 38 vs 29-32 G weights/s at 1x-2x, 8x no better). Without it the
// int4 decode chain (many small matrices, each a fresh stream) ran 1.3x slower.
constexpr int64_t kAhead = 4 * LF_PREFETCH;
inline void prefetch(const void* row, int64_t off, int64_t bytes) {
  if (kAhead > 0 && (off & 63) < bytes) _mm_prefetch(static_cast<const char*>(row) + off + kAhead, _MM_HINT_T0);
}

// 16 weights as floats, optionally only the first lanes of `k` (masked loads never fault past the end).
template <bool kMask>
inline __m512 load_w(const float* p, __mmask16 k) {
  return kMask ? _mm512_maskz_loadu_ps(k, p) : _mm512_loadu_ps(p);
}
template <bool kMask>
inline __m512 load_w(const int8_t* p, __mmask16 k) {
  const __m128i v = kMask ? _mm_maskz_loadu_epi8(k, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}
// bf16 weights: each value's 16 bits into the high half of an fp32 lane; fp16: vcvtph2ps. Both exact.
template <bool kMask>
inline __m256i load_16(const uint16_t* p, __mmask16 k) {
  return kMask ? _mm256_maskz_loadu_epi16(k, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
template <bool kMask>
inline __m512 load_w(const Bf16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_16<kMask>(&p->bits, k)), 16));
}
template <bool kMask>
inline __m512 load_w(const Fp16* p, __mmask16 k) {
  return _mm512_cvtph_ps(load_16<kMask>(&p->bits, k));
}
template <bool kMask>
inline __m512 load_x(const float* p, __mmask16 k) {
  return kMask ? _mm512_maskz_loadu_ps(k, p) : _mm512_loadu_ps(p);
}

template <int NR, int M, int A>
inline void zero(__m512 (&acc)[NR][M][A]) {
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m)
      LF_UNROLL
      for (int i = 0; i < A; ++i) acc[r][m][i] = _mm512_setzero_ps();
}

template <int NR, int M, int A>
inline void reduce(__m512 (&acc)[NR][M][A], float (&out)[NR][M]) {
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      __m512 s = acc[r][m][0];
      LF_UNROLL
      for (int i = 1; i < A; ++i) s = _mm512_add_ps(s, acc[r][m][i]);
      out[r][m] = _mm512_reduce_add_ps(s);
    }
}

// ------------------------------------------------------------------------------------ fp32 / int8

// acc[.][.][i] += (w * s) . x over the 16 columns at k (s: the group's scale when kScale).
template <int NR, int M, int A, bool kScale, bool kMask, class T>
inline void dense_chunk(const float* x, int64_t K, const T* const (&w)[NR], int64_t k, __mmask16 mk,
                        const __m512 (&s)[NR], __m512 (&acc)[NR][M][A], int i) {
  __m512 wv[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    prefetch(w[r], k * int64_t(sizeof(T)), 16 * sizeof(T));
    wv[r] = load_w<kMask>(w[r] + k, mk);
    if constexpr (kScale) wv[r] = _mm512_mul_ps(wv[r], s[r]);
  }
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    const __m512 xv = load_x<kMask>(x + m * K + k, mk);
    LF_UNROLL
    for (int r = 0; r < NR; ++r) acc[r][m][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][m][i]);
  }
}

// Columns [k0, k1) of NR weight rows: A chunks per step, one accumulator chain each; then pairs, singles
// and a masked tail, so short spans (32-column groups) still use two chains. Chain indices must be
// compile-time constants here (a runtime index spills the accumulators).
template <int NR, int M, int A, bool kScale, class T>
inline void dense_span(const float* x, int64_t K, const T* const (&w)[NR], int64_t k0, int64_t k1,
                       const __m512 (&s)[NR], __m512 (&acc)[NR][M][A]) {
  int64_t k = k0;
  for (; k + 16 * A <= k1; k += 16 * A) {
    LF_UNROLL
    for (int u = 0; u < A; ++u) dense_chunk<NR, M, A, kScale, false>(x, K, w, k + 16 * u, 0, s, acc, u);
  }
  for (; k + 32 <= k1; k += 32) {
    dense_chunk<NR, M, A, kScale, false>(x, K, w, k, 0, s, acc, 0);
    dense_chunk<NR, M, A, kScale, false>(x, K, w, k + 16, 0, s, acc, 1 % A);
  }
  for (; k + 16 <= k1; k += 16) dense_chunk<NR, M, A, kScale, false>(x, K, w, k, 0, s, acc, 0);
  if (k < k1) dense_chunk<NR, M, A, kScale, true>(x, K, w, k, first(k1 - k), s, acc, 0);
}

// f32 (T = float, no scales), int8 per row (scale applied to the dot product) or per group (G > 0:
// weights scaled per group before the FMA, so the accumulators run across groups).
template <int NR, int M, int A, class T>
inline void dense_tile(const KernelArgs& a, const float* x, int64_t n, float (&out)[NR][M]) {
  const int64_t K = a.K, G = a.group;
  const T* w[NR];
  __m512 s[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) w[r] = static_cast<const T*>(a.w) + (n + r) * K;
  __m512 acc[NR][M][A];
  zero(acc);
  if (G == 0) {
    dense_span<NR, M, A, false>(x, K, w, 0, K, s, acc);
  } else {
    const int64_t n_groups = (K + G - 1) / G;
    for (int64_t g = 0; g < n_groups; ++g) {
      LF_UNROLL
      for (int r = 0; r < NR; ++r) s[r] = _mm512_set1_ps(a.scales[(n + r) * n_groups + g]);
      dense_span<NR, M, A, true>(x, K, w, g * G, imin(K, (g + 1) * G), s, acc);
    }
  }
  reduce(acc, out);
  if (G == 0 && a.scales) {
    LF_UNROLL
    for (int r = 0; r < NR; ++r)
      LF_UNROLL
      for (int m = 0; m < M; ++m) out[r][m] *= a.scales[n + r];
  }
}

// dense_tile over x rows M0.. in groups of Mg, each with A chains: a row's sum then depends on K and A
// alone, never on how many rows the call has (a speculative verify row equals the plain step's row).
template <int NR, int M, int A, int Mg, int M0, class T>
inline void dense_groups(const KernelArgs& a, int64_t n, float (&out)[NR][M]) {
  if constexpr (M0 < M) {
    constexpr int Mc = M - M0 < Mg ? M - M0 : Mg;
    float part[NR][Mc];
    dense_tile<NR, Mc, A, T>(a, a.x + M0 * a.K, n, part);  // the weight rows: from L1 after the first group
    LF_UNROLL
    for (int r = 0; r < NR; ++r)
      LF_UNROLL
      for (int m = 0; m < Mc; ++m) out[r][M0 + m] = part[r][m];
    dense_groups<NR, M, A, Mg, M0 + Mg, T>(a, n, out);
  }
}

// ------------------------------------------------------------------------------------------- int4

// One 16-byte chunk (32 weights) at byte b of NR rows, decoded through the group tables t:
// even columns into chain i, odd columns into chain i + 1.
template <int NR, int M, int A, bool kMask>
inline void q4_chunk(const KernelArgs& a, const uint8_t* const (&w)[NR], int64_t b, __mmask16 mk,
                     const __m512 (&t)[NR], __m512 (&acc)[NR][M][A], int i) {
  __m512 we[NR], wo[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    prefetch(w[r], b, 16);
    const __m128i v =
        kMask ? _mm_maskz_loadu_epi8(mk, w[r] + b) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + b));
    const __m512i codes = _mm512_cvtepu8_epi32(v);  // vpermps reads only the low 4 bits: no masking
    we[r] = _mm512_permutexvar_ps(codes, t[r]);
    wo[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), t[r]);
  }
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    const __m512 xe = load_x<kMask>(a.x + m * a.K + b, mk), xo = load_x<kMask>(a.xo + m * a.K + b, mk);
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      acc[r][m][i % A] = _mm512_fmadd_ps(we[r], xe, acc[r][m][i % A]);
      acc[r][m][(i + 1) % A] = _mm512_fmadd_ps(wo[r], xo, acc[r][m][(i + 1) % A]);
    }
  }
}

template <int NR>
inline void q4_tables(const KernelArgs& a, int64_t n, int64_t n_groups, int64_t g, __m512 (&t)[NR]) {
  const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    const int64_t j = (n + r) * n_groups + g;
    t[r] = _mm512_fmadd_ps(q, _mm512_set1_ps(a.scales[j]), _mm512_set1_ps(a.zeros ? a.zeros[j] : 0.f));
  }
}

template <int NR, int M, int A>
inline void q4_tile(const KernelArgs& a, int64_t n, float (&out)[NR][M]) {
  const int64_t Kh = a.K, gb = a.group, n_groups = (Kh + gb - 1) / gb;
  const uint8_t* w[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) w[r] = static_cast<const uint8_t*>(a.w) + (n + r) * Kh;
  __m512 acc[NR][M][A], t[NR];
  zero(acc);
  int64_t g = 0;
  if (gb == 16) {  // group_size 32: one chunk per group; take groups in pairs for two more chains
    for (; (g + 2) * 16 <= Kh; g += 2) {
      q4_tables(a, n, n_groups, g, t);
      q4_chunk<NR, M, A, false>(a, w, 16 * g, 0, t, acc, 0);
      q4_tables(a, n, n_groups, g + 1, t);
      q4_chunk<NR, M, A, false>(a, w, 16 * g + 16, 0, t, acc, 2);
    }
  }
  for (; g < n_groups; ++g) {
    q4_tables(a, n, n_groups, g, t);
    int64_t b = g * gb;
    const int64_t b1 = imin(Kh, b + gb);
    for (; b + 32 <= b1; b += 32) {
      q4_chunk<NR, M, A, false>(a, w, b, 0, t, acc, 0);
      q4_chunk<NR, M, A, false>(a, w, b + 16, 0, t, acc, 2);
    }
    for (; b < b1; b += 16) q4_chunk<NR, M, A, true>(a, w, b, first(b1 - b), t, acc, 0);
  }
  reduce(acc, out);
}

// ---------------------------------------------------------------------------------- row blocks

// pairs(): whether to take weight rows two at a time (NR = 2); measured per kernel, 1 thread:
//  * fp32: no gain at any M (W loads and FMAs grow together, so nothing is saved).
//  * int8 per-row scales at M = 1: 40 vs 20-27 G weights/s on the streamed 49152x576 lm_head (one
//    row at a time keeps a single sequential stream); pairs win at M >= 2 and with group scales.
//  * int4: pairs win (38 vs 32 G weights/s at M = 1 on the lm_head), but not at M = 1 from 1024 columns:
//    there a pair's two interleaved streams ran a 66 MB 1536-column GEMV in 1.19-1.23x the time of one
//    row at a time on Zen 4 (at 576 columns pairs 0.96-0.98x; scripts/gemv_stream_ab.py --weights q4f).
//  * fp32: 2 chains per row whatever M (a fp32 row streams 64 bytes per FMA: two chains already outrun
//    memory), so a row's result does not depend on M; up to 8 rows in one pass (16 accumulators).
struct Dense32 {
  static bool pairs(const KernelArgs&) { return false; }
  template <int NR, int M>
  static void tile(const KernelArgs& a, int64_t n, float (&out)[NR][M]) {
    dense_groups<NR, M, 2, 8, 0, float>(a, n, out);
  }
};
template <class T>
struct Dense16 {  // bf16 / fp16 weights: Dense32's loop on the weights made fp32 in registers (same bits)
  static bool pairs(const KernelArgs&) { return false; }
  template <int NR, int M>
  static void tile(const KernelArgs& a, int64_t n, float (&out)[NR][M]) {
    dense_groups<NR, M, 2, 8, 0, T>(a, n, out);
  }
};
struct Dense8 {
  static bool pairs(const KernelArgs& a) { return a.M > 1 || a.group > 0; }
  template <int NR, int M>
  static void tile(const KernelArgs& a, int64_t n, float (&out)[NR][M]) {
    dense_tile<NR, M, chains(M == 1 ? 1 : 2, M, 8), int8_t>(a, a.x, n, out);
  }
};
struct Int4 {
  static bool pairs(const KernelArgs& a) { return a.M > 1 || a.K < 1024; }
  template <int NR, int M>
  static void tile(const KernelArgs& a, int64_t n, float (&out)[NR][M]) {
    q4_tile<NR, M, chains(2, M, 4)>(a, n, out);  // q4_chunk uses at most 4
  }
};

template <class Op, int NR, int M>
inline void tile_store(const KernelArgs& a, int64_t n) {
  float out[NR][M];
  Op::template tile<NR, M>(a, n, out);
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) a.y[m * a.N + n + r] = out[r][m] + (a.bias ? a.bias[n + r] : 0.f);
}

template <class Op, int M>
void block(const KernelArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (Op::pairs(a))
    for (; n + 2 <= n1; n += 2) tile_store<Op, 2, M>(a, n);
  for (; n < n1; ++n) tile_store<Op, 1, M>(a, n);
}

template <class Op>
void dispatch(const KernelArgs& a, int64_t n0, int64_t n1) {
  switch (a.M) {
    case 1: return block<Op, 1>(a, n0, n1);
    case 2: return block<Op, 2>(a, n0, n1);
    case 3: return block<Op, 3>(a, n0, n1);
    case 4: return block<Op, 4>(a, n0, n1);
    case 5: return block<Op, 5>(a, n0, n1);
    case 6: return block<Op, 6>(a, n0, n1);
    case 7: return block<Op, 7>(a, n0, n1);
    default: return block<Op, 8>(a, n0, n1);
  }
}

// Batch-1 fp32 / bf16 / fp16 rows (T float / Bf16 / Fp16): dense_tile<1, 1, 2>'s chunks into the same two chains
// and the same reduction (equal bits, so a plain step's row still equals a verify row, and a bf16 row
// or fp16 row equals the fp32 row of its weights made fp32), with the operands held in registers instead
// of reloaded from `a` every row, and no software prefetch: at one activation row the loop is a bare
// stream, which the hardware prefetcher keeps fed, and the requests only took L1 miss buffers. SmolLM2
// fp32 step + head, 2 threads, Zen 4 (scripts/i8_rows_ab.py --dequantize): 0.97x the time from the
// operands in registers, 0.96-0.99x more without the prefetch (0.88x together in a fast-memory spell);
// at 8 rows the prefetch still pays (1.11x slower without), so dense_tile keeps it.
template <class T>
void dense_rows_m1(const KernelArgs& a, int64_t n0, int64_t n1) {
  const float* __restrict x = a.x;
  const float* __restrict bias = a.bias;
  float* __restrict y = a.y;
  const int64_t K = a.K;
  const T* w = static_cast<const T*>(a.w) + n0 * K;
  for (int64_t n = n0; n < n1; ++n, w += K) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      acc0 = _mm512_fmadd_ps(load_w<false>(w + k, 0), _mm512_loadu_ps(x + k), acc0);
      acc1 = _mm512_fmadd_ps(load_w<false>(w + k + 16, 0), _mm512_loadu_ps(x + k + 16), acc1);
    }
    for (; k + 16 <= K; k += 16) acc0 = _mm512_fmadd_ps(load_w<false>(w + k, 0), _mm512_loadu_ps(x + k), acc0);
    if (k < K) {
      const __mmask16 mk = first(K - k);
      acc0 = _mm512_fmadd_ps(load_w<true>(w + k, mk), _mm512_maskz_loadu_ps(mk, x + k), acc0);
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (bias ? bias[n] : 0.f);
  }
}

}  // namespace

namespace avx512 {
void f32_rows(const KernelArgs& a, int64_t n0, int64_t n1) {
  if (a.M == 1 && a.group == 0 && a.scales == nullptr) return dense_rows_m1<float>(a, n0, n1);
  dispatch<Dense32>(a, n0, n1);
}
void bf16_rows(const KernelArgs& a, int64_t n0, int64_t n1) {
  if (a.M == 1) return dense_rows_m1<Bf16>(a, n0, n1);
  dispatch<Dense16<Bf16>>(a, n0, n1);
}
void f16_rows(const KernelArgs& a, int64_t n0, int64_t n1) {
  if (a.M == 1) return dense_rows_m1<Fp16>(a, n0, n1);
  dispatch<Dense16<Fp16>>(a, n0, n1);
}
void q8_rows(const KernelArgs& a, int64_t n0, int64_t n1) { dispatch<Dense8>(a, n0, n1); }
void q4_rows(const KernelArgs& a, int64_t n0, int64_t n1) { dispatch<Int4>(a, n0, n1); }
}  // namespace avx512

}  // namespace leanformer

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
