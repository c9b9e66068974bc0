// fp16 (AVX512-FP16) helpers shared by gemm_h16_avx512fp16.cpp and attention_h16_avx512fp16.cpp: widening
// fp16 lanes to fp32 and the lane-pair layout both kernels accumulate in (lanes 2c, 2c + 1 of a vector hold
// two partial sums of column c, gemm_h16.h). Include it after the file's `#pragma GCC target` and only from
// an AVX512-FP16 file: internal linkage, each file keeps its own copy (see avx512.h for why).
#pragma once

#include <immintrin.h>

namespace leanformer {
namespace {

inline __m512 widen_lo(__m512h x) {  // lanes 0-15 as fp32
  return _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_castsi512_si256(_mm512_castph_si512(x))));
}

inline __m512 widen_hi(__m512h x) {  // lanes 16-31 as fp32
  return _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_extracti64x4_epi64(_mm512_castph_si512(x), 1)));
}

// sums[0, 32) += the 32 lanes of an fp16 chain's accumulator, widened: where every fp16 chain ends.
inline void add_widened(__m512h acc, float* sums) {
  _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), widen_lo(acc)));
  _mm512_storeu_ps(sums + 16, _mm512_add_ps(_mm512_loadu_ps(sums + 16), widen_hi(acc)));
}

// The 16 columns of one lane-pair vector's fp32 sums, lanes 0-15 in lo and 16-31 in hi: column c = lane 2c +
// lane 2c + 1.
inline __m512 pair_sums(__m512 lo, __m512 hi) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  return _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
}

// The same from the fp32 sums[0, 32) in memory.
inline __m512 pair_sums(const float* sums) { return pair_sums(_mm512_loadu_ps(sums), _mm512_loadu_ps(sums + 16)); }

}  // namespace
}  // namespace leanformer
