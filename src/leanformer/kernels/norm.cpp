// RMSNorm in one call: y = x * rsqrt(mean(x^2) + eps) * w, fp32, one row at a time.
//
// Why: a decode step runs 2 norms per layer on one row of ~576 floats; in torch that is 6 ops
// (pow, mean, add, rsqrt, mul, mul), ~10 µs of dispatch for ~1 µs of arithmetic. For SmolLM2 that
// is ~0.6 ms per token of pure overhead (measured: replacing the norms by identity saves 0.75 ms).
// Same arithmetic as HF's LlamaRMSNorm in fp32 (sum of squares in fp32 then divided by K; the
// summation order differs from torch's, so results agree to a few ulps, not bit for bit).
#include "common.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

namespace leanformer {

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps, const at::Tensor* out) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "x must be float32 [M, K] on CPU");
  TORCH_CHECK(w_.dim() == 1 && w_.scalar_type() == at::kFloat && w_.size(0) == x_.size(1), "w must be float32 [K]");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = output(out, M, K, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows over the threads from ~28 rows of 576 on (a chained prefill); a decode step's few stay here
  parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* r = xp + m * K;
    float* o = yp + m * K;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(r + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float ss = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; k < K; ++k) ss += r[k] * r[k];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(K) + static_cast<float>(eps));
    const __m256 vinv = _mm256_set1_ps(inv);
    k = 0;
    for (; k + 8 <= K; k += 8) {
      // (x * inv) * w: the same two roundings as torch's x * rsqrt(...) * weight
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(r + k), vinv);
      _mm256_storeu_ps(o + k, _mm256_mul_ps(v, _mm256_loadu_ps(wp + k)));
    }
    for (; k < K; ++k) o[k] = (r[k] * inv) * wp[k];
  }
  });
  return y;
}

}  // namespace leanformer
