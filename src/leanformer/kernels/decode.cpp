// A whole decode step of a Llama-family decoder stack in one C++ call (models/fused.py builds it).
//
// Why: a decode step on a small model is mostly not matmul. SmolLM2-135M at int4 spends ~2.8 ms of a
// ~7.4 ms token in the GEMV kernels; the rest is ~40 torch ops and ~10 module calls per layer
// (norms, RoPE, cache writes, SDPA, residuals, SiLU), each paying Python and dispatcher overhead for
// a microsecond of arithmetic. Here every layer is: RMSNorm -> qkv GEMV -> RoPE + KV-cache write +
// attention over each row's own length -> o GEMV + residual -> RMSNorm -> gate_up GEMV -> SiLU*up ->
// down GEMV + residual, with the same GEMV kernels the modules call (gemv.cpp / gemv_q4.cpp).
//
// Shapes: x [M, hidden] (M decode rows, one new token each), qkv [M, (H + 2 KV) * D] with q heads
// first, then k, then v (models/layers.Attention's layout); KV cache per layer [slots, KV, max_seq, D]
// float32, or int8 with one fp32 scale per (slot, head, position) [slots, KV, max_seq, 1]
// (models/kv_cache.py). Row m writes its token at positions[m] of slot slots[m] and attends to keys
// 0..positions[m]. Arithmetic is fp32 throughout; results match the module path to float rounding
// (summation order differs), which the tests check against a no-cache recompute.
#include <torch/csrc/utils/pybind.h>

#include <ATen/ops/constant_pad_nd.h>

#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "decode_attention.h"  // RoPE, KV-cache write, attention
#include "vec8.h"              // exp8, exp1

namespace leanformer {

namespace {

// Where a step's time goes (DecodeStack.profile): prof[k] += the milliseconds since the last lap, for
// the phases of DecodeLayer::forward below; prof null: nothing timed.
enum Phase { kPhaseNorms, kPhaseQkv, kPhaseAttention, kPhaseO, kPhaseGateUp, kPhaseSilu, kPhaseDown, kPhases };

struct Laps {
  double* prof;
  std::chrono::steady_clock::time_point t;
  explicit Laps(double* p) : prof(p) {
    if (prof) t = std::chrono::steady_clock::now();
  }
  void operator()(Phase k) {
    if (!prof) return;
    const auto now = std::chrono::steady_clock::now();
    prof[k] += std::chrono::duration<double, std::milli>(now - t).count();
    t = now;
  }
};

}  // namespace

// One Linear's operands, as the module holds them (see models/fused.py for who provides what).
struct DecodeLinear {
  enum class Kind { f32, q8, q4, q5 };
  Kind kind;  // "f32": w fp32 [N, K]; "q8": w int8 [N, K] + scales; "q4": w uint8 [N, Kp/2] + scales/zeros;
              // "q5": w uint8 [N, Kp/2] nibbles + scales [N, Kp/32], `zeros` the int32 high bits [N, Kp/32]
  at::Tensor w;
  std::optional<at::Tensor> scales, zeros, bias, input_scale;
  std::optional<at::Tensor> lut;  // q4 with uint8 scale/zero codes: their fp32 table [512] (q4_codes.h)
  int64_t group = 0;     // q8: 0 (per row) or columns per scale; q4: group size
  int64_t k_padded = 0;  // q4: the codes' column count (input zero-padded up to it)
  bool zeros_all_zero = false;  // q4: every zero point 0 when built (see q4_zeros)
  int64_t zeros_version = -1;   // the zeros' version counter then (-1: an inference tensor, which has none)

