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
};

// p[s] = (q . K[row s]) * ks[row s] * scale for s < S; D a multiple of 16. Kind: fp32, fp16 bits, int8.
void scores(const float* q, const float* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p);
void scores(const float* q, const uint16_t* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p);
void scores(const float* q, const int8_t* K, const float* ks, KvRows r, int64_t S, int64_t D, float scale, float* p);

// o[:D] = sum_s p[s] * vs[row s] * V[row s]; D one of 32, 64, 128 (weighted_sum_ok).
void weighted_sum(const float* p, const float* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o);
void weighted_sum(const float* p, const uint16_t* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o);
void weighted_sum(const float* p, const int8_t* V, const float* vs, KvRows r, int64_t S, int64_t D, float* o);

inline bool head_dim_ok(int64_t D) { return D == 32 || D == 64 || D == 128; }

}  // namespace avx512
}  // namespace leanformer
