// Small-batch y = x @ W^T (+ bias) for AVX2/FMA CPUs: fp32, int8 and int4 weights, fp32 activations.
// On CPUs with AVX-512 the hot loops run in gemv_avx512.cpp instead (chosen per call, see set_isa).
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
//          or scales [N, ceil(K/G)] f32 (group-wise, GGUF Q8_0)  w[n,k] = q * scales[n, k / G]
//   q4:    Wq [N, ceil(K/2)] uint8, scales/zeros [N, ceil(K/G)]  w[n,k] = (code - 8) * scale + zero
//          byte j of a row holds column 2j in its low nibble and column 2j+1 in its high nibble.
// M > 8 is processed in chunks of 8 rows (W is then read once per chunk; correct, just not optimal).
//
// Light headers on purpose: <torch/extension.h> pulls in all of libtorch's C++ API, which only slows
// the one-time JIT build. int4 lives in gemv_q4.cpp, shared helpers in common.h.
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

#include "common.h"

namespace leanformer {

// ----------------------------------------------------------------------------------------- ISA

// AVX-512 kernels need F/BW/VL/DQ; __builtin_cpu_supports also checks that the OS saves ZMM state.
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

const bool kHasAvx512 = cpu_has_avx512();
std::atomic<bool> g_avx512{kHasAvx512};  // the best ISA by default; set_isa("avx2") for tests/benches

bool use_avx512() { return g_avx512.load(std::memory_order_relaxed); }

std::string isa() { return use_avx512() ? "avx512" : "avx2"; }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "isa must be 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(name == "avx2" || kHasAvx512, "this CPU lacks AVX-512 (F/BW/VL/DQ)");
  g_avx512.store(name == "avx512");
}

// ----------------------------------------------------------------------------------------- fp32

