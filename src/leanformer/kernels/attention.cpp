// Fused softmax attention for encoder inference (models/bert.py): out = softmax(scale * q k^T + mask) v
// per (batch, head) in one pass over a block of query rows, fp32 with fp32 accumulation.
//
// Why: for BERT-sized heads (head_dim 32-64) torch's CPU SDPA (flash kernel) runs far below the FMA
// peak: on all-MiniLM-L6-v2 at 256 tokens it took ~73 ms of a ~300 ms forward for ~10 GFLOP. Here
// each (batch, head) packs K^T and V once, then computes whole score rows in register tiles, an exact
// softmax per row, and P V in register tiles (attention_impl.h). Non-causal, self-attention (the same
// T for queries and keys), optional key mask [B, T] (True = attend; HF's padding mask).
//
// Threads: (batch, head) pairs are split over torch's thread pool. AVX-512 CPUs run the 16-wide copy
// (attention_avx512.cpp), others the 8-wide one compiled here; set_isa("avx2") forces the latter.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <tuple>

#include "attention.h"
#include "common.h"  // use_avx512()

namespace leanformer {
namespace {

struct V8 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg fmsub(reg a, reg b, reg c) { return _mm256_fmsub_ps(a, b, c); }
  static float hmax(reg x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hsum(reg x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // e^x for x <= 0, as the AVX-512 copy but 2^n built in the exponent bits, which needs n >= -126:
  // inputs below -87.3 (incl. -inf) give exactly 0 instead.
  static reg exp(reg x0) {
    const reg x1 = _mm256_max_ps(x0, _mm256_set1_ps(-87.3f));
    const reg n = _mm256_round_ps(_mm256_mul_ps(x1, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x1);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    reg y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
    return _mm256_and_ps(y, _mm256_cmp_ps(x0, _mm256_set1_ps(-87.3f), _CMP_GE_OQ));
  }
};

}  // namespace
}  // namespace leanformer

#include "attention_impl.h"

namespace leanformer {
namespace {

// 12-row query blocks; QK tiles of 12 accumulators: 6 rows x 16 keys (12 x 8 for inputs of <= 8
// tokens); PV tiles of 12 accumulators.
void attention_heads_avx2(const AttnArgs& a, int64_t bh0, int64_t bh1, float* scratch) {
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    if (a.T <= 8)
      attn_head<V8, 12, 12, 1, 12>(a, bh, scratch);
    else
      attn_head<V8, 12, 6, 2, 12>(a, bh, scratch);
  }
}

void check_qkv(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              name, " must be a float32 CPU tensor [B, H, T, D], got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), name, " has shape ", t.sizes(), ", q has ", q.sizes());
}

}  // namespace

// q, k, v [B, H, T, D] float32 (any strides) -> out [B, T, H, D] contiguous.
at::Tensor attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                     const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  check_qkv(q_, q_, "q");
  check_qkv(k_, q_, "k");
  check_qkv(v_, q_, "v");
  auto inner = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = inner(q_), k = inner(k_), v = inner(v_);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor mask;
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == B && key_mask->size(1) == T &&
                    (key_mask->scalar_type() == at::kBool || key_mask->scalar_type() == at::kByte),
                "key_mask must be bool [B, T] = [", B, ", ", T, "], got ", key_mask->sizes(), " ",
                key_mask->scalar_type());
    mask = key_mask->contiguous();
  }
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  if (out.numel() == 0) return out;
  AttnArgs a{};
  a.q = q.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
  }
  a.out = out.data_ptr<float>();
  a.mask = mask.defined() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  a.B = B, a.H = H, a.T = T, a.D = D;
  a.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  // Up to 8 tokens the 8-wide blocking wastes less on padding (measured [32, 12, 8, 32]: 0.05 vs 0.10 ms).
  const bool wide = use_avx512() && T > 8;
  const int64_t floats = attn_scratch_floats(T, D);
  at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
    std::unique_ptr<float[]> scratch(new float[floats]);
    if (wide)
      avx512::attention_heads(a, bh0, bh1, scratch.get());
    else
      attention_heads_avx2(a, bh0, bh1, scratch.get());
  });
  return out;
}

// ------------------------------------------------------------- int8 dynamic Linears of the encoder
//
// The row passes around an Int8Dynamic Linear's oneDNN u8s8 GEMM (compress/quant.py), one pass each
// instead of 4-6 torch ops and as many [M, N] temporaries: at [4096, 1536] those ran ~100 ms of a 260 ms
// MiniLM forward at 256 tokens, more than the int8 GEMMs themselves (~70 ms).

namespace {

inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }

// torch's vectorized erf (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7), with V8::exp for exp(-x^2).
inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_and_ps(_mm256_set1_ps(-0.f), x), one = _mm256_set1_ps(1.f);
  const __m256 ax = _mm256_xor_ps(sign, x);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = V8::exp(_mm256_xor_ps(_mm256_set1_ps(-0.f), _mm256_mul_ps(x, x)));  // exp(-x^2)
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
      float amax = V8::hmax(mx);
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

void bind_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention", &attention,
        "softmax(scale * q k^T, keys where key_mask) v for q/k/v float32 [B, H, T, D] -> [B, T, H, D]; "
        "scale defaults to 1/sqrt(D)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask") = py::none(), py::arg("scale") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_rows_u8", &quantize_rows_u8,
        "x float32 [M, K] -> (uint8 round(x / s) + 128, s float32 [M, 1]), s = max|x[m]| / 127 (per token)",
        py::arg("x"), py::call_guard<py::gil_scoped_release>());
  m.def("int8_epilogue_", &int8_epilogue_,
        "in place: y = [residual +] [gelu](y * s[m] + bias[n]) over y float32 [M, N]", py::arg("y"), py::arg("s"),
        py::arg("bias") = py::none(), py::arg("gelu") = false, py::arg("residual") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
