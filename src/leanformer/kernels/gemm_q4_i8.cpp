// int4 weights x int8 activations for prefill-sized inputs (many rows): y = x @ W^T (+ bias), with x
// quantized per block of 32 columns exactly as the decode GEMVs quantize it (act_quant.h), then integer
// dot products in the loops of gemm_q4_i8.h, AVX-512 VNNI / AVX-VNNI / AVX2 as set_act_isa says.
//
// Why: a quantized model's prefill otherwise dequantizes every weight to fp32 / bf16 per forward and
// runs a float GEMM on it (compress/qbase.py): for SmolLM2-135M's Q4_0 file ~20 ms of fixed cost per
// forward on 2 Zen 5 cores before any arithmetic, so short prompts ran at half llama.cpp's speed. Here
// the weights are read once as nibbles and each 32-column block of 16 (or 8) activation rows is 8 integer
// instructions plus one FMA.
//
// Results equal, up to fp32 summation order, the float product of the quantized activations with the
// dequantized weights (kernels/int8_act.py's reference), like linear_q4_i8's; a row's result does not
// depend on how many rows the call has.
#include <torch/csrc/utils/pybind.h>

#include <ATen/ops/zeros.h>

#include <optional>
#include <vector>

#include "common.h"
#include "act_quant.h"  // quantize_block_at
#include "int8_act.h"

namespace leanformer {

namespace {

// The activations in the loops' tiles (int8_act.h GemmQ4Args): codes, block scales, offset starts, and
// with zero points the group sums of the quantized activations xs [M, G].
struct GemmActs {
  at::Tensor xt, dx, xo, xs;

  // offset: the weights' code offset (8 for int4, 128 for int8 as w + 128), started at -offset * sum
  GemmActs(const at::Tensor& x, int64_t Kp, int64_t group, int64_t L, bool sums, int32_t offset) {
    const int64_t M = x.size(0), K = x.size(1), B = Kp / 32, T = (M + L - 1) / L;
    xt = at::empty({T * B * 32 * L}, x.options().dtype(at::kChar));
    dx = at::empty({T * B * L}, x.options());
    xo = at::empty({T * B * L}, x.options().dtype(at::kInt));
    if (sums) xs = at::zeros({M, Kp / group}, x.options());
    const float* xp = x.data_ptr<float>();
    int8_t* tp = xt.data_ptr<int8_t>();
    float* dp = dx.data_ptr<float>();
    int32_t* op = xo.data_ptr<int32_t>();
    float* sp = sums ? xs.data_ptr<float>() : nullptr;
    // whole tiles per task: a tile's lanes share cache lines, so rows of one tile on two threads would
    // write the same lines (measured: 2 threads slower than 1 on a 576 x 576 call at 4 rows)
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(L * K, 1));
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      alignas(32) int8_t q[32];
      for (int64_t m = t0 * L; m < t1 * L; ++m) {  // rows past M (the last tile's padding): zero codes and scales
        const int64_t t = m / L, l = m % L;
        for (int64_t b = 0; b < B; ++b) {
          float d = 0.f;
          int32_t sum = 0;
          const __m256i codes = m < M ? quantize_block_at(xp + m * K, K, b, &d, &sum) : _mm256_setzero_si256();
          _mm256_store_si256(reinterpret_cast<__m256i*>(q), codes);
          const int64_t tb = t * B + b;
          dp[tb * L + l] = d;
          op[tb * L + l] = -offset * sum;
          int8_t* dst = tp + tb * 32 * L + 4 * l;
          for (int qd = 0; qd < 8; ++qd) std::memcpy(dst + qd * 4 * L, q + 4 * qd, 4);
          if (sp && m < M) sp[m * (Kp / group) + 32 * b / group] += d * static_cast<float>(sum);
        }
      }
    });
  }
};

