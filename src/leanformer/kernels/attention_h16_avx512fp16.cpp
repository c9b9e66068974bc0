// The fp16 encoder attention's loops (attention_h16.h) with AVX512-FP16, chosen at run time by
// attention_h16.cpp from CPUID. Only this file is compiled for AVX512-FP16; it includes nothing but plain
// headers, vec16h.h, attention_impl.h (shared helpers) and <immintrin.h> (see avx512.h for why).
//
// Per (batch, head), with n = the keys up to the last unmasked one, nw = n rounded up to 32:
//   K^T in fp16 key tiles [tp / KT][D][KT]; V as fp16 key pairs [nw / 2][D / 16][32] whose lanes 2i,
//   2i + 1 hold (v[2j, d], v[2j + 1, d]), so a 32-bit broadcast of (p[2j], p[2j + 1]) feeds one
//   vfmadd231ph (the lane-pair layout of gemm_h16_avx512fp16.cpp);
//   per block of 24 query rows: S = Q K^T in fp16 register tiles (one chain of D products per score),
//   P = 2^(log2(e) scale (S - rowmax)) in fp16 arithmetic, 32 lanes at a time, its row sum in fp32,
//   O = P V (fp16 chains of kH16Chain key pairs added into fp32), out = O / rowsum(P).
// Why fp16 scores and softmax: with Q K^T and the softmax in fp32 they took ~60% of the time (one thread,
// [16, 12, 256, 32]); simulated on all-MiniLM-L6-v2 over 256-token texts, fp16 scores and softmax move the
// embeddings' mean 1 - cosine to fp32 from 1.5e-6 (fp16 q/k/v alone) to 1.9e-6 (docs/BENCHMARKS.md).
// The q/k/v rows sit 3 * H * D apart, beyond the hardware's stride prefetch: rows are prefetched by hand.
#include <immintrin.h>

#include <cstdint>

#include "attention_h16.h"
#include "gemm_h16.h"  // kH16Chain

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512fp16,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512fp16,fma")
#endif

#include "attention_impl.h"  // attn_live_keys, attn_round_up, LF_UNROLL
#include "vec16h.h"          // add_widened, pair_sums, widen_lo / widen_hi

namespace leanformer {
namespace {

constexpr int kMQ = 24;     // query rows per block
constexpr int kSums = 128;  // fp32 sums per row: 4 vectors x 2 lane halves x 16

inline char* align64(char* p) { return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); }

struct Scratch {
  uint16_t* kt;    // [tp / KT][D][KT]
  uint16_t* vp;    // [nw / 2][D / 16][32]
  uint16_t* qb;    // [kMQ][D]
  uint16_t* s;     // [kMQ][tp]
  uint16_t* p;     // [kMQ][T + 32]
  uint16_t* bias;  // [T + 32]
  float* sums;     // [kMQ][kSums]
};

// Scratch parts for T keys: T + 128 covers any key tile, T + 32 any rounding to 32.
constexpr int64_t part(int64_t bytes) { return (bytes + 63) / 64 * 64; }

int64_t scratch_bytes(int64_t T, int64_t D) {
  const int64_t tp = T + 128, np = T + 32;
  return 64 + part(D * tp * 2) + part(np * D * 2) + part(kMQ * D * 2) + part(kMQ * tp * 2) + part(kMQ * np * 2) +
         part(np * 2) + part(kMQ * kSums * 4);
}

Scratch carve(void* base, int64_t T, int64_t D) {
  char* p = align64(static_cast<char*>(base));
  const int64_t tp = T + 128, np = T + 32;
  Scratch s{};
  s.kt = reinterpret_cast<uint16_t*>(p), p += part(D * tp * 2);
  s.vp = reinterpret_cast<uint16_t*>(p), p += part(np * D * 2);
  s.qb = reinterpret_cast<uint16_t*>(p), p += part(kMQ * D * 2);
  s.s = reinterpret_cast<uint16_t*>(p), p += part(kMQ * tp * 2);
  s.p = reinterpret_cast<uint16_t*>(p), p += part(kMQ * np * 2);
  s.bias = reinterpret_cast<uint16_t*>(p), p += part(np * 2);
  s.sums = reinterpret_cast<float*>(p);
  return s;
}

inline __m512h load_ph(const uint16_t* p) { return _mm512_castsi512_ph(_mm512_loadu_si512(p)); }
inline void store_ph(uint16_t* p, __m512h x) { _mm512_storeu_si512(p, _mm512_castph_si512(x)); }

// r[i][k] -> r[k][i] for a 16 x 16 block of floats: unpack pairs, then quads, then 128-bit lanes (64
// shuffles for 256 values; element-wise stores took ~13% of this kernel).
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// s[R, KV * 32] (row stride lds) = q[R, D] (rows D apart) . kt[D, KV * 32] (one key tile), in fp16: each
// score one chain of D products. A 16-bit broadcast of q feeds KV vfmadd231ph.
template <int R, int KV>
inline void qk_tile(const uint16_t* q, int64_t D, const uint16_t* kt, uint16_t* s, int64_t lds) {
  __m512h acc[R][KV];
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int u = 0; u < KV; ++u) acc[r][u] = _mm512_setzero_ph();
  for (int64_t d = 0; d < D; ++d) {
    __m512h b[KV];
    LF_UNROLL
    for (int u = 0; u < KV; ++u) b[u] = load_ph(kt + d * (KV * 32) + u * 32);
    LF_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512h a = _mm512_castsi512_ph(_mm512_set1_epi16(static_cast<short>(q[r * D + d])));
      LF_UNROLL
      for (int u = 0; u < KV; ++u) acc[r][u] = _mm512_fmadd_ph(a, b[u], acc[r][u]);
    }
  }
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int u = 0; u < KV; ++u) store_ph(s + r * lds + u * 32, acc[r][u]);
}

