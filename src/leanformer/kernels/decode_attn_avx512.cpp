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

// Keys (values) kAheadKeys rows ahead are requested while this block is computed: a lone query's pass
// over a long context waits on memory otherwise (the stream prefetcher loses the rows of a paged pool
// and restarts at every task's chunk). Into L2 (T1), not L1: a T0 request holds one of the core's few
// L1 miss buffers for the whole trip to memory, and 32 keys' worth of them (128 lines of fp32 keys)
// kept the loads waiting for buffers (perf: the score loop's prefetches and loads were its hot spots);
// through L2 the step + head took 0.85x / 0.79x the time at 1,500 / 4,000 keys with an fp32 cache,
// 0.94x fp16, 0.85x a paged pool, 0.98x at 200 keys (SmolLM2 int4, Zen 4, 2 threads,
// scripts/i8_rows_ab.py). A chunk's last rows request the next chunk's first (KvRows::limit): a
// thread's tasks take a KV head's chunks in order (0.975x at 1,500 keys).
constexpr int64_t kAheadKeys = 32;
template <class T>
inline void prefetch_key(const T* base, KvRows r, int64_t s, int64_t D) {
  const char* p = reinterpret_cast<const char*>(base + row(r, s) * D);
  for (int64_t off = 0; off < D * int64_t(sizeof(T)); off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

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

// Query i's scores of 8 keys: the same FMAs, sum8 reduction and scaling whether one query or two
// share the key loads (NQ), so a query's values do not depend on how many others read its keys.
template <int NQ, class T>
inline void score_block(const float* const (&q)[NQ], float* const (&out)[NQ], const T* const (&rows)[8],
                        const __m256* kss, int64_t D, float scale) {
  __m512 acc[NQ][8];
  LF_UNROLL
  for (int j = 0; j < NQ; ++j)
    LF_UNROLL
    for (int k = 0; k < 8; ++k) acc[j][k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    __m512 kv[8];  // each key vector loaded (and converted) once for the NQ queries
    LF_UNROLL
    for (int k = 0; k < 8; ++k) kv[k] = load16(rows[k] + i);
    LF_UNROLL
    for (int j = 0; j < NQ; ++j) {
      const __m512 qv = _mm512_loadu_ps(q[j] + i);
      LF_UNROLL
      for (int k = 0; k < 8; ++k) acc[j][k] = _mm512_fmadd_ps(qv, kv[k], acc[j][k]);
    }
  }
  LF_UNROLL
  for (int j = 0; j < NQ; ++j) {
    __m256 d = sum8(acc[j]);
    if (kss) d = _mm256_mul_ps(d, *kss);
    _mm256_storeu_ps(out[j], _mm256_mul_ps(d, _mm256_set1_ps(scale)));
  }
}

// Query i over keys 0..S[i]-1 into p + i * stride. Keys go outer, queries inner: one sequence's chained
// rows (speculative verification) and the query heads of one KV head read each key block while it is
// in L1, instead of each (row, head) streaming the keys again from L2 / L3 / memory.
template <class T>
void scores_t(const float* const* q, const int64_t* S, int64_t Q, const T* K, const float* ks, KvRows r, int64_t D,
              float scale, float* p, int64_t stride) {
  int64_t smax = 0;
  for (int64_t i = 0; i < Q; ++i) smax = S[i] > smax ? S[i] : smax;
  const int64_t plim = r.limit > smax ? r.limit : smax;
  int64_t s = 0;
  for (; s + 8 <= smax; s += 8) {
    if (s + kAheadKeys + 8 <= plim)
      LF_UNROLL
      for (int k = 0; k < 8; ++k) prefetch_key(K, r, s + kAheadKeys + k, D);
    const T* rows[8];
    LF_UNROLL
    for (int k = 0; k < 8; ++k) rows[k] = K + row(r, s + k) * D;
    __m256 kss;
    if (ks) {
      alignas(32) float v[8];
      for (int k = 0; k < 8; ++k) v[k] = ks[row(r, s + k)];
      kss = _mm256_load_ps(v);
    }
    int64_t first = -1;  // a query waiting for a partner
    for (int64_t i = 0; i < Q; ++i) {
      if (s + 8 > S[i]) continue;  // its last keys: one at a time below
      if (first < 0) {
        first = i;
        continue;
      }
      const float* const qs[2] = {q[first], q[i]};
      float* const outs[2] = {p + first * stride + s, p + i * stride + s};
      score_block<2>(qs, outs, rows, ks ? &kss : nullptr, D, scale);
      first = -1;
    }
    if (first >= 0) {
      const float* const qs[1] = {q[first]};
      float* const outs[1] = {p + first * stride + s};
      score_block<1>(qs, outs, rows, ks ? &kss : nullptr, D, scale);
    }
  }
  for (int64_t i = 0; i < Q; ++i)
    for (int64_t t = S[i] / 8 * 8; t < S[i]; ++t) {
      const T* k = K + row(r, t) * D;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q[i] + c), load16(k + c), acc);
      const float d = _mm512_reduce_add_ps(acc);
      p[i * stride + t] = (ks ? d * ks[row(r, t)] : d) * scale;
    }
}

template <bool B>
struct All {
  static constexpr bool kAll = B;
};

