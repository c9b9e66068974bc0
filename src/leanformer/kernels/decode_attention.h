// The attention of the fused decode step (decode.cpp): RoPE + KV-cache write for every row, then
// softmax(q k^T / sqrt(D)) v for each (row m, query head) over that row's keys 0..pos[m].
//
// Why this shape: a decode step's attention reads every cached K/V row of a slot, and on a GQA model
// (SmolLM2: 9 query heads on 3 KV heads) every query head of a KV group, and in a speculative verify
// forward every chained row of the slot (rows m = 0..M-1 at positions P..P+M-1), reads the same rows
// again. One task here takes one (slot, KV head) and one range of up to 256 of its keys, and runs all
// the queries of that group, in tiles of up to 3, against each K/V chunk it loads: an int8 key is
// widened once for 3 queries, and the scores take 4 keys per pass with one transposing reduction
// (hsum4) instead of one horizontal sum per key.
//
// Exactness: each score goes through the same FMA order and reduction tree, and each output element
// accumulates its keys in order, however the queries are tiled, and key ranges sit at fixed offsets: a
// query's result depends only on its q, its keys and its length, not on the batch or the thread count,
// so a chained row gives bit for bit what the same row decoded alone gives.
//
// Shapes: qkv [M, (H + 2 KV) * D] (q heads, then k, then v); KV cache [slots, KV, max_seq, D] fp32,
// or int8 with fp32 scales [slots, KV, max_seq, 1] (models/kv_cache.py); out [M, H * D].
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"  // hsum, LF_UNROLL
#include "vec8.h"    // exp8, exp1, hmax8

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

// The KV-cache writes as models/kv_cache.py's int8 storage does them: scale = max|x| / 127 (at least
// 1e-8 / 127), code = round-half-even(x / scale).
inline void quantize_row(const float* x, int64_t D, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = std::max(amax, 1e-8f) / 127.f;
  for (int64_t i = 0; i < D; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] / s));
  *scale = s;
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// [sum(a0), sum(a1), sum(a2), sum(a3)], each as ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7)): every score
// takes this tree, whichever slot of the four it is in
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// One query of a task: its rotated q [D], its output row [D], its keys 0..S-1.
struct AttnQuery {
  const float* q;
  float* o;
  int64_t S;
};

// p[r][s - s0] = (q[r] . K[s]) * ks[s] * scale for s in [s0, s1) and the R (<= 3) queries of a tile; K
// rows D apart, ks null for fp32 keys. Four keys per pass: each 8-float key chunk is loaded (and an
// int8 one widened) once for all R queries (3 x 4 accumulators + 3 q + 1 k = the 16 registers). The
// last pass repeats key s1 - 1 for the missing keys and stores only the real ones.
template <int R, class T>
void tile_scores(const float* const* q, const T* K, const float* ks, int64_t s0, int64_t s1, int64_t D,
                 float scale, float* const* p) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t s = s0; s < s1; s += 4) {
    const T* k[4];
    LF_UNROLL
    for (int j = 0; j < 4; ++j) k[j] = K + std::min(s + j, s1 - 1) * D;
    __m256 acc[R][4];
    LF_UNROLL
    for (int r = 0; r < R; ++r) {
      LF_UNROLL
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < D8; i += 8) {
      __m256 qv[R];
      LF_UNROLL
      for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q[r] + i);
      LF_UNROLL
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = load8(k[j] + i);
        LF_UNROLL
        for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(qv[r], kv, acc[r][j]);
      }
    }
    const int n = static_cast<int>(std::min<int64_t>(4, s1 - s));
    LF_UNROLL  // constant indices: the accumulators stay in registers (a runtime r spills them every chunk)
    for (int r = 0; r < R; ++r) {
      alignas(16) float d[4];
      _mm_store_ps(d, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      for (int j = 0; j < n; ++j) {
        for (int64_t i = D8; i < D; ++i) d[j] += q[r][i] * static_cast<float>(k[j][i]);
        p[r][s - s0 + j] = (ks ? d[j] * ks[s + j] : d[j]) * scale;
      }
    }
  }
}