// One score row s[0, nw) (fp16) -> fp16 probabilities p[0, nw) = 2^(c (s + bias - max)), c = log2(e) *
// scale; returns their sum (fp32). With kBias, bias[j] (0 or -inf) masks keys and the lanes past n. 2^t by
// a degree-3 polynomial for 2^f, |f| <= 1/2, and vscalefph: 5.5e-4 relative at most in fp16 arithmetic
// (rounding alone: 4.8e-4); t clamped at -30, so masked keys give exactly 0.
template <bool kBias>
inline float softmax_row(const uint16_t* s, const uint16_t* bias, int64_t nw, _Float16 c, uint16_t* p) {
  __m512h mx = _mm512_set1_ph(static_cast<_Float16>(-__builtin_inff()));
  for (int64_t j = 0; j < nw; j += 32) {
    __m512h x = load_ph(s + j);
    if constexpr (kBias) x = _mm512_add_ph(x, load_ph(bias + j));
    mx = _mm512_max_ph(mx, x);
  }
  const float m = _mm512_reduce_max_ps(_mm512_max_ps(widen_lo(mx), widen_hi(mx)));
  const __m512h mv = _mm512_set1_ph(static_cast<_Float16>(m)), cv = _mm512_set1_ph(c);
  const __m512h lo = _mm512_set1_ph(static_cast<_Float16>(-30.f));
  const __m512h c0 = _mm512_set1_ph(static_cast<_Float16>(0.9999280711208737f));
  const __m512h c1 = _mm512_set1_ph(static_cast<_Float16>(0.6932609944914818f));
  const __m512h c2 = _mm512_set1_ph(static_cast<_Float16>(0.24261116559683527f));
  const __m512h c3 = _mm512_set1_ph(static_cast<_Float16>(0.055171641571356386f));
  __m512 sum = _mm512_setzero_ps();
  __m512h pair = _mm512_setzero_ph();  // two vectors' probabilities summed in fp16 (each lane <= 2), then fp32
  for (int64_t j = 0; j < nw; j += 32) {
    __m512h x = load_ph(s + j);
    if constexpr (kBias) x = _mm512_add_ph(x, load_ph(bias + j));
    const __m512h t = _mm512_max_ph(_mm512_mul_ph(_mm512_sub_ph(x, mv), cv), lo);
    const __m512h n = _mm512_roundscale_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512h f = _mm512_sub_ph(t, n);
    const __m512h y = _mm512_fmadd_ph(_mm512_fmadd_ph(_mm512_fmadd_ph(c3, f, c2), f, c1), f, c0);
    const __m512h pv = _mm512_scalef_ph(y, n);
    store_ph(p + j, pv);
    pair = _mm512_add_ph(pair, pv);
    if ((j / 32) % 2 == 1 || j + 32 >= nw) {
      sum = _mm512_add_ps(_mm512_add_ps(sum, widen_lo(pair)), widen_hi(pair));
      pair = _mm512_setzero_ph();
    }
  }
  return _mm512_reduce_add_ps(sum);
}

