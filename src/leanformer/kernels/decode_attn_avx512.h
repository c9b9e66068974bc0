// Interface between decode.cpp (AVX2) and decode_attn_avx512.cpp: the fused decode step's per-head
// score and weighted-sum loops on 512-bit vectors, for CPUs with AVX-512 (use_avx512()). Plain
// declarations only, for the reason avx512.h gives.
#pragma once

#include <cstdint>

namespace leanformer {
namespace avx512 {

// The keys / values of one (row, KV head) in a cache seen as [rows, D]: row idx[s] (a paged pool's
// block table, idx non-null) or base + s (a slot-major cache). ks / vs: int8 storage's per-row scales.
struct KvRows {
  const int64_t* idx;
  int64_t base;
  int64_t limit = 0;  // rows 0..limit-1 valid to prefetch (past this call's keys: the next chunk's), 0: the keys'
};

// Q queries against the same keys (one sequence's chained rows, a KV head's query heads): query i over
// keys 0..S[i]-1, p + i * stride [S[i]] = (q[i] . K[row s]) * ks[row s] * scale; D a multiple of 16.
// Each query's values are those it gets alone (Q = 1), bit for bit. Kind: fp32, fp16 bits, int8.
void scores(const float* const* q, const int64_t* S, int64_t Q, const float* K, const float* ks, KvRows r, int64_t D,
            float scale, float* p, int64_t stride);
void scores(const float* const* q, const int64_t* S, int64_t Q, const uint16_t* K, const float* ks, KvRows r,
            int64_t D, float scale, float* p, int64_t stride);
void scores(const float* const* q, const int64_t* S, int64_t Q, const int8_t* K, const float* ks, KvRows r,
            int64_t D, float scale, float* p, int64_t stride);

// o[i][:D] = sum_{s < S[i]} p[i * stride + s] * vs[row s] * V[row s]; D one of 32, 64, 128
// (head_dim_ok); each query's sums as it gets them alone.
void weighted_sum(const float* p, int64_t stride, const int64_t* S, int64_t Q, const float* V, const float* vs,
                  KvRows r, int64_t D, float* const* o);
void weighted_sum(const float* p, int64_t stride, const int64_t* S, int64_t Q, const uint16_t* V, const float* vs,
                  KvRows r, int64_t D, float* const* o);
void weighted_sum(const float* p, int64_t stride, const int64_t* S, int64_t Q, const int8_t* V, const float* vs,
                  KvRows r, int64_t D, float* const* o);

inline bool head_dim_ok(int64_t D) { return D == 32 || D == 64 || D == 128; }

}  // namespace avx512
}  // namespace leanformer