  DecodeLinear(std::string kind_, at::Tensor w_, std::optional<at::Tensor> scales_, std::optional<at::Tensor> zeros_,
               std::optional<at::Tensor> bias_, std::optional<at::Tensor> input_scale_, int64_t group_,
               int64_t k_padded_, std::optional<at::Tensor> lut_)
      : kind(parse(kind_)), w(std::move(w_)), scales(std::move(scales_)), zeros(std::move(zeros_)),
        bias(std::move(bias_)), input_scale(std::move(input_scale_)), lut(std::move(lut_)), group(group_),
        k_padded(k_padded_) {
    TORCH_CHECK(kind == Kind::f32 || scales.has_value(), "quantized DecodeLinear needs scales");
    TORCH_CHECK(kind != Kind::q4 || zeros.has_value(), "q4 DecodeLinear needs zeros");
    TORCH_CHECK(kind != Kind::q5 || (zeros.has_value() && group == 32), "q5 DecodeLinear needs high bits, group 32");
    if (kind == Kind::q4) {
      zeros_all_zero = !lut.has_value() && !zeros->any().item<bool>();  // codes 0 are not zero points
      zeros_version = zeros->is_inference() ? -1 : zeros->_version();
    }
  }

  // The zero points for the int8-activation int4 kernel: none when they are all zero (GGUF Q4_0's
  // symmetric blocks), which saves reading 4 of every 20 bytes per 32 weights. Checked once here; an
  // in-place write to the zeros since then (version counter) brings them back.
  std::optional<at::Tensor> q4_zeros() const {
    const bool unchanged = zeros_version < 0 || zeros->_version() == zeros_version;
    return zeros_all_zero && unchanged ? std::nullopt : zeros;
  }

  static Kind parse(const std::string& name) {
    if (name == "f32") return Kind::f32;
    if (name == "q8") return Kind::q8;
    if (name == "q5") return Kind::q5;
    TORCH_CHECK(name == "q4", "DecodeLinear kind must be f32, q8, q4 or q5, got '", name, "'");
    return Kind::q4;
  }

  int64_t out_features() const { return w.size(0); }

  // Whether the int8-activation kernels (gemv_i8.cpp) can run this Linear: integer weights whose
  // scale groups are whole 32-column activation blocks.
  bool int8_capable() const {
    if (kind == Kind::q8) return group % 32 == 0 || group == 16;  // 16: GGUF Q6_K
    if (kind == Kind::q5) return true;
    return kind == Kind::q4 && group % 32 == 0 && k_padded % group == 0;
  }

  // x [M, K] fp32 contiguous -> [M, N]; int8_act: quantize x per block of 32 and use integer dot products
  at::Tensor operator()(at::Tensor x, bool int8_act = false) const {
    if (input_scale.has_value()) x = x.mul(*input_scale);
    if (kind == Kind::f32) return linear_f32(x, w, bias);
    const bool i8 = int8_act && int8_capable();
    if (kind == Kind::q8) return i8 ? linear_q8_i8(x, w, *scales, bias, group) : linear_q8(x, w, *scales, bias, group);
    if (kind == Kind::q5) {  // fp32 activations: no fp32 GEMV for int5, so the dequantized weight (exact)
      if (i8) return linear_q5_i8(x, w, *zeros, *scales, bias);
      if (k_padded > x.size(1)) x = at::constant_pad_nd(x, {0, k_padded - x.size(1)});
      return linear_f32(x, dequant_q5(w, *zeros, *scales), bias);
    }
    if (i8) return linear_q4_i8(x, w, *scales, q4_zeros(), group, bias, lut);  // pads x to k_padded itself
    if (k_padded > x.size(1)) x = at::constant_pad_nd(x, {0, k_padded - x.size(1)});
    return linear_q4(x, w, *scales, *zeros, group, bias, lut);
  }
};

struct DecodeLayer {
  at::Tensor norm1, norm2;  // RMSNorm weights fp32 [hidden]
  double eps1, eps2;
  DecodeLinear qkv, o, gate_up, down;
  int64_t n_heads, n_kv_heads, head_dim;