// 8 weights as floats: fp32 as they are, bf16 into the high half of each lane, fp16 by F16C (all exact).
inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w8(const Bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load_w8(const Fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float weight_value(float w) { return w; }
inline float weight_value(Bf16 w) {
  const uint32_t bits = uint32_t(w.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float weight_value(Fp16 w) { return _cvtsh_ss(w.bits); }

// out[m] = dot(x[m], w) for one row w of W; x rows are K apart. Called for at most 2 rows at a time
// with 4 chains each (f32_rows), so a row's sum does not depend on the call's row count.
// One row (M = 1) requests nothing ahead: a batch-1 call is a bare stream that the hardware prefetcher
// keeps fed, and the requests only held L1 miss buffers (SmolLM2 fp32 step + head 0.84-0.95x the time
// without, Zen 4 under set_isa avx2); an odd call's last row finds its weights in L1 anyway.
template <int M, class T>
inline void f32_row(const float* __restrict x, const T* __restrict w, int64_t K, float* out) {
  constexpr int U = 4;
  __m256 acc[M][U];
  LF_UNROLL
  for (int m = 0; m < M; ++m)
    LF_UNROLL
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    if constexpr (M > 1) prefetch_ahead<8 * sizeof(T) * U>(w, sizeof(T) * k);
    __m256 wv[U];
    LF_UNROLL
    for (int u = 0; u < U; ++u) wv[u] = load_w8(w + k + 8 * u);
    LF_UNROLL
    for (int m = 0; m < M; ++m)
      LF_UNROLL
      for (int u = 0; u < U; ++u)
        acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
  }
  for (; k + 8 <= K; k += 8) {  // leftover full vectors when U > 1
    const __m256 wv = load_w8(w + k);
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
  }
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    __m256 a = acc[m][0];
    LF_UNROLL
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum(a);
    // K % 8 tail: an explicit FMA, so fp32 and bf16 rows round alike (the compiler contracts `s += x * w`
    // for one weight type and not always for the other)
    for (int64_t j = k; j < K; ++j) s = std::fma(x[m * K + j], weight_value(w[j]), s);
    out[m] = s;
  }
}

// fp32 activations against fp32, bf16 or fp16 (T = Bf16 / Fp16) weights [N, K]; a bf16 / fp16 row gives
// the same bits as the fp32 row of its weights made fp32 (the same loop on the same values).
template <int M, class T>
void f32_rows(const float* x, const T* w, const float* bias, float* y, int64_t N, int64_t K) {
  for_rows(N, K * sizeof(T), [&](int64_t n) {
    float out[M];
    int m0 = 0;  // rows 2 at a time (the weight row from L1 after the first pair)
    for (; m0 + 2 <= M; m0 += 2) f32_row<2>(x + m0 * K, w + n * K, K, out + m0);
    if (m0 < M) f32_row<1>(x + m0 * K, w + n * K, K, out + m0);
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

// Group-wise scales (GGUF Q8_0: one scale per 32 columns): each decoded 8-weight vector is multiplied by
// its group's scale before the FMA (one extra multiply per 8 weights, shared by the M rows), so the
// accumulators run across groups and the reduction stays once per row.
template <int M>
inline void q8g_row(const float* __restrict x, const int8_t* __restrict w, const float* __restrict sc, int64_t K,
                    int64_t G, float* out) {
  constexpr int U = unroll<M>();
  __m256 acc[M][U];
  float tail[M];
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    tail[m] = 0.f;
    LF_UNROLL
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  }
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
    const int64_t k1 = std::min(K, k0 + G);
    const __m256 s = _mm256_set1_ps(sc[g]);
    int64_t k = k0;
    for (; k + 8 * U <= k1; k += 8 * U) {
      prefetch_ahead<8 * U>(w, k);
      __m256 wv[U];
      LF_UNROLL
      for (int u = 0; u < U; ++u) wv[u] = _mm256_mul_ps(load_q8(w + k + 8 * u), s);
      LF_UNROLL
      for (int m = 0; m < M; ++m)
        LF_UNROLL
        for (int u = 0; u < U; ++u)
          acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
    }
    for (; k + 8 <= k1; k += 8) {
      const __m256 wv = _mm256_mul_ps(load_q8(w + k), s);
      LF_UNROLL
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (; k < k1; ++k) {  // group not a multiple of 8 columns (or K's tail): scalar
      LF_UNROLL
      for (int m = 0; m < M; ++m) tail[m] += x[m * K + k] * static_cast<float>(w[k]) * sc[g];
    }
  }
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    __m256 a = acc[m][0];
    LF_UNROLL
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    out[m] = hsum(a) + tail[m];
  }
}

template <int M>
void q8g_rows(const float* x, const int8_t* w, const float* scales, const float* bias, float* y, int64_t N,
              int64_t K, int64_t G) {
  const int64_t n_groups = (K + G - 1) / G;
  for_rows(N, K, [&](int64_t n) {
    float out[M];
    q8g_row<M>(x, w + n * K, scales + n * n_groups, K, G, out);
    LF_UNROLL
    for (int m = 0; m < M; ++m) y[m * N + n] = out[m] + (bias ? bias[n] : 0.f);
  });
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

namespace {
// linear_f32 / linear_bf16 / linear_f16: x [M, K] fp32 @ W [N, K]^T (+ bias), W fp32, bf16 or fp16
template <class T>
at::Tensor linear_dense(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& bias,
                        at::ScalarType wtype, const char* wname) {
  check_x(x_);
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == wtype && w_.size(1) == x_.size(1), "W must be ", wname,
              " [N, K] matching x [M, K]");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* wp = static_cast<const T*>(w.data_ptr());
  at::Tensor bh;
  const float* b = bias_ptr(bias, N, bh);
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    if (use_avx512()) {
      const KernelArgs a{x.data_ptr<float>() + m0 * K, nullptr, wp, nullptr, nullptr, b,
                         y.data_ptr<float>() + m0 * N, std::min<int64_t>(kMaxRows, M - m0), N, K, 0};
      for_row_blocks(N, K * int64_t(sizeof(T)), [&](int64_t n0, int64_t n1) {
        if constexpr (std::is_same_v<T, float>)
          avx512::f32_rows(a, n0, n1);
        else if constexpr (std::is_same_v<T, Bf16>)
          avx512::bf16_rows(a, n0, n1);
        else
          avx512::f16_rows(a, n0, n1);
      });
      continue;
    }
    dispatch_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto mc) {
      f32_rows<decltype(mc)::value>(x.data_ptr<float>() + m0 * K, wp, b, y.data_ptr<float>() + m0 * N, N, K);
    });
  }
  return y;
}
}  // namespace

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return linear_dense<float>(x, w, bias, at::kFloat, "float32");
}
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return linear_dense<Bf16>(x, w, bias, at::kBFloat16, "bfloat16");
}
at::Tensor linear_f16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return linear_dense<Fp16>(x, w, bias, at::kHalf, "float16");
}

at::Tensor linear_q8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& bias, int64_t group_size) {
  check_x(x_);
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kChar && w_.size(1) == x_.size(1),
              "Wq must be int8 [N, K] matching x [M, K]");
  const int64_t M = x_.size(0), K = x_.size(1), N = w_.size(0);
  TORCH_CHECK(group_size >= 0, "group_size must be >= 0 (0: one scale per row)");
  const bool f32_or_f16 = scales_.scalar_type() == at::kFloat || scales_.scalar_type() == at::kHalf;
  if (group_size == 0) {
    TORCH_CHECK(f32_or_f16 && scales_.numel() == N, "scales must be float32 or float16 [N]");
  } else {
    const int64_t n_groups = (K + group_size - 1) / group_size;
    TORCH_CHECK(f32_or_f16 && scales_.dim() == 2 && scales_.size(0) == N && scales_.size(1) == n_groups,
                "group-wise scales must be float32 or float16 [N, ceil(K/group_size)]");
  }
  // fp16 scales (an Int8Linear's GGUF Q8_0 blocks) widened for the call: this fp32-activation GEMV is
  // not the default decode path (the int8-activation loops read fp16 themselves)
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), scales = scales_.to(at::kFloat).contiguous();
  at::Tensor bh;
  const float* b = bias_ptr(bias, N, bh);
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    if (use_avx512()) {
      const KernelArgs a{x.data_ptr<float>() + m0 * K, nullptr, w.data_ptr<int8_t>(), scales.data_ptr<float>(),
                         nullptr, b, y.data_ptr<float>() + m0 * N, std::min<int64_t>(kMaxRows, M - m0), N, K,
                         group_size};
      for_row_blocks(N, K, [&](int64_t n0, int64_t n1) { avx512::q8_rows(a, n0, n1); });
      continue;
    }
    dispatch_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto mc) {
      constexpr int R = decltype(mc)::value;
      const float* xm = x.data_ptr<float>() + m0 * K;
      float* ym = y.data_ptr<float>() + m0 * N;
      if (group_size == 0)
        q8_rows<R>(xm, w.data_ptr<int8_t>(), scales.data_ptr<float>(), b, ym, N, K);
      else
        q8g_rows<R>(xm, w.data_ptr<int8_t>(), scales.data_ptr<float>(), b, ym, N, K, group_size);
    });
  }
  return y;
}