// R rows of p (row stride ldp) times key pairs [j0, j1) of CV vectors of vp (pair stride ldv), at most
// kH16Chain pairs: one fp16 chain per lane, then added into sums (row stride kSums).
template <int R, int CV>
inline void pv_block(const uint16_t* p, int64_t ldp, const uint16_t* vp, int64_t ldv, int64_t j0, int64_t j1,
                     float* sums) {
  __m512h acc[R][CV];
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_setzero_ph();
  for (int64_t j = j0; j < j1; ++j) {
    __m512h b[CV];
    LF_UNROLL
    for (int c = 0; c < CV; ++c) b[c] = load_ph(vp + j * ldv + c * 32);
    LF_UNROLL
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, p + r * ldp + 2 * j, 4);
      const __m512h a = _mm512_castsi512_ph(_mm512_set1_epi32(pair));
      LF_UNROLL
      for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_fmadd_ph(a, b[c], acc[r][c]);
    }
  }
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int c = 0; c < CV; ++c) add_widened(acc[r][c], sums + r * kSums + c * 32);
}

// Where a block's output rows go.
struct OutRows {
  uint16_t* out16;  // or null: out32
  float* out32;
  int64_t ldo;
};

// Rows [0, rows) of O[:, 16 c0 : 16 (c0 + CV)] = P V / rowsum, written to out (row r at r * ldo, the
// column block's first value at 16 c0); returns the running largest |value| written.
template <int CV>
inline __m512 pv_rows(const uint16_t* p, int64_t ldp, const uint16_t* vp, int64_t D, int64_t pairs, int64_t c0,
                      int64_t rows, const float* inv, float* sums, const OutRows& o, __m512 amax) {
  constexpr int R = kMQ / CV;
  for (int64_t r = 0; r < kMQ; ++r)
    for (int c = 0; c < 2 * CV; ++c) _mm512_storeu_ps(sums + r * kSums + c * 16, _mm512_setzero_ps());
  const uint16_t* vc = vp + c0 * 32;
  for (int64_t j0 = 0; j0 < pairs; j0 += kH16Chain) {
    const int64_t j1 = j0 + kH16Chain < pairs ? j0 + kH16Chain : pairs;
    for (int64_t r0 = 0; r0 < rows; r0 += R) pv_block<R, CV>(p + r0 * ldp, ldp, vc, 2 * D, j0, j1, sums + r0 * kSums);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < CV; ++c) {
      const __m512 y = _mm512_mul_ps(pair_sums(sums + r * kSums + c * 32), _mm512_set1_ps(inv[r]));
      const int64_t at = r * o.ldo + (c0 + c) * 16;
      if (o.out16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.out16 + at), _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(y));
      } else {
        _mm512_storeu_ps(o.out32 + at, y);
      }
    }
  return amax;
}