// o[r][d0 : d0 + 8C] = sum_s w[r][s] * V[s][d0 : d0 + 8C] over each query's own n[r] keys (V rows D
// apart): the keys all R queries see first, in one pass sharing each V chunk load, then each query's
// remaining keys, so every element still sums its keys in order. 3 x 4 accumulators + 3 weights + 1 v.
template <int R, int C, class T>
void tile_values(const float* const* w, const int64_t* n, const T* V, int64_t D, int64_t d0, float* const* o) {
  __m256 acc[R][C];
  LF_UNROLL
  for (int r = 0; r < R; ++r) {
    LF_UNROLL
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  int64_t common = n[0];
  for (int r = 1; r < R; ++r) common = std::min(common, n[r]);
  for (int64_t s = 0; s < common; ++s) {
    __m256 wv[R];
    LF_UNROLL
    for (int r = 0; r < R; ++r) wv[r] = _mm256_broadcast_ss(w[r] + s);
    const T* row = V + s * D + d0;
    LF_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m256 v = load8(row + 8 * c);
      LF_UNROLL
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(wv[r], v, acc[r][c]);
    }
  }
  LF_UNROLL
  for (int r = 0; r < R; ++r) {
    for (int64_t s = common; s < n[r]; ++s) {
      const __m256 wv = _mm256_broadcast_ss(w[r] + s);
      LF_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv, load8(V + s * D + d0 + 8 * c), acc[r][c]);
    }
    LF_UNROLL
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o[r] + d0 + 8 * c, acc[r][c]);
  }
}

// All D columns of o[r] = sum_s w[r][s] V[s]: 32-column blocks, then the 8-column rest, then scalars.
template <int R, class T>
void tile_values_all(const float* const* w, const int64_t* n, const T* V, int64_t D, float* const* o) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) tile_values<R, 4>(w, n, V, D, d0, o);
  switch ((D - d0) / 8) {
    case 3: tile_values<R, 3>(w, n, V, D, d0, o); break;
    case 2: tile_values<R, 2>(w, n, V, D, d0, o); break;
    case 1: tile_values<R, 1>(w, n, V, D, d0, o); break;
    default: break;
  }
  for (int64_t i = D / 8 * 8; i < D; ++i)
    for (int r = 0; r < R; ++r) {
      float a = 0.f;
      for (int64_t s = 0; s < n[r]; ++s) a += w[r][s] * static_cast<float>(V[s * D + i]);
      o[r][i] = a;
    }
}

// p[0..n) = exp(p - max(p)) in place -> {max, sum of the exps}; then p *= vs (int8 values' scales)
inline void softmax_(float* p, int64_t n, const float* vs, float* mx_out, float* total_out) {
  int64_t s = 0;
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  for (; s + 8 <= n; s += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(p + s));
  float mx = hmax8(vmx);
  for (; s < n; ++s) mx = std::max(mx, p[s]);
  vmx = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (s = 0; s + 8 <= n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), vmx));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum(acc);
  for (; s < n; ++s) total += (p[s] = exp1(p[s] - mx));
  if (vs)
    for (s = 0; s < n; ++s) p[s] *= vs[s];
  *mx_out = mx;
  *total_out = total;
}

// Calls fn(std::integral_constant<int, R>) for R = 1..3 queries.
template <class Fn>
void dispatch_tile(int64_t R, const Fn& fn) {
  if (R >= 3) return fn(std::integral_constant<int, 3>());
  if (R == 2) return fn(std::integral_constant<int, 2>());
  fn(std::integral_constant<int, 1>());
}

// One task: the nq queries of one (slot, KV head) against its keys [k0, k1) (each query clipped to its
// own S). part null: o = the normalized result. Otherwise part [nq, D] gets the unnormalized sum and
// stats [nq, 2] the {max score, sum of exps} of this key range, for merge_ranges.
template <class T>
void attend_group(const AttnQuery* qs, int64_t nq, const T* K, const T* V, const float* ks, const float* vs,
                  int64_t k0, int64_t k1, int64_t D, float scale, std::vector<float>& buf, float* part,
                  float* stats) {
  std::vector<int64_t> n(nq);
  int64_t longest = 0;
  for (int64_t r = 0; r < nq; ++r) longest = std::max(longest, n[r] = std::max<int64_t>(0, std::min(k1, qs[r].S) - k0));
  const int64_t stride = longest + 8;
  buf.resize(nq * stride);
  std::vector<float> mx(nq), total(nq);
  for (int64_t r0 = 0; r0 < nq; r0 += 3) {
    const int64_t R = std::min<int64_t>(3, nq - r0);
    const float* q[3] = {};
    float* p[3] = {};
    int64_t len = 0;
    for (int64_t r = 0; r < R; ++r) {
      q[r] = qs[r0 + r].q;
      p[r] = buf.data() + (r0 + r) * stride;
      len = std::max(len, n[r0 + r]);
    }
    // keys past a query's own length (a chained row's later neighbours) are scored and not used
    dispatch_tile(R, [&](auto r_) { tile_scores<decltype(r_)::value>(q, K, ks, k0, k0 + len, D, scale, p); });
    for (int64_t r = 0; r < R; ++r)
      softmax_(p[r], n[r0 + r], vs ? vs + k0 : nullptr, &mx[r0 + r], &total[r0 + r]);
    float* o[3] = {};
    for (int64_t r = 0; r < R; ++r) o[r] = part ? part + (r0 + r) * D : qs[r0 + r].o;
    const float* w[3] = {p[0], p[1], p[2]};
    dispatch_tile(R, [&](auto r_) { tile_values_all<decltype(r_)::value>(w, n.data() + r0, V + k0 * D, D, o); });
  }
  for (int64_t r = 0; r < nq; ++r) {
    if (part) {
      stats[2 * r] = mx[r];
      stats[2 * r + 1] = total[r];
    } else {
      const float inv = 1.0f / total[r];
      for (int64_t i = 0; i < D; ++i) qs[r].o[i] *= inv;
    }
  }
}

