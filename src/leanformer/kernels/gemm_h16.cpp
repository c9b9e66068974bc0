// fp16 matmuls for CPU inference on AVX512-FP16 (Intel Sapphire Rapids and later): y = x @ w^T (+ bias,
// GELU, residual) with x and w in fp16 and the products summed in fp16 along short chains that are then
// added in fp32 (gemm_h16.h). What the BERT-family encoders' Linears run in a float16 model there
// (kernels/h16.py H16Linear, models/bert.py): vfmadd231ph does twice the multiply-adds of an fp32 FMA,
// while that CPU's bf16 dot product (vdpbf16ps, one port) is no faster than fp32 and oneDNN's f16 GEMM
// accumulates in fp32 at fp32's rate (docs/BENCHMARKS.md, session 28).
//
// This file (AVX2 + F16C) packs weights, converts activations, splits tiles over torch's threads and runs
// the epilogue; the tile loop is in gemm_h16_avx512fp16.cpp.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "gemm_h16.h"
#include "layer_norm_row.h"  // norm_row
#include "tasks.h"           // parallel_tasks

namespace leanformer {
namespace {

bool cpu_has_avx512fp16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512fp16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512f");
}

const bool kHasAvx512fp16 = cpu_has_avx512fp16();

// A task is (a chunk of kH16Rows rows, one 64-column panel), tasks ordered chunk-major and handed out in
// guided grabs (tasks.h): a thread's consecutive tasks share its rows of x in L1 / L2 while the panels
// stream (1.16x panel-major, see gemm_h16.h).
constexpr int64_t kRowChunk = kH16Rows;

}  // namespace

bool has_avx512fp16() { return kHasAvx512fp16; }

// w [N, K] (any float dtype) -> fp16 panels [ceil(N / 64), ceil(K / 2) * 128]: panel p, pair j, vector v,
// lane 2c + q = w[64p + 16v + c, 2j + q]; zero past N and K.
at::Tensor pack_h16(const at::Tensor& w_) {
  TORCH_CHECK(w_.dim() == 2 && w_.is_floating_point() && w_.device().is_cpu(), "w must be a float [N, K] CPU tensor");
  const at::Tensor w = w_.to(at::kFloat).contiguous();
  const int64_t N = w.size(0), K = w.size(1), K2 = (K + 1) / 2, P = (N + kH16Panel - 1) / kH16Panel;
  at::Tensor out = at::zeros({P, K2 * kH16Panel * 2}, w.options().dtype(at::kHalf));
  const float* wp = w.data_ptr<float>();
  at::Half* op = out.data_ptr<at::Half>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kH16Panel && p * kH16Panel + c < N; ++c) {
        const int64_t n = p * kH16Panel + c, v = c / 16, lane = 2 * (c % 16);
        for (int64_t k = 0; k < K; ++k)
          op[p * K2 * kH16Panel * 2 + (k / 2) * kH16Panel * 2 + v * 32 + lane + (k % 2)] = static_cast<at::Half>(wp[n * K + k]);
      }
  });
  return out;
}

// One fp32 row r[0, K) -> fp16 o[0, ld) (zero past K), folding max |r| into mx / tail and NaNs into nan.
static inline void row_to_h16(const float* r, int64_t K, uint16_t* o, int64_t ld, __m256& mx, __m256& nan, float& tail) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(r + k);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; k < K; ++k) {
    tail = std::isnan(r[k]) ? INFINITY : std::fmax(tail, std::fabs(r[k]));
    o[k] = _cvtss_sh(r[k], _MM_FROUND_TO_NEAREST_INT);
  }
  for (; k < ld; ++k) o[k] = 0;
}

// max |.| from row_to_h16's running state (inf if a NaN was seen).
static inline float absmax_of(__m256 mx, __m256 nan, float tail) {
  alignas(32) float v[8];
  _mm256_store_ps(v, mx);
  for (float e : v) tail = std::fmax(tail, e);
  return _mm256_movemask_ps(nan) ? INFINITY : tail;
}