// One (batch, head): K^T in key tiles of KT = KV * 32 keys, Q K^T tiles of kMQ / KV rows.
template <int KV>
__m512 head(const H16AttnArgs& a, int64_t bh, const Scratch& sc, __m512 amax) {
  constexpr int64_t KT = KV * 32, QR = kMQ / KV;
  const int64_t T = a.T, D = a.D, H = a.H, ld = a.ld, b = bh / H, h = bh % H;
  const uint16_t* q16 = a.qkv + b * T * ld + h * D;
  const uint16_t* k16 = q16 + H * D;
  const uint16_t* v16 = q16 + 2 * H * D;
  OutRows o{a.out16 ? a.out16 + b * T * a.ldo + h * D : nullptr, a.out32 ? a.out32 + b * T * a.ldo + h * D : nullptr,
            a.ldo};

  const uint8_t* mask = a.mask ? a.mask + b * T : nullptr;
  bool gap = false;
  const int64_t n = attn_live_keys(mask, T, &gap);
  if (n == 0) {  // every key masked: zeros, as torch's SDPA returns
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) {
        if (o.out16)
          o.out16[t * o.ldo + d] = 0;
        else
          o.out32[t * o.ldo + d] = 0.f;
      }
    return amax;
  }
  const int64_t tp = attn_round_up(n, KT), nw = attn_round_up(n, 32), pairs = nw / 2, ldp = T + 32;

  // K^T (keys past n zero), 16 keys x 16 values at a time through a register transpose in fp32 (exact both
  // ways); the q / k / v rows of the next 16 keys prefetched on the way.
  for (int64_t j0 = 0; j0 < tp; j0 += 16) {
    for (int64_t j = j0 + 16; j < j0 + 32 && j < T; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(q16 + j * ld), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(k16 + j * ld), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v16 + j * ld), _MM_HINT_T0);
    }
    uint16_t* dst = sc.kt + (j0 / KT) * D * KT + j0 % KT;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k16 + (j0 + i) * ld + d0)))
                          : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (d0 + i) * KT), _mm512_cvtps_ph(r[i], _MM_FROUND_TO_NEAREST_INT));
    }
  }
  // V as key pairs (zero past n).
  __m512i lo_idx, hi_idx;
  {
    alignas(64) int16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) lo[2 * i] = i, lo[2 * i + 1] = 32 + i, hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
    lo_idx = _mm512_load_si512(lo), hi_idx = _mm512_load_si512(hi);
  }
  for (int64_t j2 = 0; j2 < pairs; ++j2) {
    const int64_t ka = 2 * j2, kb = 2 * j2 + 1;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const __mmask32 m = D - d0 >= 32 ? 0xffffffffu : 0xffffu;
      const __m512i va = ka < n ? _mm512_maskz_loadu_epi16(m, v16 + ka * ld + d0) : _mm512_setzero_si512();
      const __m512i vb = kb < n ? _mm512_maskz_loadu_epi16(m, v16 + kb * ld + d0) : _mm512_setzero_si512();
      uint16_t* dst = sc.vp + j2 * 2 * D + 2 * d0;
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, lo_idx, vb));
      if (D - d0 > 16) _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(va, hi_idx, vb));
    }
  }
  const bool use_bias = gap || nw != n;
  if (use_bias)
    for (int64_t j = 0; j < nw; ++j) sc.bias[j] = (j < n && (!mask || mask[j])) ? 0 : 0xfc00;  // fp16 0 / -inf
  const _Float16 c = static_cast<_Float16>(a.scale * 1.44269504088896341f);  // exp(scale x) = 2^(c x)

  for (int64_t i0 = 0; i0 < T; i0 += kMQ) {
    const int64_t rows = T - i0 < kMQ ? T - i0 : kMQ;
    for (int64_t r = 0; r < kMQ; ++r)
      for (int64_t d0 = 0; d0 < D; d0 += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.qb + r * D + d0),
                            r < rows ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + (i0 + r) * ld + d0))
                                     : _mm256_setzero_si256());
    for (int64_t r0 = 0; r0 < rows; r0 += QR)
      for (int64_t j0 = 0; j0 < tp; j0 += KT) qk_tile<QR, KV>(sc.qb + r0 * D, D, sc.kt + j0 * D, sc.s + r0 * tp + j0, tp);
    float inv[kMQ];
    for (int64_t r = 0; r < rows; ++r) {
      const float sum = use_bias ? softmax_row<true>(sc.s + r * tp, sc.bias, nw, c, sc.p + r * ldp)
                                 : softmax_row<false>(sc.s + r * tp, sc.bias, nw, c, sc.p + r * ldp);
      inv[r] = 1.f / sum;
    }
    for (int64_t r = rows; r < kMQ; ++r)  // the last block's rows past T: read by whole PV tiles, never written
      for (int64_t j = 0; j < nw; ++j) sc.p[r * ldp + j] = 0;
    OutRows ob{o.out16 ? o.out16 + i0 * o.ldo : nullptr, o.out32 ? o.out32 + i0 * o.ldo : nullptr, o.ldo};
    for (int64_t c0 = 0; c0 < D / 16; c0 += 4) {
      switch (D / 16 - c0) {
        case 1: amax = pv_rows<1>(sc.p, ldp, sc.vp, D, pairs, c0, rows, inv, sc.sums, ob, amax); break;
        case 2: amax = pv_rows<2>(sc.p, ldp, sc.vp, D, pairs, c0, rows, inv, sc.sums, ob, amax); break;
        case 3: amax = pv_rows<3>(sc.p, ldp, sc.vp, D, pairs, c0, rows, inv, sc.sums, ob, amax); break;
        default: amax = pv_rows<4>(sc.p, ldp, sc.vp, D, pairs, c0, rows, inv, sc.sums, ob, amax); break;
      }
    }
  }
  return amax;
}

}  // namespace

int64_t h16_attn_scratch_bytes(int64_t T, int64_t D) { return scratch_bytes(T, D); }

float h16_attention_heads(const H16AttnArgs& a, int64_t bh0, int64_t bh1, void* scratch) {
  const Scratch sc = carve(scratch, a.T, a.D);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    // Short inputs take narrower key tiles (a 128-key tile would be mostly padding).
    if (a.T <= 32)
      amax = head<1>(a, bh, sc, amax);
    else if (a.T <= 64)
      amax = head<2>(a, bh, sc, amax);
    else
      amax = head<4>(a, bh, sc, amax);
  }
  return _mm512_reduce_max_ps(amax);
}

}  // namespace leanformer

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
