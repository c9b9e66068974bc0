// One LayerNorm row, in place, AVX2 (kernels/layer_norm.cpp's arithmetic): shared by layer_norm.cpp and the
// fp16 GEMM's normalizing epilogue (gemm_h16.cpp), so that both give the same bits. AVX2 translation units
// only; internal linkage (see avx512.h for why no inline code is shared across targets).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "vec8.h"  // hsum8

namespace leanformer {
namespace {

// One row in place: o = LN(o [+ r]) * w + b over K floats.
inline void norm_row(float* __restrict o, const float* __restrict r, const float* __restrict w,
                     const float* __restrict b, int64_t K, float eps) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  if (r) {
    for (; k + 16 <= K; k += 16) {
      const __m256 a = _mm256_add_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(o + k));
      const __m256 c = _mm256_add_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(o + k + 8));
      _mm256_storeu_ps(o + k, a), _mm256_storeu_ps(o + k + 8, c);
      s0 = _mm256_add_ps(s0, a), s1 = _mm256_add_ps(s1, c);
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 a = _mm256_add_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(o + k));
      _mm256_storeu_ps(o + k, a);
      s0 = _mm256_add_ps(s0, a);
    }
  } else {
    for (; k + 16 <= K; k += 16) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(o + k));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(o + k + 8));
    }
    for (; k + 8 <= K; k += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(o + k));
  }
  float sum = hsum8(_mm256_add_ps(s0, s1));
  for (; k < K; ++k) {
    if (r) o[k] = r[k] + o[k];
    sum += o[k];
  }
  const float mean = sum / static_cast<float>(K);
  const __m256 mv = _mm256_set1_ps(mean);
  s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(o + k), mv);
    const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(o + k + 8), mv);
    s0 = _mm256_fmadd_ps(a, a, s0), s1 = _mm256_fmadd_ps(c, c, s1);
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(o + k), mv);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  float ss = hsum8(_mm256_add_ps(s0, s1));
  for (; k < K; ++k) ss += (o[k] - mean) * (o[k] - mean);
  const float rstd = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
  const __m256 rv = _mm256_set1_ps(rstd);
  k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(o + k), mv), rv);
    const __m256 y = w ? _mm256_mul_ps(n, _mm256_loadu_ps(w + k)) : n;
    _mm256_storeu_ps(o + k, b ? _mm256_add_ps(y, _mm256_loadu_ps(b + k)) : y);
  }
  for (; k < K; ++k) {
    const float n = (o[k] - mean) * rstd;
    const float y = w ? n * w[k] : n;
    o[k] = b ? y + b[k] : y;
  }
}

}  // namespace
}  // namespace leanformer