// x fp32 [M, K] -> fp16 [M, ld] (zero-padded past K), and max |x| (inf if x holds inf or NaN).
static float to_h16(const float* x, int64_t M, int64_t K, uint16_t* out, int64_t ld) {
  std::vector<float> amax(static_cast<size_t>(at::get_num_threads()), 0.f);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();  // NaN never wins a max: flagged apart
    float tail = 0.f;
    for (int64_t m = m0; m < m1; ++m) row_to_h16(x + m * K, K, out + m * ld, ld, mx, nan, tail);
    float& slot = amax[static_cast<size_t>(at::get_thread_num())];
    slot = std::fmax(slot, absmax_of(mx, nan, tail));
  });
  return *std::max_element(amax.begin(), amax.end());
}

// max |x| over fp16 x [M, K] (inf if it holds inf or NaN).
static float absmax_h16(const uint16_t* x, int64_t n) {
  std::vector<float> amax(static_cast<size_t>(at::get_num_threads()), 0.f);
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float tail = _mm256_movemask_ps(nan) ? INFINITY : 0.f;
    for (; i < i1; ++i) {
      const float v = _cvtsh_ss(x[i]);
      tail = std::isnan(v) ? INFINITY : std::fmax(tail, std::fabs(v));
    }
    alignas(32) float v[8];
    _mm256_store_ps(v, mx);
    for (float e : v) tail = std::fmax(tail, e);
    float& slot = amax[static_cast<size_t>(at::get_thread_num())];
    slot = std::fmax(slot, tail);
  });
  return *std::max_element(amax.begin(), amax.end());
}

// LayerNorm applied to each finished output row, in fp32 (layer_norm_row.h, layer_norm.cpp's bits), and the
// normalized rows' fp16 copy: what the next fp16 matmul reads without a conversion pass.
struct RowNorm {
  const float* w = nullptr;  // null: no scale
  const float* b = nullptr;  // null: no shift
  float eps = 1e-12f;
  at::Tensor y16;  // fp16 [M, N], written
  float absmax = 0.f;  // of y16, written (inf if it holds inf or NaN)
};

