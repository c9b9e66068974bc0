// Row passes around an Int8Dynamic Linear's oneDNN u8s8 GEMM for CPU fp32 inference
// (compress/quant.py Int8DynamicLinear.forward_epilogue; the BERT-family encoders call it through
// models/bert.py): quantize_rows_u8 before the GEMM, int8_epilogue_ after it.
//
// Why: one pass each instead of 4-6 torch ops and as many [M, N] temporaries: at [4096, 1536] those
// ran ~100 ms of a 260 ms MiniLM forward at 256 tokens, more than the int8 GEMMs themselves (~70 ms).
//
// AVX2/FMA only (every CPU the kernels build for); rows are split over torch's thread pool.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "vec8.h"  // exp8, hmax8

namespace leanformer {
namespace {

inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }

// torch's vectorized erf (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7), with exp8 for exp(-x^2).
inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_and_ps(_mm256_set1_ps(-0.f), x), one = _mm256_set1_ps(1.f);
  const __m256 ax = _mm256_xor_ps(sign, x);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_xor_ps(_mm256_set1_ps(-0.f), _mm256_mul_ps(x, x)));  // exp(-x^2)
  const __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_xor_ps(_mm256_set1_ps(-0.f), e), t), r, one);
  return _mm256_xor_ps(sign, y);
}

inline float erf1(float x) {
  alignas(32) float v[8];
  _mm256_store_ps(v, erf8(_mm256_set1_ps(x)));
  return v[0];
}

}  // namespace

// x fp32 [M, K] -> (q uint8 [M, K], s fp32 [M, 1]) with s = max(max|x[m]|, 1e-8) / 127 and
// q = trunc(x * (1 / s) + 128.5) = round(x / s) + 128: bit for bit compress.kernels.quantize_rows_int8(x,
// shift=128), in one pass per row instead of five ops.
std::tuple<at::Tensor, at::Tensor> quantize_rows_u8(const at::Tensor& x_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor s = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * K;
      uint8_t* o = qp + m * K;
      __m256 mx = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, abs8(_mm256_loadu_ps(r + k)));
      float amax = hmax8(mx);
      for (; k < K; ++k) amax = std::max(amax, std::fabs(r[k]));
      const float sc = std::max(amax, 1e-8f) / 127.f, inv = 1.f / sc;
      sp[m] = sc;
      const __m256 vi = _mm256_set1_ps(inv), half = _mm256_set1_ps(128.5f);
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      k = 0;
      for (; k + 32 <= K; k += 32) {
        __m256i i[4];
        for (int u = 0; u < 4; ++u)
          i[u] = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(r + k + 8 * u), vi), half));
        const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(i[0], i[1]), _mm256_packus_epi32(i[2], i[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), _mm256_permutevar8x32_epi32(b, order));
      }
      for (; k < K; ++k) o[k] = static_cast<uint8_t>(static_cast<int>(r[k] * inv + 128.5f));
    }
  });
  return {q, s};
}

// In place over y fp32 [M, N] (the GEMM's output before the per-token scale): y = y * s[m] (+ bias[n]),
// then GELU (erf form) when gelu, then residual[m, n] + y when a residual is given. Same operation order
// as the torch ops it replaces (y.mul_(s).add_(bias); F.gelu; residual + y).
at::Tensor int8_epilogue_(at::Tensor& y, const at::Tensor& s_, const std::optional<at::Tensor>& bias_, bool gelu,
                          const std::optional<at::Tensor>& residual_) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous(),
              "y must be contiguous float32 [M, N]");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(s_.scalar_type() == at::kFloat && s_.numel() == M, "s must be float32 [M] or [M, 1]");
  const at::Tensor s = s_.contiguous();
  at::Tensor bias, res;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->scalar_type() == at::kFloat && bias_->numel() == N, "bias must be float32 [N]");
    bias = bias_->contiguous();
  }
  if (residual_.has_value() && residual_->defined()) {
    TORCH_CHECK(residual_->scalar_type() == at::kFloat && residual_->dim() == 2 && residual_->size(0) == M &&
                    residual_->size(1) == N,
                "residual must be float32 [M, N]");
    res = residual_->contiguous();
  }
  float* yp = y.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* rp = res.defined() ? res.data_ptr<float>() : nullptr;
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    const __m256 h = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f), r2 = _mm256_set1_ps(0.70710678118654752f);
    for (int64_t m = m0; m < m1; ++m) {
      float* o = yp + m * N;
      const float* rr = rp ? rp + m * N : nullptr;
      const __m256 sv = _mm256_set1_ps(sp[m]);
      int64_t n = 0;
      for (; n + 8 <= N; n += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(o + n), sv);
        if (bp) v = _mm256_add_ps(v, _mm256_loadu_ps(bp + n));
        if (gelu) v = _mm256_mul_ps(_mm256_mul_ps(v, h), _mm256_add_ps(one, erf8(_mm256_mul_ps(v, r2))));
        if (rr) v = _mm256_add_ps(_mm256_loadu_ps(rr + n), v);
        _mm256_storeu_ps(o + n, v);
      }
      for (; n < N; ++n) {
        float v = o[n] * sp[m];
        if (bp) v = v + bp[n];
        if (gelu) v = (v * 0.5f) * (1.f + erf1(v * 0.70710678118654752f));
        if (rr) v = rr[n] + v;
        o[n] = v;
      }
    }
  });
  return y;
}

void bind_int8_rows(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("quantize_rows_u8", &quantize_rows_u8,
        "x float32 [M, K] -> (uint8 round(x / s) + 128, s float32 [M, 1]), s = max|x[m]| / 127 (per token)",
        py::arg("x"), py::call_guard<py::gil_scoped_release>());
  m.def("int8_epilogue_", &int8_epilogue_,
        "in place: y = [residual +] [gelu](y * s[m] + bias[n]) over y float32 [M, N]", py::arg("y"), py::arg("s"),
        py::arg("bias") = py::none(), py::arg("gelu") = false, py::arg("residual") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
