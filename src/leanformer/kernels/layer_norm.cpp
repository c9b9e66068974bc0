// LayerNorm over the last dim for the BERT-family encoders' CPU fp32 inference (models/bert.py), in
// place, with the residual add optionally fused: x = LN(x [+ residual]) * w + b, one pass per row.
//
// Why: torch's layer_norm allocates a fresh [M, K] output per call (12 per MiniLM forward, 6.3 MB each
// at [16, 256]; on the VMs we measure on, fresh pages are page faults), and on the unpacked (AVX2) path
// the residual add before it is another op and another [M, K] temporary. The encoder's rows are the
// output of the matmul before it, which nothing else holds, so they are normalized where they are.
//
// Arithmetic: fp32, two passes over the row (held in L1): mean, then the mean of squared deviations
// (biased, as torch), rstd = 1 / sqrt(var + eps), y = (x - mean) * rstd * w + b. torch's kernel sums in
// another order, so results agree to a few ulps, not bit for bit.
//
// AVX2/FMA only (every CPU the kernels build for; the pass is memory-bound); rows are split over torch's
// thread pool.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace leanformer {
namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

const float* vec_or_null(const std::optional<at::Tensor>& t, int64_t K, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == K &&
                  t->is_contiguous(),
              name, " must be a contiguous float32 [", K, "] CPU tensor, got ", t->sizes());
  return t->data_ptr<float>();
}

}  // namespace

// In place over x fp32 [M, K] (contiguous): x = LN(x + residual) * w + b (residual [M, K] optional).
at::Tensor layer_norm_(at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                       double eps, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  const float* wp = vec_or_null(w, K, "w");
  const float* bp = vec_or_null(b, K, "b");
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat && residual->dim() == 2 &&
                    residual->size(0) == M && residual->size(1) == K,
                "residual must be float32 [", M, ", ", K, "], got ", residual->sizes());
    res = residual->contiguous();
  }
  if (M == 0 || K == 0) return x;
  float* xp = x.data_ptr<float>();
  const float* rp = res.defined() ? res.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) norm_row(xp + m * K, rp ? rp + m * K : nullptr, wp, bp, K, e);
  });
  return x;
}

void bind_layer_norm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("layer_norm_", &layer_norm_,
        "in place over x float32 [M, K]: x = layer_norm(x [+ residual]) * w + b (eps inside the sqrt)",
        py::arg("x"), py::arg("w") = py::none(), py::arg("b") = py::none(), py::arg("eps") = 1e-5,
        py::arg("residual") = py::none(), py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