// Both GEMMs past their checks: x [M, K] fp32 contiguous, w the codes (q4: nibbles [N, Kp/2]; q8: int8
// [N, Kp]), scales fp32 / fp16 [N, Kp / group], zeros (q4 only) fp32 / fp16 [N, Kp / group] or none.
// fp16 scales (GGUF blocks held so): at group 32 each weight row's widened before its tiles
// (GemmQ4Args::scales_h), else for the call (a chained prefill calls per piece of the prompt: widening a
// whole model's scales per call cost ~5% of a 128-token prefill); fp16 zeros widen in the transposing
// copy below. Exact either way.
at::Tensor run_gemm(const at::Tensor& x, const at::Tensor& w, int64_t N, int64_t Kp, const at::Tensor& scales_,
                    const std::optional<at::Tensor>& zeros_, int64_t group, const std::optional<at::Tensor>& bias,
                    bool q8) {
  const int64_t M = x.size(0), G = Kp / group;
  const int isa = act_isa_id();
  const int64_t L = isa == kAvx512Vnni ? 16 : 8, T = (M + L - 1) / L;
  const GemmActs acts(x, Kp, group, L, zeros_.has_value(), q8 ? 128 : 8);
  at::Tensor yt = at::empty({N, T * L}, x.options()), y = at::empty({M, N}, x.options());
  const bool half = scales_.scalar_type() == at::kHalf && group == 32 && G <= kHalfWiden;
  const at::Tensor scales = half ? scales_.contiguous() : scales_.to(at::kFloat).contiguous();
  GemmQ4Args a{acts.xt.data_ptr<int8_t>(), acts.dx.data_ptr<float>(), acts.xo.data_ptr<int32_t>(),
               static_cast<const uint8_t*>(w.data_ptr()), half ? nullptr : scales.data_ptr<float>(),
               yt.data_ptr<float>(), M, N, Kp, T, group, q8};
  if (half) a.scales_h = static_cast<const uint16_t*>(scales.data_ptr());
  at::Tensor zt;  // [G, N] fp32 (from fp32 or fp16 zeros [N, G], in one pass)
  if (zeros_) zt = at::empty({G, N}, x.options()).copy_(zeros_->t());
  const float* zp = zeros_ ? zt.data_ptr<float>() : nullptr;
  const float* sp = zeros_ ? acts.xs.data_ptr<float>() : nullptr;
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float* ytp = yt.data_ptr<float>();
  // the arithmetic, not the weight stream, sets the pace here: each thread one contiguous share of rows,
  // whose outputs it then moves from yt [n, m] into y [m, n] while they are in its cache
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes(8 * Kp);  // NR rows' codes, unpacked once per row group
    if (isa == kAvx512Vnni)
      i8avx512vnni::q4_gemm(a, n0, n1, codes.data());
    else if (isa == kAvxVnni)
      i8avxvnni::q4_gemm(a, n0, n1, codes.data());
    else
      i8avx2::q4_gemm(a, n0, n1, codes.data());
    for (int64_t nb = n0; nb < n1; nb += 16) {
      const int64_t ne = std::min(nb + 16, n1);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = nb; n < ne; ++n) yp[m * N + n] = ytp[n * T * L + m] + (bp ? bp[n] : 0.f);
    }
    // zero points: y[m] += sum_g xs[m, g] * zeros[:, g], g in order (a row's sum is the same at any M)
    for (int64_t m = 0; zp && m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const float c = sp[m * G + g];
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] += c * zp[g * N + n];
      }
  });
  return y;
}

}  // namespace

// x [M, K] fp32, w uint8 [N, Kp/2] (K <= Kp), scales fp32 / fp16 [N, Kp/group], zeros likewise or none
// (w = (q - 8) * scale + zero) -> [M, N] fp32.
at::Tensor gemm_q4_i8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                      const std::optional<at::Tensor>& zeros_, int64_t group, const std::optional<at::Tensor>& bias) {
  check_x(x_);
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kByte, "Wq must be uint8 [N, Kp/2]");
  const int64_t K = x_.size(1), N = w_.size(0), Kp = 2 * w_.size(1);
  TORCH_CHECK(group > 0 && group % 32 == 0 && Kp % group == 0 && K <= Kp,
              "the int8-activation int4 GEMM needs a group size that is a multiple of 32 dividing the codes' "
              "columns (", Kp, ") and x with at most that many columns, got group ", group, ", K ", K);
  const int64_t G = Kp / group;
  const auto f32_or_f16 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf; };
  TORCH_CHECK(f32_or_f16(scales_) && scales_.dim() == 2 && scales_.size(0) == N && scales_.size(1) == G,
              "scales must be float32 or float16 [N, ", G, "]");
  TORCH_CHECK(!zeros_ || (f32_or_f16(*zeros_) && zeros_->sizes() == scales_.sizes()),
              "zeros must be float32 or float16 shaped like the scales, or None");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N), "bias must be float32 [N]");
  return run_gemm(x_.contiguous(), w_.contiguous(), N, Kp, scales_, zeros_, group, bias, false);
}

// x [M, K] fp32, w int8 [N, K] (K a multiple of 32), scales fp32 [N] (group 0: one per row) or
// [N, K / group] -> [M, N] fp32. VNNI only (gemm_q4_i8.h: AVX2's maddubs would saturate).
at::Tensor gemm_q8_i8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_, int64_t group,
                      const std::optional<at::Tensor>& bias) {
  check_x(x_);
  TORCH_CHECK(act_isa_id() != kAvx2, "the int8-weight GEMM needs AVX-VNNI or AVX-512 VNNI (act_isa is avx2)");
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kChar && w_.size(1) == x_.size(1) && x_.size(1) % 32 == 0,
              "Wq must be int8 [N, K] matching x [M, K], K a multiple of 32");
  const int64_t K = x_.size(1), N = w_.size(0);
  const int64_t g = group == 0 ? K : group;  // one scale per row: one group of K columns
  TORCH_CHECK(g % 32 == 0 && K % g == 0, "int8 GEMM groups must be multiples of 32 dividing K, got ", group);
  TORCH_CHECK((scales_.scalar_type() == at::kFloat || scales_.scalar_type() == at::kHalf) &&
                  scales_.numel() == N * (K / g),
              "scales must be float32 or float16 [N", group ? ", K / group" : "", "]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N), "bias must be float32 [N]");
  return run_gemm(x_.contiguous(), w_.contiguous(), N, K, scales_.reshape({N, K / g}), std::nullopt, g, bias, true);
}

void bind_gemm_q4_i8(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gemm_q4_i8", &gemm_q4_i8,
        "int8(x) [M,K] @ dequant_int4(Wq, scales, zeros, G)^T (+bias), for many rows (prefill): x quantized "
        "per block of 32 as linear_q4_i8 does; zeros=None: w = (q - 8) * scale",
        py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("zeros") = py::none(), py::arg("group_size") = 32,
        py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("gemm_q8_i8", &gemm_q8_i8,
        "int8(x) [M,K] @ (Wq int8 * scales)^T (+bias), for many rows (prefill), AVX-VNNI / AVX-512 VNNI only: x "
        "quantized per block of 32 as linear_q8_i8 does; group_size 0: one scale per row",
        py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("group_size") = 0, py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
