// The fused decode step's per-row attention pieces (decode.cpp includes this once): RoPE, KV-cache
// entries read as fp32 from float / fp16 / int8 storage and written back, and the score and weighted-sum
// loops over keys that live either contiguously (slot-major caches) or wherever a paged pool's block
// table puts them (KeyRows).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace leanformer {
namespace {

// HF's rotate_half RoPE with the signed sin table of models/layers.Rotary: y = x * cos + swap_halves(x) * sin
inline void rope(const float* x, const float* cos, const float* sin, float* y, int64_t D) {
  const int64_t half = D / 2;
  for (int part = 0; part < 2; ++part) {  // y[:half] pairs x[:half] with x[half:], y[half:] the reverse
    const int64_t a = part * half, b = half - a;
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + a + i), _mm256_loadu_ps(cos + a + i));
      _mm256_storeu_ps(y + a + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + b + i), _mm256_loadu_ps(sin + a + i), v));
    }
    for (; i < half; ++i) y[a + i] = x[a + i] * cos[a + i] + x[b + i] * sin[a + i];
  }
}

// KV entries as fp32: float, int8 codes (their scale applied by the caller) or fp16 bits (uint16_t)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }
inline float to_f32(uint16_t v) { return _cvtsh_ss(v); }

// fp32 -> fp16 bits, round to nearest even (torch's rounding, so both paths store the same cache)
inline void store_half(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

// dot(a, b) with b fp32 or int8 (a KV row; an int8 row's scale is applied by the caller)
template <class T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

// out += p * row, row fp32 or int8
template <class T>
inline void axpy(float p, const T* row, float* out, int64_t n) {
  const __m256 vp = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vp, load8(row + i), _mm256_loadu_ps(out + i)));
  for (; i < n; ++i) out[i] += p * to_f32(row[i]);
}

// [sum(a[0]), ..., sum(a[7])]: eight horizontal sums in one transposing reduction
inline __m256 hsum8(const __m256 (&a)[8]) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// Where key s of one (row, KV head) lives, as a row index into the cache seen as [rows, D] (and its
// int8 scales as [rows]): base + s in a slot-major [slots, KV, max_seq, D] cache, or idx[s] for a paged
// pool [blocks, KV, block_size, D] whose rows the caller lists per position (models/paged_cache.py).
struct KeyRows {
  const int64_t* idx;  // null: contiguous from base
  int64_t base;
  int64_t limit = 0;  // rows 0..limit-1 valid to prefetch (past S: the next chunk's); 0: S; -1: none
  int64_t operator[](int64_t s) const { return idx ? idx[s] : base + s; }
  // The rows a pass over S keys may request ahead: [0, this).
  int64_t prefetch_end(int64_t S) const { return limit < 0 ? 0 : limit > S ? limit : S; }
};

// Rows kAheadRows ahead are requested into L2 while a block is computed (T1: an L1 request would hold
// one of the core's few L1 miss buffers for the trip to memory; decode_attn_avx512.cpp measured why).
// These loops had no prefetch before, and a paged pool's rows defeat the stream prefetcher: step + head
// 0.90x the time at 1,500 keys (fp32 cache), 0.92x fp16, 0.87x a paged pool, 0.98x for 4 chained rows
// (the first query of a task requests for all), 1.0x at 200 keys (Zen 4 with set_isa("avx2"), 2 threads,
// scripts/i8_rows_ab.py --isa avx2).
constexpr int64_t kAheadRows = 32;
template <class T>
inline void prefetch_row(const T* base, KeyRows r, int64_t s, int64_t D) {
  const char* p = reinterpret_cast<const char*>(base + r[s] * D);
  for (int64_t off = 0; off < D * int64_t(sizeof(T)); off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

// p[s] = (q . K[r[s]]) * ks[r[s]] * scale for s < S (ks null: fp32 / fp16 keys). Eight keys per pass
// share each q load and one reduction.
template <class T>
inline void scores(const float* q, const T* K, const float* ks, KeyRows r, int64_t S, int64_t D, float scale,
                   float* p) {
  const int64_t lim = r.prefetch_end(S);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    if (s + kAheadRows + 8 <= lim)
      LF_UNROLL
      for (int k = 0; k < 8; ++k) prefetch_row(K, r, s + kAheadRows + k, D);
    const T* row[8];
    LF_UNROLL
    for (int k = 0; k < 8; ++k) row[k] = K + r[s + k] * D;
    __m256 acc[8];
    LF_UNROLL
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      LF_UNROLL
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, load8(row[k] + i), acc[k]);
    }
    __m256 d = hsum8(acc);
    if (i < D) {
      alignas(32) float tail[8];
      for (int k = 0; k < 8; ++k) {
        tail[k] = 0.f;
        for (int64_t c = i; c < D; ++c) tail[k] += q[c] * to_f32(row[k][c]);
      }
      d = _mm256_add_ps(d, _mm256_load_ps(tail));
    }
    if (ks) {
      alignas(32) float kss[8];
      for (int k = 0; k < 8; ++k) kss[k] = ks[r[s + k]];
      d = _mm256_mul_ps(d, _mm256_load_ps(kss));
    }
    _mm256_storeu_ps(p + s, _mm256_mul_ps(d, _mm256_set1_ps(scale)));
  }
  for (; s < S; ++s) {
    const float d = dot(q, K + r[s] * D, D);
    p[s] = (ks ? d * ks[r[s]] : d) * scale;
  }
}

// o = sum_s p[s] * vs[r[s]] * V[r[s]] with the D8 * 8 outputs in registers
template <int D8, class T>
inline void weighted_sum_fixed(const float* p, const T* V, const float* vs, KeyRows r, int64_t S, float* o) {
  __m256 acc[D8];
  LF_UNROLL
  for (int c = 0; c < D8; ++c) acc[c] = _mm256_setzero_ps();
  const int64_t lim = r.prefetch_end(S);
  for (int64_t s = 0; s < S; ++s) {
    if (s + kAheadRows < lim) prefetch_row(V, r, s + kAheadRows, 8 * D8);
    const int64_t at = r[s];
    const __m256 w = _mm256_set1_ps(vs ? p[s] * vs[at] : p[s]);
    const T* row = V + at * (8 * D8);
    LF_UNROLL
    for (int c = 0; c < D8; ++c) acc[c] = _mm256_fmadd_ps(w, load8(row + 8 * c), acc[c]);
  }
  LF_UNROLL
  for (int c = 0; c < D8; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
}

template <class T>
inline void weighted_sum(const float* p, const T* V, const float* vs, KeyRows r, int64_t S, int64_t D, float* o) {
  switch (D) {
    case 32: return weighted_sum_fixed<4>(p, V, vs, r, S, o);
    case 64: return weighted_sum_fixed<8>(p, V, vs, r, S, o);
    case 128: return weighted_sum_fixed<16>(p, V, vs, r, S, o);
    default:
      std::fill(o, o + D, 0.f);
      for (int64_t s = 0; s < S; ++s) axpy(vs ? p[s] * vs[r[s]] : p[s], V + r[s] * D, o, D);
  }
}

// The KV-cache writes as models/kv_cache.py's int8 storage does them: scale = max|x| / 127 (at least
// 1e-8 / 127), code = round-half-even(x / scale).
inline void quantize_row(const float* x, int64_t D, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = std::max(amax, 1e-8f) / 127.f;
  for (int64_t i = 0; i < D; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] / s));
  *scale = s;
}

}  // namespace
}  // namespace leanformer
