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

#include "layer_norm_row.h"  // norm_row

namespace leanformer {
namespace {

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
