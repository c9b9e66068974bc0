// The fp16 GEMM's tile loop (gemm_h16.h) with AVX512-FP16's vfmadd231ph, chosen at run time by
// gemm_h16.cpp from CPUID. Only this file is compiled for AVX512-FP16; it includes nothing but
// gemm_h16.h, vec16.h, vec16h.h, <cstdint> and <immintrin.h> (see avx512.h for why).
//
// Register tile: 6 rows of x by 4 vectors of the panel (64 columns): 24 fp16 accumulators, 4 panel
// vectors, 1 broadcast. Each panel vector holds 16 columns as lane pairs (w[n, 2j], w[n, 2j + 1]), so
// one 32-bit broadcast of (x[m, 2j], x[m, 2j + 1]) feeds it: a 16-bit broadcast would cost a shuffle-port
// uop per row (port 5, which the second FMA unit shares). The pairs are added once, at the end.
#include <immintrin.h>

#include <cstdint>

#include "gemm_h16.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512fp16,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512fp16,fma")
#endif

#include "vec16.h"
#include "vec16h.h"  // add_widened, pair_sums, widen_lo / widen_hi

namespace leanformer {
namespace {

constexpr int kRows = 6, kVecs = 4;

// GELU (erf form), 16 lanes: erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7, torch's vectorized
// erf) with 1 / (1 + p|x|) from rcp14 and one Newton step (a division's cost is most of the pass), and
// exp(-x^2) from exp2_poly4_nonpos: within 5e-7 of torch's GELU. The epilogue measured ~20% of the FFN's
// first matmul (one thread, 4096 x 384 x 1536) with vec16.h's ~1-ulp exp, which it no longer uses.
inline __m512 gelu16(__m512 v) {
  const __m512 x = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)), one = _mm512_set1_ps(1.f);
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax, one);
  __m512 t = _mm512_rcp14_ps(d);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.f)));
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
  const __m512 e = exp2_poly4_nonpos(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-1.44269504088896341f)));  // exp(-x^2)
  const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(e, t), r, one);
  const __m512 erf = _mm512_mask_sub_ps(erf_abs, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                                        _mm512_setzero_ps(), erf_abs);
  return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
}

