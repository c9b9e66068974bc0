// The fused decode step's attention loops (decode.cpp attend: scores, then softmax there, then the
// weighted sum of values) on 512-bit vectors, for CPUs with AVX-512 F/BW/VL/DQ: 16 columns per
// instruction where decode_kv.h's AVX2 loops take 8, and fp16 / int8 keys converted 16 at a time.
//
// Only this file is compiled for AVX-512 (the pragma below); it includes nothing but <immintrin.h>,
// <cstdint> and the plain interface header: see avx512.h for why.
#include <immintrin.h>

#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

#include "decode_attn_avx512.h"

#define LF_UNROLL _Pragma("GCC unroll 16")

namespace leanformer {
namespace avx512 {
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline int64_t row(KvRows r, int64_t s) { return r.idx ? r.idx[s] : r.base + s; }

// Eight 16-lane sums in one transposed pass: lane k of the result = sum of a[k]'s lanes.
inline __m256 sum8(const __m512 (&a)[8]) {
  auto halves = [](__m512 x, __m512 y) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  };
  auto quarters = [](__m512 z, __m512 u) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(z, u, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(z, u, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const __m512 s = quarters(halves(a[0], a[1]), halves(a[2], a[3])), s2 = quarters(halves(a[4], a[5]), halves(a[6], a[7]));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s, s2, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(s, s2, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, y));
}

// Eight keys per pass share each q load and one transposed reduction.
template <class T>
void scores_t(const float* q, const T* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p) {
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const T* rows[8];
    LF_UNROLL
    for (int k = 0; k < 8; ++k) rows[k] = K + row(r, s + k) * D;
    __m512 acc[8];
    LF_UNROLL
    for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __m512 qv = _mm512_loadu_ps(q + i);
      LF_UNROLL
      for (int k = 0; k < 8; ++k) acc[k] = _mm512_fmadd_ps(qv, load16(rows[k] + i), acc[k]);
    }
    __m256 d = sum8(acc);
    if (ks) {
      alignas(32) float kss[8];
      for (int k = 0; k < 8; ++k) kss[k] = ks[row(r, s + k)];
      d = _mm256_mul_ps(d, _mm256_load_ps(kss));
    }
    _mm256_storeu_ps(p + s, _mm256_mul_ps(d, _mm256_set1_ps(scale)));
  }
  for (; s < S; ++s) {
    const T* k = K + row(r, s) * D;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
    const float d = _mm512_reduce_add_ps(acc);
    p[s] = (ks ? d * ks[row(r, s)] : d) * scale;
  }
}

template <int D16, class T>
void weighted_sum_t(const float* p, const T* V, const float* vs, KvRows r, int64_t S, float* o) {
  __m512 acc[D16];
  LF_UNROLL
  for (int c = 0; c < D16; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t at = row(r, s);
    const __m512 w = _mm512_set1_ps(vs ? p[s] * vs[at] : p[s]);
    const T* v = V + at * (16 * D16);
    LF_UNROLL
    for (int c = 0; c < D16; ++c) acc[c] = _mm512_fmadd_ps(w, load16(v + 16 * c), acc[c]);
  }
  LF_UNROLL
  for (int c = 0; c < D16; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
}

template <class T>
void weighted_sum_d(const float* p, const T* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o) {
  if (D == 32) return weighted_sum_t<2>(p, V, vs, r, S, o);
  if (D == 64) return weighted_sum_t<4>(p, V, vs, r, S, o);
  weighted_sum_t<8>(p, V, vs, r, S, o);  // 128: head_dim_ok
}

}  // namespace

void scores(const float* q, const float* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p) {
  scores_t(q, K, ks, r, S, D, scale, p);
}
void scores(const float* q, const uint16_t* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p) {
  scores_t(q, K, ks, r, S, D, scale, p);
}
void scores(const float* q, const int8_t* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p) {
  scores_t(q, K, ks, r, S, D, scale, p);
}
void weighted_sum(const float* p, const float* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o) {
  weighted_sum_d(p, V, vs, r, S, D, o);
}
void weighted_sum(const float* p, const uint16_t* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o) {
  weighted_sum_d(p, V, vs, r, S, D, o);
}
void weighted_sum(const float* p, const int8_t* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o) {
  weighted_sum_d(p, V, vs, r, S, D, o);
}

}  // namespace avx512
}  // namespace leanformer

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