  void forward(at::Tensor& x, const float* cos, const float* sin, const at::Tensor& kc, const at::Tensor& vc,
               const at::Tensor& ks, const at::Tensor& vs, const int64_t* slots, const int64_t* pos, bool i8,
               double* prof = nullptr) const {
    const int64_t M = x.size(0);
    Laps lap(prof);
    at::Tensor h = rms_norm(x, norm1, eps1);
    lap(kPhaseNorms);
    at::Tensor qkv_out = qkv(h, i8);  // q, k and v share one quantized input
    lap(kPhaseQkv);
    at::Tensor attn = at::empty({M, n_heads * head_dim}, x.options());
    if (kc.scalar_type() == at::kChar)
      decode_attention<int8_t>(qkv_out, cos, sin, kc, vc, ks, vs, slots, pos, n_heads, n_kv_heads, attn);
    else
      decode_attention<float>(qkv_out, cos, sin, kc, vc, ks, vs, slots, pos, n_heads, n_kv_heads, attn);
    lap(kPhaseAttention);
    at::Tensor o_out = o(attn, i8);
    lap(kPhaseO);
    add_(x, o_out);
    h = rms_norm(x, norm2, eps2);
    lap(kPhaseNorms);
    at::Tensor gu = gate_up(h, i8);  // [M, 2I]: gate then up
    lap(kPhaseGateUp);
    const int64_t I = gu.size(1) / 2;
    at::Tensor act = at::empty({M, I}, x.options());
    const float* g = gu.data_ptr<float>();
    float* a = act.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {  // silu(gate) * up, silu(z) = z / (1 + e^-z) as torch computes it
      const float* gm = g + m * 2 * I;
      float* am = a + m * I;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 z = _mm256_loadu_ps(gm + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
        _mm256_storeu_ps(am + i, _mm256_mul_ps(_mm256_div_ps(z, _mm256_add_ps(one, e)), _mm256_loadu_ps(gm + I + i)));
      }
      for (; i < I; ++i) am[i] = gm[i] / (1.f + exp1(-gm[i])) * gm[I + i];
    }
    lap(kPhaseSilu);
    at::Tensor d = down(act, i8);
    lap(kPhaseDown);
    add_(x, d);
    lap(kPhaseNorms);
  }

  static void add_(at::Tensor& x, const at::Tensor& y) {
    float* xp = x.data_ptr<float>();
    const float* yp = y.data_ptr<float>();
    const int64_t n = x.numel();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(xp + i, _mm256_add_ps(_mm256_loadu_ps(xp + i), _mm256_loadu_ps(yp + i)));
    for (; i < n; ++i) xp[i] += yp[i];
  }
};

// The decoder layers of one model, run in order: x [M, hidden] -> x after the last layer.
struct DecodeStack {
  std::vector<DecodeLayer> layers;
  bool int8_act = false;  // int4/int8 Linears on int8 activations (gemv_i8.cpp); fp32 activations otherwise
  // Empty: no timing. kPhases entries: forward adds each phase's milliseconds (norms + residuals, qkv,
  // attention (RoPE, cache write, softmax), o, gate_up, SiLU, down; a GEMV's phase includes its
  // activation quantization and its thread fork / join) over all layers (scripts/profile_decode_rows.py).
  mutable std::vector<double> profile;  // mutable: forward is const

