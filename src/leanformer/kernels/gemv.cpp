// Small-batch y = x @ W^T (+ bias) for AVX2/FMA CPUs: fp32, int8 and int4 weights, fp32 activations.
//
// Why this exists: decoding one token reads every weight once, so a decode step is bound by memory
// bandwidth, not arithmetic. torch's CPU paths for [M<=8, K] x [N, K]^T either run single-threaded
// (MKL GEMV) or pay a large fixed cost per call (oneDNN). These kernels stream W once with all of
// torch's threads, and keep the up-to-8 activation rows in registers/L1 so W is read once per call.
//
// Layouts (all row-major, contiguous):
//   x      [M, K] float32
//   f32:   W [N, K] float32
//   q8:    Wq [N, K] int8, scales [N] f32                        w[n,k] = q * scales[n]
//   q4:    Wq [N, ceil(K/2)] uint8, scales/zeros [N, ceil(K/G)]  w[n,k] = (code - 8) * scale + zero
//          byte j of a row holds column 2j in its low nibble and column 2j+1 in its high nibble.
// M > 8 is processed in chunks of 8 rows (W is then read once per chunk; correct, just not optimal).
//
// Light headers on purpose: <torch/extension.h> pulls in all of libtorch's C++ API, which only slows
// the one-time JIT build. int4 lives in gemv_q4.cpp, shared helpers in common.h.
#include <torch/csrc/utils/pybind.h>

#include "common.h"

namespace leanformer {

// ----------------------------------------------------------------------------------------- fp32

// out[m] = dot(x[m], w) for one row w of W; x rows are K apart.
template <int M>
inline void f32_row(const float* __restrict x, const float* __restrict w, int64_t K, float* out) {
  constexpr int U = unroll<M>();
  __m256 acc[M][U];
  LF_UNROLL
  for (int m = 0; m < M; ++m)
    LF_UNROLL
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    prefetch_ahead<32 * U>(w, 4 * k);
    __m256 wv[U];
    LF_UNROLL
    for (int u = 0; u < U; ++u) wv[u] = _mm256_loadu_ps(w + k + 8 * u);
    LF_UNROLL
    for (int m = 0; m < M; ++m)
      LF_UNROLL
      for (int u = 0; u < U; ++u)
        acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
  }
  for (; k + 8 <= K; k += 8) {  // leftover full vectors when U > 1
    const __m256 wv = _mm256_loadu_ps(w + k);
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
  }
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    __m256 a = acc[m][0];
    LF_UNROLL
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum(a);
    for (int64_t j = k; j < K; ++j) s += x[m * K + j] * w[j];  // K % 8 tail
    out[m] = s;
  }
}

template <int M>
void f32_rows(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t K) {
  for_rows(N, K * 4, [&](int64_t n) {
    float out[M];
    f32_row<M>(x, w + n * K, K, out);
    LF_UNROLL
    for (int m = 0; m < M; ++m) y[m * N + n] = out[m] + (bias ? bias[n] : 0.f);
  });
}

// ----------------------------------------------------------------------------------------- int8

// 8 int8 weights -> 8 floats (sign-extend, convert): the dequant happens in registers, W stays 1 B.
inline __m256 load_q8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int M>
inline void q8_row(const float* __restrict x, const int8_t* __restrict w, int64_t K, float* out) {
  constexpr int U = unroll<M>();
  __m256 acc[M][U];
  LF_UNROLL
  for (int m = 0; m < M; ++m)
    LF_UNROLL
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    prefetch_ahead<8 * U>(w, k);
    __m256 wv[U];
    LF_UNROLL
    for (int u = 0; u < U; ++u) wv[u] = load_q8(w + k + 8 * u);
    LF_UNROLL
    for (int m = 0; m < M; ++m)
      LF_UNROLL
      for (int u = 0; u < U; ++u)
        acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load_q8(w + k);
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
  }
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    __m256 a = acc[m][0];
    LF_UNROLL
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum(a);
    for (int64_t j = k; j < K; ++j) s += x[m * K + j] * static_cast<float>(w[j]);
    out[m] = s;
  }
}

template <int M>
void q8_rows(const float* x, const int8_t* w, const float* scales, const float* bias, float* y, int64_t N,
             int64_t K) {
  for_rows(N, K, [&](int64_t n) {
    float out[M];
    q8_row<M>(x, w + n * K, K, out);
    LF_UNROLL
    for (int m = 0; m < M; ++m) y[m * N + n] = out[m] * scales[n] + (bias ? bias[n] : 0.f);
  });
}

at::Tensor linear_f32(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& bias) {
  check_x(x_);
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kFloat && w_.size(1) == x_.size(1),
              "W must be float32 [N, K] matching x [M, K]");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor bh;
  const float* b = bias_ptr(bias, N, bh);
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    dispatch_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto mc) {
      f32_rows<decltype(mc)::value>(x.data_ptr<float>() + m0 * K, w.data_ptr<float>(), b,
                                    y.data_ptr<float>() + m0 * N, N, K);
    });
  }
  return y;
}

at::Tensor linear_q8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& bias) {
  check_x(x_);
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kChar && w_.size(1) == x_.size(1),
              "Wq must be int8 [N, K] matching x [M, K]");
  TORCH_CHECK(scales_.scalar_type() == at::kFloat && scales_.numel() == w_.size(0), "scales must be float32 [N]");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), scales = scales_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor bh;
  const float* b = bias_ptr(bias, N, bh);
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    dispatch_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto mc) {
      q8_rows<decltype(mc)::value>(x.data_ptr<float>() + m0 * K, w.data_ptr<int8_t>(), scales.data_ptr<float>(), b,
                                   y.data_ptr<float>() + m0 * N, N, K);
    });
  }
  return y;
}

}  // namespace leanformer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "leanformer small-batch GEMV kernels (AVX2/FMA)";
  m.def("linear_f32", &leanformer::linear_f32, "x [M,K] f32 @ W[N,K]^T (+bias)", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("linear_q8", &leanformer::linear_q8, "x [M,K] f32 @ (Wq int8 * scales[:,None])^T (+bias)", py::arg("x"),
        py::arg("wq"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("linear_q4", &leanformer::linear_q4, "x [M,K] f32 @ dequant_int4(Wq, scales, zeros, G)^T (+bias)", py::arg("x"),
        py::arg("wq"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("bias") = py::none());
}