// GELU (erf form) on 32 fp16 lanes in fp16 arithmetic, for fp16 outputs (the FFN's first matmul in a
// float16 encoder): the erf of gelu16 (Abramowitz-Stegun 7.1.26), 1 / (1 + p|z|) from vrcpph, exp(-z^2) as
// 2^t with a degree-3 polynomial, and 2 Phi(x) taken as (1 - erf|z|) for x < 0 (no cancellation where
// GELU is small) or 2 - (1 - erf|z|). Half the vector operations per value of gelu16 and none of its
// conversions; the fp32 form measured ~20% of that matmul. Simulated on all-MiniLM-L6-v2 (every value of
// the FFN's intermediate through these roundings): mean 1 - cosine of the embeddings to fp32 1.76e-6 ->
// 1.99e-6 at 128 tokens, 2.01e-6 -> 2.18e-6 at 256 (docs/BENCHMARKS.md, session 29).
inline __m512h gelu32h(__m512h x) {
  const __m512h one = _mm512_set1_ph(static_cast<_Float16>(1.f));
  const __m512h z = _mm512_mul_ph(x, _mm512_set1_ph(static_cast<_Float16>(0.70710678f)));
  const __m512h t = _mm512_rcp_ph(_mm512_fmadd_ph(_mm512_set1_ph(static_cast<_Float16>(0.3275911f)), _mm512_abs_ph(z), one));
  __m512h r = _mm512_fmadd_ph(_mm512_set1_ph(static_cast<_Float16>(1.061405429f)), t, _mm512_set1_ph(static_cast<_Float16>(-1.453152027f)));
  r = _mm512_fmadd_ph(r, t, _mm512_set1_ph(static_cast<_Float16>(1.421413741f)));
  r = _mm512_fmadd_ph(r, t, _mm512_set1_ph(static_cast<_Float16>(-0.284496736f)));
  r = _mm512_fmadd_ph(r, t, _mm512_set1_ph(static_cast<_Float16>(0.254829592f)));
  const __m512h e2 = _mm512_max_ph(_mm512_mul_ph(_mm512_mul_ph(z, z), _mm512_set1_ph(static_cast<_Float16>(-1.44269504f))),
                                   _mm512_set1_ph(static_cast<_Float16>(-30.f)));  // log2 exp(-z^2)
  const __m512h n = _mm512_roundscale_ph(e2, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512h f = _mm512_sub_ph(e2, n);
  __m512h y = _mm512_fmadd_ph(_mm512_set1_ph(static_cast<_Float16>(0.055171641571356386f)), f,
                              _mm512_set1_ph(static_cast<_Float16>(0.24261116559683527f)));
  y = _mm512_fmadd_ph(y, f, _mm512_set1_ph(static_cast<_Float16>(0.6932609944914818f)));
  y = _mm512_fmadd_ph(y, f, _mm512_set1_ph(static_cast<_Float16>(0.9999280711208737f)));
  const __m512h tail = _mm512_mul_ph(_mm512_mul_ph(t, r), _mm512_scalef_ph(y, n));  // 1 - erf(|z|)
  const __mmask32 neg = _mm512_cmp_ph_mask(x, _mm512_setzero_ph(), _CMP_LT_OQ);
  const __m512h phi2 = _mm512_mask_blend_ph(neg, _mm512_sub_ph(_mm512_set1_ph(static_cast<_Float16>(2.f)), tail), tail);
  return _mm512_mul_ph(_mm512_mul_ph(x, _mm512_set1_ph(static_cast<_Float16>(0.5f))), phi2);
}

// The fp32 sums of one row's four panel vectors: lane pairs still apart ([vector][half][16 lanes]).
struct RowSums {
  float v[kVecs][2][16];
};

// Where one panel's finished columns go (H16Out resolved for the panel) and the running max |y| of fp16
// outputs, one accumulator per vector so that the maxima do not wait on each other. The maxima are taken on
// the bits of |y| as unsigned integers: the same order for numbers, and a NaN (bits above inf's) sticks.
struct PanelOut {
  const H16Out* out;
  int64_t n0;               // the panel's first column
  __mmask16 mask[kVecs];    // each vector's columns below N (0: none)
  __m512i amax[kVecs];       // fp32 |y| bits: fp16 outputs without GELU, or with the fp32 GELU
  __m512i amax16[kVecs / 2];  // fp16 |y| bits: fp16 outputs with the fp16 GELU (two vectors at a time)
};

// Row m's 64 finished columns (cols[v]: columns n0 + 16v + [0, 16) in fp32) through the epilogue: + bias,
// GELU, residual + (fp32 output only), stored as fp32 or fp16. Columns past N are masked off.
inline void finish_row(const __m512 (&cols)[kVecs], int64_t m, PanelOut& po) {
  const H16Out& out = *po.out;
  if (out.y16 && out.gelu) {  // GELU in fp16 arithmetic, 32 columns at a time (gelu32h)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; v += 2) {
      const int64_t n = po.n0 + 16 * v;
      __m256i h[2];
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u) {
        __m512 o = cols[v + u];
        if (out.bias) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(po.mask[v + u], out.bias + n + 16 * u));
        h[u] = _mm512_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      const __m512h y = gelu32h(_mm512_castsi512_ph(_mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1)));
      const __mmask32 mask = static_cast<__mmask32>(po.mask[v]) | (static_cast<__mmask32>(po.mask[v + 1]) << 16);
      _mm512_mask_storeu_epi16(out.y16 + m * out.ldy16 + n, mask, _mm512_castph_si512(y));
      po.amax16[v / 2] = _mm512_mask_max_epu16(po.amax16[v / 2], mask, po.amax16[v / 2],
                                               _mm512_castph_si512(_mm512_abs_ph(y)));
    }
    return;
  }
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    const int64_t n = po.n0 + 16 * v;
    const __mmask16 mask = po.mask[v];
    __m512 o = cols[v];
    if (out.bias) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(mask, out.bias + n));
    if (out.gelu) o = gelu16(o);
    if (out.y16) {
      const __m256i h = _mm512_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_mask_storeu_epi16(out.y16 + m * out.ldy16 + n, mask, h);
      po.amax[v] = _mm512_mask_max_epu32(po.amax[v], mask, po.amax[v], _mm512_castps_si512(_mm512_abs_ps(o)));
    } else {
      if (out.residual) o = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out.residual + m * out.ldr + n), o);
      _mm512_mask_storeu_ps(out.y + m * out.ldy + n, mask, o);
    }
  }
}