  void add(at::Tensor norm1, double eps1, DecodeLinear qkv, DecodeLinear o, at::Tensor norm2, double eps2,
           DecodeLinear gate_up, DecodeLinear down, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim) {
    TORCH_CHECK(n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
    TORCH_CHECK(qkv.out_features() == (n_heads + 2 * n_kv_heads) * head_dim, "qkv size does not match the heads");
    for (const at::Tensor* n : {&norm1, &norm2})
      TORCH_CHECK(n->scalar_type() == at::kFloat && n->dim() == 1, "norm weights must be float32 [hidden]");
    layers.push_back(DecodeLayer{norm1.contiguous(), norm2.contiguous(), eps1, eps2, std::move(qkv), std::move(o),
                                 std::move(gate_up), std::move(down), n_heads, n_kv_heads, head_dim});
  }

  // x [M, hidden]; cos/sin [M, D]; k/v caches and (int8 storage) their scales, one per layer; slots and
  // positions [M] int64.
  at::Tensor forward(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_,
                     const std::vector<at::Tensor>& k, const std::vector<at::Tensor>& v,
                     const std::vector<at::Tensor>& k_scale, const std::vector<at::Tensor>& v_scale,
                     const at::Tensor& slots_, const at::Tensor& positions_) const {
    check_x(x_);
    const int64_t M = x_.size(0);
    TORCH_CHECK(k.size() == layers.size() && v.size() == layers.size(), "one K and one V cache per layer");
    const bool q8 = !k_scale.empty();
    TORCH_CHECK(!q8 || (k_scale.size() == layers.size() && v_scale.size() == layers.size()),
                "int8 KV storage needs one scale tensor per layer");
    const int64_t D = layers.empty() ? 0 : layers[0].head_dim;
    const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
    TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.numel() == M * D && sin.numel() == M * D,
                "cos/sin must be float32 [M, head_dim]");
    const at::Tensor slots = slots_.to(at::kLong).contiguous(), pos = positions_.to(at::kLong).contiguous();
    TORCH_CHECK(slots.numel() == M && pos.numel() == M, "slots and positions must have one entry per row");
    at::Tensor x = x_.clone();
    for (size_t i = 0; i < layers.size(); ++i) {
      const at::Tensor& kc = k[i];
      TORCH_CHECK(kc.is_contiguous() && v[i].is_contiguous() && kc.dim() == 4 && kc.size(1) == layers[i].n_kv_heads &&
                      kc.size(3) == layers[i].head_dim,
                  "KV cache must be contiguous [slots, n_kv_heads, max_seq, head_dim]");
      TORCH_CHECK(kc.scalar_type() == (q8 ? at::kChar : at::kFloat), "KV cache must be float32 (or int8 with scales)");
      for (int64_t m = 0; m < M; ++m)
        TORCH_CHECK(slots.data_ptr<int64_t>()[m] < kc.size(0) && pos.data_ptr<int64_t>()[m] < kc.size(2),
                    "slot or position outside the KV cache");
      const at::Tensor none;
      layers[i].forward(x, cos.data_ptr<float>(), sin.data_ptr<float>(), kc, v[i], q8 ? k_scale[i] : none,
                        q8 ? v_scale[i] : none, slots.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), int8_act,
                        profile.size() == kPhases ? profile.data() : nullptr);
    }
    return x;
  }
};