// Rows per normalizing task: whole rows (every panel) per task, so that the task can normalize them; fewer
// than kH16Rows when that would leave threads idle (at least one 6-row register tile).
static int64_t norm_rows(int64_t M) {
  const int64_t per = (M + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  return std::clamp<int64_t>((per + 5) / 6 * 6, 6, kRowChunk);
}

// The product on the fp16 panels of pack_h16 for x float32 [M, K] or float16 [M, K] (K even; x_absmax its
// max |x| if known, < 0: measured here), into fp32 y (with the residual; then LayerNorm'd when norm) or
// fp16 y16 (then also its max |value|). Returns false, computing nothing, when an fp16 chain could overflow
// (kH16Chain * max|x| * w_absmax > 30000: the caller then runs the fp32 GEMM).
static bool run_h16(const at::Tensor& x_, const at::Tensor& panels, int64_t N, double w_absmax, double x_absmax,
                    const std::optional<at::Tensor>& bias_, bool gelu, const std::optional<at::Tensor>& residual_,
                    bool to_h16_out, at::Tensor& out, float& out_absmax, RowNorm* norm = nullptr) {
  TORCH_CHECK(kHasAvx512fp16, "linear_h16 needs a CPU with AVX512-FP16");
  TORCH_CHECK(x_.dim() == 2 && x_.device().is_cpu() &&
                  (x_.scalar_type() == at::kFloat || (x_.scalar_type() == at::kHalf && x_.size(1) % 2 == 0)),
              "x must be float32 [M, K] or float16 [M, K] with K even");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), K2 = (K + 1) / 2, P = (N + kH16Panel - 1) / kH16Panel;
  TORCH_CHECK(panels.scalar_type() == at::kHalf && panels.is_contiguous() && panels.dim() == 2 &&
                  panels.size(0) == P && panels.size(1) == K2 * kH16Panel * 2,
              "panels must be pack_h16's output for a [N, K] weight, N = ", N, ", K = ", K);
  at::Tensor bias, res;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->scalar_type() == at::kFloat && bias_->numel() == N, "bias must be float32 [N]");
    bias = bias_->contiguous();
  }
  if (residual_.has_value() && residual_->defined()) {
    TORCH_CHECK(!to_h16_out, "a residual needs the fp32 output");
    TORCH_CHECK(residual_->scalar_type() == at::kFloat && residual_->dim() == 2 && residual_->size(0) == M &&
                    residual_->size(1) == N,
                "residual must be float32 [M, N]");
    res = residual_->contiguous();
  }
  at::Tensor x16;
  float amax;
  if (x.scalar_type() == at::kHalf) {
    x16 = x;
    amax = x_absmax >= 0 ? static_cast<float>(x_absmax)
                         : absmax_h16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::Half>()), M * K);
  } else {
    x16 = at::empty({M, 2 * K2}, x.options().dtype(at::kHalf));
    amax = to_h16(x.data_ptr<float>(), M, K, reinterpret_cast<uint16_t*>(x16.data_ptr<at::Half>()), 2 * K2);
  }
  if (!(kH16Chain * static_cast<double>(amax) * w_absmax <= 30000.0)) return false;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x16.data_ptr<at::Half>());
  out = at::empty({M, N}, x.options().dtype(to_h16_out ? at::kHalf : at::kFloat));
  if (norm) norm->y16 = at::empty({M, N}, x.options().dtype(at::kHalf));
  const uint16_t* pp = reinterpret_cast<const uint16_t*>(panels.data_ptr<at::Half>());
  // Tasks: (row chunk, panel), chunk-major; with norm, row chunks of every panel.
  const int64_t rows = norm ? norm_rows(M) : kRowChunk, chunks = (M + rows - 1) / rows, per = norm ? 1 : P;
  std::vector<float> amaxes(static_cast<size_t>(at::get_num_threads()), 0.f);
  parallel_tasks(per * chunks, [&](int64_t t) {
    const int64_t p = norm ? 0 : t % P, m0 = (t / per) * rows, m1 = std::min(M, m0 + rows);
    float local = 0.f;
    H16Out o;
    o.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    o.gelu = gelu;
    if (to_h16_out) {
      o.y16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>()) + m0 * N;
      o.ldy16 = N;
      o.absmax = &local;
    } else {
      o.y = out.data_ptr<float>() + m0 * N;
      o.ldy = N;
      o.residual = res.defined() ? res.data_ptr<float>() + m0 * N : nullptr;
      o.ldr = N;
    }
    h16_tiles(xp + m0 * 2 * K2, 2 * K2, m1 - m0, pp, K2, p, norm ? P : p + 1, N, o);
    if (norm) {  // the rows are whole and still in L1 / L2: normalize them and write their fp16 copy
      uint16_t* y16 = reinterpret_cast<uint16_t*>(norm->y16.data_ptr<at::Half>());
      __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
      float tail = 0.f;
      for (int64_t m = m0; m < m1; ++m) {
        norm_row(o.y + (m - m0) * N, nullptr, norm->w, norm->b, N, norm->eps);
        row_to_h16(o.y + (m - m0) * N, N, y16 + m * N, N, mx, nan, tail);
      }
      local = absmax_of(mx, nan, tail);
    }
    float& slot = amaxes[static_cast<size_t>(at::get_thread_num())];
    if (std::isnan(local) || (!std::isnan(slot) && local > slot)) slot = local;  // NaN sticks
  });
  const float top = *std::max_element(amaxes.begin(), amaxes.end(), [](float a, float b) { return a < b || std::isnan(b); });
  if (norm) norm->absmax = top;
  else out_absmax = top;
  return true;
}

// y fp32 [M, N] = [residual +] [gelu](x @ w^T + bias), or None when an fp16 chain could overflow.
std::optional<at::Tensor> linear_h16(const at::Tensor& x, const at::Tensor& panels, int64_t N, double w_absmax,
                                     const std::optional<at::Tensor>& bias, bool gelu,
                                     const std::optional<at::Tensor>& residual, double x_absmax) {
  at::Tensor y;
  float unused = 0.f;
  if (!run_h16(x, panels, N, w_absmax, x_absmax, bias, gelu, residual, false, y, unused)) return std::nullopt;
  return y;
}