// Which chain of a panel a block runs: the first stores its widened sums (nothing to add to), the last
// finishes the rows from registers (no round trip through sums), one chain alone does both.
constexpr int kFirst = 1, kLast = 2;

// R rows of x16 (rows m0.. of the tile job) times pairs [j0, j1) of one panel (at most kH16Chain: one fp16
// chain per lane), the chains then added into sums[0..R) in fp32, or, for the last chain, the rows finished.
// pf (or null): the next block's panel values, asked for into L1 as this block reads its own, so that the
// next block's first row tile does not wait on L2 (given to the last row tile of each block: 1.016x the
// MiniLM products, one thread; a panel read from L1 throughout would be 1.10x).
template <int R, int kPhase>
inline void block(const uint16_t* x16, int64_t ldx, const uint16_t* panel, int64_t j0, int64_t j1, RowSums* sums,
                  int64_t m0, PanelOut& po, const uint16_t* pf = nullptr) {
  __m512h acc[R][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ph();
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* b = panel + j * (kVecs * 32);
    if (pf) {  // the same offset in the next block: 4 lines a step (prefetches past the panels never fault)
      const char* q = reinterpret_cast<const char*>(pf + (j - j0) * (kVecs * 32));
      for (int line = 0; line < 4; ++line) _mm_prefetch(q + 64 * line, _MM_HINT_T0);
    }
    const __m512h b0 = _mm512_castsi512_ph(_mm512_loadu_si512(b));
    const __m512h b1 = _mm512_castsi512_ph(_mm512_loadu_si512(b + 32));
    const __m512h b2 = _mm512_castsi512_ph(_mm512_loadu_si512(b + 64));
    const __m512h b3 = _mm512_castsi512_ph(_mm512_loadu_si512(b + 96));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x16 + r * ldx + 2 * j, 4);
      const __m512h a = _mm512_castsi512_ph(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_fmadd_ph(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ph(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ph(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ph(a, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m512 cols[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      float* s = sums[r].v[v][0];
      __m512 lo = widen_lo(acc[r][v]), hi = widen_hi(acc[r][v]);
      if constexpr (!(kPhase & kFirst)) {
        lo = _mm512_add_ps(_mm512_loadu_ps(s), lo);
        hi = _mm512_add_ps(_mm512_loadu_ps(s + 16), hi);
      }
      if constexpr (kPhase & kLast) {
        cols[v] = pair_sums(lo, hi);
      } else {
        _mm512_storeu_ps(s, lo);
        _mm512_storeu_ps(s + 16, hi);
      }
    }
    if constexpr (kPhase & kLast) finish_row(cols, m0 + r, po);
  }
}

template <int R, int kPhase>
inline void block_rows(const uint16_t* x16, int64_t ldx, int64_t M, const uint16_t* panel, int64_t j0, int64_t j1,
                       RowSums* sums, PanelOut& po, const uint16_t* pf) {
  int64_t m = 0;
  for (; m + R <= M; m += R) block<R, kPhase>(x16 + m * ldx, ldx, panel, j0, j1, sums + m, m, po, m + R == M ? pf : nullptr);
  switch (M - m) {  // the remainder tile is the last one
    case 5: block<5, kPhase>(x16 + m * ldx, ldx, panel, j0, j1, sums + m, m, po, pf); break;
    case 4: block<4, kPhase>(x16 + m * ldx, ldx, panel, j0, j1, sums + m, m, po, pf); break;
    case 3: block<3, kPhase>(x16 + m * ldx, ldx, panel, j0, j1, sums + m, m, po, pf); break;
    case 2: block<2, kPhase>(x16 + m * ldx, ldx, panel, j0, j1, sums + m, m, po, pf); break;
    case 1: block<1, kPhase>(x16 + m * ldx, ldx, panel, j0, j1, sums + m, m, po, pf); break;
    default: break;
  }
}

}  // namespace

void h16_tiles(const uint16_t* x16, int64_t ldx, int64_t M, const uint16_t* panels, int64_t K2, int64_t p0,
               int64_t p1, int64_t N, const H16Out& out) {
  // Loop order: K blocks of one chain outside, row tiles inside, so the panel's block (64 pairs x 256 B =
  // 16 KB) stays in L1 while every row tile of the chunk reads it; the fp32 sums (M x 512 B <= 12 KB) sit
  // in L1. The last chain finishes each row tile's columns from registers.
  RowSums sums[kH16Rows];
  const int64_t panel_size = K2 * kH16Panel * 2;
  const int64_t chains = K2 > 0 ? (K2 + kH16Chain - 1) / kH16Chain : 1;  // K = 0: one empty chain (bias only)
  PanelOut po;
  po.out = &out;
  for (int v = 0; v < kVecs; ++v) po.amax[v] = _mm512_setzero_si512();
  for (int v = 0; v < kVecs / 2; ++v) po.amax16[v] = _mm512_setzero_si512();
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* panel = panels + p * panel_size;
    po.n0 = p * kH16Panel;
    for (int v = 0; v < kVecs; ++v) {
      const int64_t left = N - po.n0 - 16 * v;
      po.mask[v] = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    }
    for (int64_t c = 0; c < chains; ++c) {
      const int64_t j0 = c * kH16Chain, j1 = j0 + kH16Chain < K2 ? j0 + kH16Chain : K2;
      // the next block's panel values: this panel's next chain, or the next panel's first (the next task's
      // when this call ends: tasks go panel by panel)
      const uint16_t* pf = c + 1 < chains                           ? panel + j1 * (kVecs * 32)
                           : (p + 1) * kH16Panel < N ? panel + panel_size
                                                     : nullptr;
      switch ((c == 0 ? kFirst : 0) | (c == chains - 1 ? kLast : 0)) {
        case kFirst: block_rows<kRows, kFirst>(x16, ldx, M, panel, j0, j1, sums, po, pf); break;
        case kLast: block_rows<kRows, kLast>(x16, ldx, M, panel, j0, j1, sums, po, pf); break;
        case kFirst | kLast: block_rows<kRows, kFirst | kLast>(x16, ldx, M, panel, j0, j1, sums, po, pf); break;
        default: block_rows<kRows, 0>(x16, ldx, M, panel, j0, j1, sums, po, pf); break;
      }
    }
  }
  if (out.y16) {
    __m512i amax = _mm512_max_epu32(_mm512_max_epu32(po.amax[0], po.amax[1]), _mm512_max_epu32(po.amax[2], po.amax[3]));
    const __m512h a16 = _mm512_castsi512_ph(_mm512_max_epu16(po.amax16[0], po.amax16[1]));  // widened: NaN stays NaN
    amax = _mm512_max_epu32(amax, _mm512_max_epu32(_mm512_castps_si512(widen_lo(a16)), _mm512_castps_si512(widen_hi(a16))));
    const uint32_t bits = _mm512_reduce_max_epu32(amax);
    float a;
    __builtin_memcpy(&a, &bits, 4);
    if (!(a <= *out.absmax)) *out.absmax = a;  // NaN sticks
  }
}

}  // namespace leanformer

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