// o = sum_c e^(max_c - max) part_c / sum_c e^(max_c - max) total_c over a query's key ranges c
// (part [ranges, D], stats [ranges, 2] {max, total}; an empty range has max -inf and weighs 0).
inline void merge_ranges(const float* part, const float* stats, int64_t ranges, int64_t D, float* o) {
  float mx = -INFINITY;
  for (int64_t c = 0; c < ranges; ++c) mx = std::max(mx, stats[2 * c]);
  float total = 0.f;
  std::fill(o, o + D, 0.f);
  for (int64_t c = 0; c < ranges; ++c) {
    const float f = exp1(stats[2 * c] - mx);
    total += f * stats[2 * c + 1];
    for (int64_t i = 0; i < D; ++i) o[i] += f * part[c * D + i];
  }
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < D; ++i) o[i] *= inv;
}

// Keys per range (task) of a long context: long runs, so the K and V streams of a range stay long for
// the hardware prefetcher (128 measured ~10% slower on 8 batched rows at 200 keys, where the cache
// streams from DRAM), while 1000 keys still make 4 tasks per KV head for a second thread.
constexpr int64_t kRangeKeys = 256;

// The attention of one layer for all rows: rotate q / k, write k / v into the cache (int8: quantized,
// scales into ks / vs), then out [M, H * D] = softmax(q k^T / sqrt(D)) v per (row, head) over keys
// 0..pos[m] of slot slots[m].
template <class T>
void decode_attention(const at::Tensor& qkv_out, const float* cos, const float* sin, const at::Tensor& kc,
                      const at::Tensor& vc, const at::Tensor& ks, const at::Tensor& vs, const int64_t* slots,
                      const int64_t* pos, int64_t H, int64_t KV, at::Tensor& out) {
  const int64_t M = qkv_out.size(0), D = kc.size(3);
  const int64_t max_seq = kc.size(2), row_len = (H + 2 * KV) * D;
  const float* src = qkv_out.data_ptr<float>();
  T* kp = kc.data_ptr<T>();
  T* vp = vc.data_ptr<T>();
  constexpr bool q8 = std::is_same_v<T, int8_t>;
  float* ksp = q8 ? ks.data_ptr<float>() : nullptr;
  float* vsp = q8 ? vs.data_ptr<float>() : nullptr;
  at::Tensor qr = at::empty({M, H * D}, qkv_out.options());  // rotated queries
  float* qrp = qr.data_ptr<float>();
  std::vector<float> krot(D);
  int64_t work = 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* r = src + m * row_len;
    for (int64_t h = 0; h < H; ++h) rope(r + h * D, cos + m * D, sin + m * D, qrp + (m * H + h) * D, D);
    for (int64_t j = 0; j < KV; ++j) {
      const int64_t at_ = (slots[m] * KV + j) * max_seq + pos[m];  // row index into [slots*KV*max_seq, D]
      rope(r + (H + j) * D, cos + m * D, sin + m * D, krot.data(), D);
      const float* v = r + (H + KV + j) * D;
      if constexpr (q8) {
        quantize_row(krot.data(), D, kp + at_ * D, ksp + at_);
        quantize_row(v, D, vp + at_ * D, vsp + at_);
      } else {
        std::copy(krot.begin(), krot.end(), kp + at_ * D);
        std::copy(v, v + D, vp + at_ * D);
      }
    }
    work += H * (pos[m] + 1) * D;
  }
  // Groups: the rows of each distinct slot (in order of first appearance); their queries per KV head,
  // row-major then head, so a tile of 3 is a row's 3 heads on a 3:1 GQA model
  std::vector<int64_t> group_slot, group_of(M), longest;
  for (int64_t m = 0; m < M; ++m) {
    const auto it = std::find(group_slot.begin(), group_slot.end(), slots[m]);
    group_of[m] = it - group_slot.begin();
    if (it == group_slot.end()) {
      group_slot.push_back(slots[m]);
      longest.push_back(0);
    }
    longest[group_of[m]] = std::max(longest[group_of[m]], pos[m] + 1);
  }
  const int64_t G = static_cast<int64_t>(group_slot.size()), per_kv = H / KV;
  std::vector<AttnQuery> queries;  // [G, KV, rows of the group * per_kv]
  std::vector<int64_t> first(G * KV + 1, 0);
  float* op = out.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < KV; ++j) {
      first[g * KV + j] = static_cast<int64_t>(queries.size());
      for (int64_t m = 0; m < M; ++m)
        if (group_of[m] == g)
          for (int64_t h = j * per_kv; h < (j + 1) * per_kv; ++h)
            queries.push_back({qrp + (m * H + h) * D, op + (m * H + h) * D, pos[m] + 1});
    }
  first[G * KV] = static_cast<int64_t>(queries.size());
  // One task per (group, KV head, range of kRangeKeys keys at the fixed offsets 0, 256, ...): long
  // contexts spread over threads (batch 1 has only 3 KV heads on SmolLM2), and a query's result depends
  // on its own keys alone, never on the other rows or the thread count (ranges past its length merge in
  // exact zeros; one range takes the direct path, which merging a single range reproduces bit for bit).
  // Threads pay off from short contexts on; only tiny steps stay on this thread.
  const bool serial = work < (1 << 12);
  const int64_t base = G * KV;
  std::vector<int64_t> task_first(base + 1, 0), part_first(base + 1, 0);  // prefix sums over (group, KV head)
  for (int64_t gj = 0; gj < base; ++gj) {
    const int64_t n_ranges = (longest[gj / KV] + kRangeKeys - 1) / kRangeKeys;
    task_first[gj + 1] = task_first[gj] + n_ranges;
    part_first[gj + 1] = part_first[gj] + (n_ranges > 1 ? n_ranges * (first[gj + 1] - first[gj]) : 0);
  }
  // partial results of the split groups: per (group, KV head) [ranges, its queries, D] / [.., .., 2]
  std::vector<float> part(part_first[base] * D), stats(part_first[base] * 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t tasks = task_first[base];
  at::parallel_for(0, tasks, serial ? tasks : 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gj = std::upper_bound(task_first.begin(), task_first.end(), t) - task_first.begin() - 1;
      const int64_t c = t - task_first[gj], n_ranges = task_first[gj + 1] - task_first[gj];
      const int64_t g = gj / KV, j = gj % KV, base_row = (group_slot[g] * KV + j) * max_seq;
      const int64_t k0 = c * kRangeKeys, k1 = std::min(longest[g], k0 + kRangeKeys);
      const int64_t q0 = first[gj], nq = first[gj + 1] - q0;
      float* pp = n_ranges > 1 ? part.data() + (part_first[gj] + c * nq) * D : nullptr;
      float* sp = n_ranges > 1 ? stats.data() + (part_first[gj] + c * nq) * 2 : nullptr;
      attend_group<T>(queries.data() + q0, nq, kp + base_row * D, vp + base_row * D, q8 ? ksp + base_row : nullptr,
                      q8 ? vsp + base_row : nullptr, k0, k1, D, scale, buf, pp, sp);
    }
  });
  std::vector<float> pq, sq;
  for (int64_t gj = 0; gj < base; ++gj) {
    const int64_t n_ranges = task_first[gj + 1] - task_first[gj], q0 = first[gj], nq = first[gj + 1] - q0;
    if (n_ranges == 1) continue;
    pq.resize(n_ranges * D);
    sq.resize(n_ranges * 2);
    for (int64_t r = 0; r < nq; ++r) {
      for (int64_t c = 0; c < n_ranges; ++c) {
        std::copy_n(part.data() + (part_first[gj] + c * nq + r) * D, D, pq.data() + c * D);
        std::copy_n(stats.data() + (part_first[gj] + c * nq + r) * 2, 2, sq.data() + c * 2);
      }
      merge_ranges(pq.data(), sq.data(), n_ranges, D, queries[q0 + r].o);
    }
  }
}

}  // namespace
}  // namespace leanformer