// QT queries' weighted sums of the same values (query i: keys 0..S[i]-1, weights p[i]): each value
// vector loaded once for the tile, each query's D16 accumulators in key order as for one query alone,
// and QT independent FMA chains instead of one waiting on the FMA latency every key.
template <int D16, int QT, class T>
inline void weighted_tile(const float* const* p, const int64_t* S, const T* V, const float* vs, KvRows r,
                          float* const* o) {
  __m512 acc[QT][D16];
  LF_UNROLL
  for (int j = 0; j < QT; ++j)
    LF_UNROLL
    for (int c = 0; c < D16; ++c) acc[j][c] = _mm512_setzero_ps();
  int64_t smin = S[0], smax = S[0];
  LF_UNROLL
  for (int j = 1; j < QT; ++j) smin = S[j] < smin ? S[j] : smin, smax = S[j] > smax ? S[j] : smax;
  const int64_t plim = r.limit > smax ? r.limit : smax;
  auto key = [&](int64_t s, auto all) {  // all: every query of the tile takes key s
    if (s + kAheadKeys < plim) prefetch_key(V, r, s + kAheadKeys, 16 * D16);
    const int64_t at = row(r, s);
    const T* v = V + at * (16 * D16);
    __m512 x[D16];
    LF_UNROLL
    for (int c = 0; c < D16; ++c) x[c] = load16(v + 16 * c);
    LF_UNROLL
    for (int j = 0; j < QT; ++j) {
      if (!decltype(all)::kAll && s >= S[j]) continue;
      const __m512 w = _mm512_set1_ps(vs ? p[j][s] * vs[at] : p[j][s]);
      LF_UNROLL
      for (int c = 0; c < D16; ++c) acc[j][c] = _mm512_fmadd_ps(w, x[c], acc[j][c]);
    }
  };
  int64_t s = 0;
  for (; s < smin; ++s) key(s, All<true>{});
  for (; s < smax; ++s) key(s, All<false>{});
  LF_UNROLL
  for (int j = 0; j < QT; ++j)
    LF_UNROLL
    for (int c = 0; c < D16; ++c) _mm512_storeu_ps(o[j] + 16 * c, acc[j][c]);
}

// Tiles of as many queries as the registers hold next to the value vectors (16 / D16 + ... : 8, 4, 2).
template <int D16, class T>
void weighted_d16(const float* p, int64_t stride, const int64_t* S, int64_t Q, const T* V, const float* vs,
                  KvRows r, float* const* o) {
  constexpr int kTile = D16 == 2 ? 8 : D16 == 4 ? 4 : 2;
  const float* rows[kTile];
  for (int64_t i0 = 0; i0 < Q; i0 += kTile) {
    const int64_t n = Q - i0 < kTile ? Q - i0 : kTile;
    for (int64_t j = 0; j < n; ++j) rows[j] = p + (i0 + j) * stride;
    const int64_t* s = S + i0;
    float* const* out = o + i0;
    switch (n) {  // a tile of n queries: n accumulator sets, no idle ones
      case 1: weighted_tile<D16, 1>(rows, s, V, vs, r, out); break;
      case 2: weighted_tile<D16, 2>(rows, s, V, vs, r, out); break;
      case 3: if constexpr (kTile >= 3) weighted_tile<D16, 3>(rows, s, V, vs, r, out); break;
      case 4: if constexpr (kTile >= 4) weighted_tile<D16, 4>(rows, s, V, vs, r, out); break;
      case 5: if constexpr (kTile >= 5) weighted_tile<D16, 5>(rows, s, V, vs, r, out); break;
      case 6: if constexpr (kTile >= 6) weighted_tile<D16, 6>(rows, s, V, vs, r, out); break;
      case 7: if constexpr (kTile >= 7) weighted_tile<D16, 7>(rows, s, V, vs, r, out); break;
      default: if constexpr (kTile >= 8) weighted_tile<D16, 8>(rows, s, V, vs, r, out); break;
    }
  }
}

template <class T>
void weighted_t(const float* p, int64_t stride, const int64_t* S, int64_t Q, const T* V, const float* vs, KvRows r,
                int64_t D, float* const* o) {
  if (D == 32) return weighted_d16<2>(p, stride, S, Q, V, vs, r, o);
  if (D == 64) return weighted_d16<4>(p, stride, S, Q, V, vs, r, o);
  weighted_d16<8>(p, stride, S, Q, V, vs, r, o);  // 128: head_dim_ok
}

}  // namespace

void scores(const float* const* q, const int64_t* S, int64_t Q, const float* K, const float* ks, KvRows r, int64_t D,
            float scale, float* p, int64_t stride) {
  scores_t(q, S, Q, K, ks, r, D, scale, p, stride);
}
void scores(const float* const* q, const int64_t* S, int64_t Q, const uint16_t* K, const float* ks, KvRows r, int64_t D,
            float scale, float* p, int64_t stride) {
  scores_t(q, S, Q, K, ks, r, D, scale, p, stride);
}
void scores(const float* const* q, const int64_t* S, int64_t Q, const int8_t* K, const float* ks, KvRows r, int64_t D,
            float scale, float* p, int64_t stride) {
  scores_t(q, S, Q, K, ks, r, D, scale, p, stride);
}
void weighted_sum(const float* p, int64_t stride, const int64_t* S, int64_t Q, const float* V, const float* vs,
                  KvRows r, int64_t D, float* const* o) {
  weighted_t(p, stride, S, Q, V, vs, r, D, o);
}
void weighted_sum(const float* p, int64_t stride, const int64_t* S, int64_t Q, const uint16_t* V, const float* vs,
                  KvRows r, int64_t D, float* const* o) {
  weighted_t(p, stride, S, Q, V, vs, r, D, o);
}
void weighted_sum(const float* p, int64_t stride, const int64_t* S, int64_t Q, const int8_t* V, const float* vs,
                  KvRows r, int64_t D, float* const* o) {
  weighted_t(p, stride, S, Q, V, vs, r, D, o);
}

}  // namespace avx512
}  // namespace leanformer

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