// (y fp16 [M, N] = [gelu](x @ w^T + bias), max |y|), or None as linear_h16: what the next fp16 matmul takes
// without a conversion pass (the FFN's GELU output; the GELU then in fp16 arithmetic, gelu32h).
std::optional<std::tuple<at::Tensor, double>> linear_h16_to_h16(const at::Tensor& x, const at::Tensor& panels,
                                                                int64_t N, double w_absmax,
                                                                const std::optional<at::Tensor>& bias, bool gelu,
                                                                double x_absmax) {
  at::Tensor y;
  float amax = 0.f;
  if (!run_h16(x, panels, N, w_absmax, x_absmax, bias, gelu, std::nullopt, true, y, amax)) return std::nullopt;
  return std::make_tuple(y, static_cast<double>(amax));
}

static const float* norm_vec(const std::optional<at::Tensor>& t, int64_t N, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == N &&
                  t->is_contiguous(),
              name, " must be a contiguous float32 [", N, "] CPU tensor, got ", t->sizes());
  return t->data_ptr<float>();
}

// (y fp32 [M, N] = LayerNorm(residual + x @ w^T + bias) * ln_w + ln_b, y's fp16 copy, max |copy|), or None
// as linear_h16. The post-LayerNorm block's output projections (models/bert.py): y is the next residual,
// the copy the next fp16 matmul's input; both as layer_norm_ and a conversion pass would give them.
std::optional<std::tuple<at::Tensor, at::Tensor, double>> linear_h16_norm(
    const at::Tensor& x, const at::Tensor& panels, int64_t N, double w_absmax, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& ln_w,
    const std::optional<at::Tensor>& ln_b, double eps, double x_absmax) {
  TORCH_CHECK(N % 2 == 0, "linear_h16_norm needs an even number of outputs, got ", N);
  RowNorm norm;
  norm.w = norm_vec(ln_w, N, "ln_w");
  norm.b = norm_vec(ln_b, N, "ln_b");
  norm.eps = static_cast<float>(eps);
  at::Tensor y;
  float unused = 0.f;
  if (!run_h16(x, panels, N, w_absmax, x_absmax, bias, false, residual, false, y, unused, &norm)) return std::nullopt;
  return std::make_tuple(y, norm.y16, static_cast<double>(norm.absmax));
}

void bind_gemm_h16(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("has_avx512fp16", &has_avx512fp16, "whether this CPU can run linear_h16 and attention_h16");
  m.def("pack_h16", &pack_h16, "w float [N, K] -> fp16 panels for linear_h16", py::arg("w"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_h16", &linear_h16,
        "x float32 / float16 [M, K] -> [residual +] [gelu](x @ w^T + bias) float32 [M, N], fp16 products summed "
        "in fp16 chains of 128 then in fp32; None when a chain could overflow",
        py::arg("x"), py::arg("panels"), py::arg("n"), py::arg("w_absmax"), py::arg("bias") = py::none(),
        py::arg("gelu") = false, py::arg("residual") = py::none(), py::arg("x_absmax") = -1.0,
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_h16_to_h16", &linear_h16_to_h16,
        "as linear_h16 without a residual, into float16 [M, N]: (y, max |y|) or None", py::arg("x"),
        py::arg("panels"), py::arg("n"), py::arg("w_absmax"), py::arg("bias") = py::none(), py::arg("gelu") = false,
        py::arg("x_absmax") = -1.0, py::call_guard<py::gil_scoped_release>());
  m.def("linear_h16_norm", &linear_h16_norm,
        "x float32 / float16 [M, K] -> (y = layer_norm(residual + x @ w^T + bias) * ln_w + ln_b float32 [M, N], "
        "y as float16, max |that copy|), or None when a chain could overflow",
        py::arg("x"), py::arg("panels"), py::arg("n"), py::arg("w_absmax"), py::arg("bias") = py::none(),
        py::arg("residual") = py::none(), py::arg("ln_w") = py::none(), py::arg("ln_b") = py::none(),
        py::arg("eps") = 1e-12, py::arg("x_absmax") = -1.0, py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