void bind_decode(pybind11::module_& m);  // decode.cpp
void bind_attention(pybind11::module_& m);  // attention.cpp
void bind_int8_rows(pybind11::module_& m);  // int8_rows.cpp
void bind_layer_norm(pybind11::module_& m);  // layer_norm.cpp
void bind_int8_act(pybind11::module_& m);  // gemv_i8.cpp
void bind_gemm_q4_i8(pybind11::module_& m);  // gemm_q4_i8.cpp
void bind_argmax(pybind11::module_& m);  // argmax.cpp
void bind_identity(pybind11::module_& m);  // identity.cpp
void bind_gemm_h16(pybind11::module_& m);  // gemm_h16.cpp
void bind_attention_h16(pybind11::module_& m);  // attention_h16.cpp

}  // namespace leanformer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "leanformer small-batch GEMV kernels (AVX2/FMA, AVX-512 where the CPU has it)";
  m.def("isa", &leanformer::isa, "the instruction set the linear_* ops use: 'avx2' or 'avx512'");
  m.def("set_isa", &leanformer::set_isa, "use 'avx2' or 'avx512' (raises if the CPU lacks it)", py::arg("name"));
  m.def("has_avx512", [] { return leanformer::kHasAvx512; }, "whether this CPU can run the AVX-512 kernels");
  m.def("linear_f32", &leanformer::linear_f32, "x [M,K] f32 @ W[N,K]^T (+bias)", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("linear_bf16", &leanformer::linear_bf16,
        "x [M,K] f32 @ W[N,K]^T (+bias), W bfloat16 (fp32 math: the fp32 result of W made fp32)", py::arg("x"),
        py::arg("w"), py::arg("bias") = py::none());
  m.def("linear_f16", &leanformer::linear_f16,
        "x [M,K] f32 @ W[N,K]^T (+bias), W float16 (fp32 math: the fp32 result of W made fp32)", py::arg("x"),
        py::arg("w"), py::arg("bias") = py::none());
  m.def("linear_q8", &leanformer::linear_q8,
        "x [M,K] f32 @ (Wq int8 * scales)^T (+bias); scales [N], or [N, ceil(K/G)] with group_size G > 0",
        py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("bias") = py::none(), py::arg("group_size") = 0);
  m.def("linear_q4", &leanformer::linear_q4, "x [M,K] f32 @ dequant_int4(Wq, scales, zeros, G)^T (+bias)", py::arg("x"),
        py::arg("wq"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("lut") = py::none());  // lut: uint8 scale/zero codes (q4_codes.h);
  // zeros None: symmetric codes, w = (code - 8) * scale (GGUF Q4_0)
  m.def("dequant_q4", &leanformer::dequant_q4,
        "Wq uint8 [R, >=ceil(K/2)] -> [R, K] fp32 (or bf16): (code - 8) * scale + zero per group", py::arg("wq"),
        py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("k"), py::arg("bf16") = false,
        py::arg("lut") = py::none());
  m.def("dequant_q8", &leanformer::dequant_q8,
        "Wq int8 [R, K] -> [R, K] fp32 (or bf16): q * scale, per row (group_size 0) or per group", py::arg("wq"),
        py::arg("scales"), py::arg("group_size") = 0, py::arg("bf16") = false);
  m.def("rms_norm", [](const at::Tensor& x, const at::Tensor& w, double eps) { return leanformer::rms_norm(x, w, eps); }, "x [M,K] f32 -> x * rsqrt(mean(x^2) + eps) * w", py::arg("x"),
        py::arg("w"), py::arg("eps"));
  leanformer::bind_decode(m);
  leanformer::bind_attention(m);
  leanformer::bind_int8_rows(m);
  leanformer::bind_layer_norm(m);
  leanformer::bind_int8_act(m);
  leanformer::bind_gemm_q4_i8(m);
  leanformer::bind_argmax(m);
  leanformer::bind_identity(m);
  leanformer::bind_gemm_h16(m);
  leanformer::bind_attention_h16(m);
}