// One layer's decode attention alone (tests/kernels/test_decode_attention.py): qkv [M, (H + 2 KV) * D]
// -> [M, H * D], the rows' k / v written into the cache [slots, KV, max_seq, D] as DecodeStack does.
at::Tensor decode_attention_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& k_scale,
                               const std::optional<at::Tensor>& v_scale, const at::Tensor& slots,
                               const at::Tensor& positions, int64_t n_heads) {
  check_x(qkv);
  const bool q8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                  v.scalar_type() == k.scalar_type() && (q8 || k.scalar_type() == at::kFloat),
              "k / v caches must be contiguous float32 or int8 [slots, n_kv_heads, max_seq, head_dim]");
  const int64_t M = qkv.size(0), KV = k.size(1), D = k.size(3);
  TORCH_CHECK(n_heads > 0 && n_heads % KV == 0 && qkv.is_contiguous() && qkv.size(1) == (n_heads + 2 * KV) * D,
              "qkv must be contiguous [M, (n_heads + 2 n_kv_heads) * head_dim], n_heads a multiple of n_kv_heads");
  TORCH_CHECK(!q8 || (k_scale && v_scale && k_scale->scalar_type() == at::kFloat && k_scale->is_contiguous() &&
                      v_scale->is_contiguous() && k_scale->sizes() == v_scale->sizes() &&
                      k_scale->numel() == k.numel() / D && v_scale->scalar_type() == at::kFloat),
              "an int8 cache needs float32 scales [slots, n_kv_heads, max_seq, 1]");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == M * D,
                "cos / sin must be contiguous float32 [M, head_dim]");
  const at::Tensor s = slots.to(at::kLong).contiguous(), p = positions.to(at::kLong).contiguous();
  TORCH_CHECK(s.numel() == M && p.numel() == M, "slots and positions need one entry per row");
  for (int64_t m = 0; m < M; ++m) {
    const int64_t sm = s.data_ptr<int64_t>()[m], pm = p.data_ptr<int64_t>()[m];
    TORCH_CHECK(sm >= 0 && sm < k.size(0) && pm >= 0 && pm < k.size(2), "slot or position outside the KV cache");
  }
  at::Tensor out = at::empty({M, n_heads * D}, qkv.options());
  const at::Tensor none;
  if (q8)
    decode_attention<int8_t>(qkv, cos.data_ptr<float>(), sin.data_ptr<float>(), k, v, *k_scale, *v_scale,
                             s.data_ptr<int64_t>(), p.data_ptr<int64_t>(), n_heads, KV, out);
  else
    decode_attention<float>(qkv, cos.data_ptr<float>(), sin.data_ptr<float>(), k, v, none, none,
                            s.data_ptr<int64_t>(), p.data_ptr<int64_t>(), n_heads, KV, out);
  return out;
}

void bind_decode(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<DecodeLinear>(m, "DecodeLinear", py::module_local(), "one Linear's operands for DecodeStack (see models/fused.py)")
      .def(py::init<std::string, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                    std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t, int64_t,
                    std::optional<at::Tensor>>(),
           py::arg("kind"), py::arg("w"), py::arg("scales") = py::none(), py::arg("zeros") = py::none(),
           py::arg("bias") = py::none(), py::arg("input_scale") = py::none(), py::arg("group") = 0,
           py::arg("k_padded") = 0, py::arg("lut") = py::none());
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local(), "a Llama-family decoder stack's decode step in one call")
      .def(py::init<>())
      .def("add", &DecodeStack::add, py::arg("norm1"), py::arg("eps1"), py::arg("qkv"), py::arg("o"),
           py::arg("norm2"), py::arg("eps2"), py::arg("gate_up"), py::arg("down"), py::arg("n_heads"),
           py::arg("n_kv_heads"), py::arg("head_dim"))
      .def("__len__", [](const DecodeStack& s) { return s.layers.size(); })
      .def_readwrite("int8_act", &DecodeStack::int8_act,
                     "run int4/int8 Linears on int8 activations (per block of 32) instead of fp32")
      .def_readwrite("profile", &DecodeStack::profile,
                     "[] (off) or 7 zeros: forward then adds the ms of norms+residuals, qkv, attention, o, gate_up, "
                     "silu, down")
      .def("int8_linears", [](const DecodeStack& s) {
             int64_t n = 0;
             for (const auto& l : s.layers)
               for (const DecodeLinear* d : {&l.qkv, &l.o, &l.gate_up, &l.down}) n += d->int8_capable();
             return n;
           }, "how many Linears the int8-activation kernels can run")
      .def("forward", &DecodeStack::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("k"),
           py::arg("v"), py::arg("k_scale"), py::arg("v_scale"), py::arg("slots"), py::arg("positions"),
           py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention_op, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k"),
        py::arg("v"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("slots"),
        py::arg("positions"), py::arg("n_heads"), py::call_guard<py::gil_scoped_release>(),
        "one layer's fused-decode attention: RoPE, KV-cache write, softmax(q k^T / sqrt(D)) v per row");
}

}  // namespace leanformer
