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
// (or a paged pool, StepRows) float32, float16 (converted with F16C, rounded to nearest even as torch's
// .half()), or int8 with one fp32 scale per (slot, head, position) [slots, KV, max_seq, 1]
// (models/kv_cache.py). Row m writes its token at positions[m] of slot slots[m] and attends to keys
// 0..positions[m]. Arithmetic is fp32 throughout; results match the module path to float rounding
// (summation order differs), which the tests check against a no-cache recompute.
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "decode_attend.h"  // StepRows, KeyGroups, attend
#include "decode_linear.h"  // DecodeLinear
#include "vec8.h"  // exp8, exp1

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

// One step's intermediate tensors, reused from layer to layer: ~13 allocations a layer otherwise, each
// ~0.3 us through the dispatcher on the calling thread while the others wait. A layer of other sizes
// (a pruned model's) gets its own tensor (common.h output()).
struct StepBuffers {
  enum Slot { kNormed, kQkv, kAttn, kO, kGateUp, kAct, kDown, kSlots };
  at::Tensor t[kSlots];
  const at::Tensor* get(Slot s, int64_t M, int64_t N, const at::TensorOptions& options) {
    t[s] = output(&t[s], M, N, options);
    return &t[s];
  }
};

struct DecodeLayer {
  at::Tensor norm1, norm2;  // RMSNorm weights fp32 [hidden]
  double eps1, eps2;
  DecodeLinear qkv, o, gate_up, down;
  int64_t n_heads, n_kv_heads, head_dim;

  void forward(at::Tensor& x, const float* cos, const float* sin, const at::Tensor& kc, const at::Tensor& vc,
               const at::Tensor& ks, const at::Tensor& vs, const StepRows& rows, const KeyGroups& groups, bool i8,
               const DecodeLinear* next, StepBuffers& buf, double* prof = nullptr) const {
    const int64_t M = x.size(0), hidden = x.size(1);
    const auto opt = x.options();
    using B = StepBuffers;
    Laps lap(prof);
    at::Tensor h = rms_norm(x, norm1, eps1, buf.get(B::kNormed, M, hidden, opt));
    lap(kPhaseNorms);
    // q, k and v share one quantized input
    at::Tensor qkv_out = qkv(h, i8, &o, buf.get(B::kQkv, M, qkv.out_features(), opt));
    lap(kPhaseQkv);
    at::Tensor attn = *buf.get(B::kAttn, M, n_heads * head_dim, opt);
    if (kc.scalar_type() == at::kChar)
      attend<int8_t>(qkv_out, cos, sin, kc, vc, ks, vs, rows, groups, n_heads, n_kv_heads, head_dim, attn);
    else if (kc.scalar_type() == at::kHalf)
      attend<uint16_t>(qkv_out, cos, sin, kc, vc, ks, vs, rows, groups, n_heads, n_kv_heads, head_dim, attn);
    else
      attend<float>(qkv_out, cos, sin, kc, vc, ks, vs, rows, groups, n_heads, n_kv_heads, head_dim, attn);
    lap(kPhaseAttention);
    at::Tensor o_out = o(attn, i8, &gate_up, buf.get(B::kO, M, o.out_features(), opt));
    lap(kPhaseO);
    add_(x, o_out);
    h = rms_norm(x, norm2, eps2, buf.get(B::kNormed, M, hidden, opt));
    lap(kPhaseNorms);
    at::Tensor gu = gate_up(h, i8, &down, buf.get(B::kGateUp, M, gate_up.out_features(), opt));  // [M, 2I]: gate, up
    lap(kPhaseGateUp);
    const int64_t I = gu.size(1) / 2;
    at::Tensor act = *buf.get(B::kAct, M, I, opt);
    const float* g = gu.data_ptr<float>();
    float* a = act.data_ptr<float>();
    // silu(gate) * up, silu(z) = z / (1 + e^-z) as torch computes it; rows over the threads from ~10
    // rows of 1,536 on (a chained prefill)
    parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
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
    });
    lap(kPhaseSilu);
    at::Tensor d = down(act, i8, next, buf.get(B::kDown, M, down.out_features(), opt));
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

// What goes around the layers when a step runs from token ids to logits (DecodeStack.forward_tokens):
// the token embedding (int8 rows with scales as kernels.dequant_q8 reads them, or fp32 / bf16 / fp16 rows), the final
// RMSNorm and the LM head — the kernels the modules call, so the logits equal the module path's.
struct DecodeEnds {
  at::Tensor embed;                        // int8, fp32, bf16 or fp16 [vocab, hidden]
  std::optional<at::Tensor> embed_scales;  // int8: fp32 [vocab] (group 0) or [vocab, groups]
  int64_t embed_group;
  at::Tensor norm;  // fp32 [hidden]
  double eps;
  DecodeLinear head;
  bool head_int8;  // int8 activations for the head when the step has them (the module's own choice)
};

// The decoder layers of one model, run in order: x [M, hidden] -> x after the last layer.
struct DecodeStack {
  std::vector<DecodeLayer> layers;
  std::optional<DecodeEnds> ends;  // set_ends: forward_tokens can run
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

  // How many of the layers' Linears `is` holds for (e.g. &DecodeLinear::int8_capable).
  int64_t count(bool (DecodeLinear::*is)() const) const {
    int64_t n = 0;
    for (const auto& l : layers)
      for (const DecodeLinear* d : {&l.qkv, &l.o, &l.gate_up, &l.down}) n += (d->*is)();
    return n;
  }

  void set_ends(at::Tensor embed, std::optional<at::Tensor> embed_scales, int64_t embed_group, at::Tensor norm,
                double eps, DecodeLinear head, bool head_int8) {
    const bool q8 = embed.scalar_type() == at::kChar;
    const at::ScalarType t = embed.scalar_type();
    const bool plain = t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
    TORCH_CHECK(embed.dim() == 2 && (q8 == embed_scales.has_value()) && (q8 || plain),
                "the embedding must be float32, bfloat16 or float16 [vocab, hidden], or int8 with its scales");
    TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.dim() == 1 && norm.size(0) == embed.size(1),
                "the final norm weight must be float32 [hidden]");
    ends = DecodeEnds{embed.contiguous(), std::move(embed_scales), embed_group, norm.contiguous(), eps, std::move(head),
                      head_int8};
  }

  // forward from token ids [M] int64 to logits [M, vocab]: the embedding rows, the layers, the final norm
  // and the head on int8 activations when int8_act (as the head module takes them after a fused step).
  at::Tensor forward_tokens(const at::Tensor& ids_, const at::Tensor& cos, const at::Tensor& sin,
                            const std::vector<at::Tensor>& k, const std::vector<at::Tensor>& v,
                            const std::vector<at::Tensor>& k_scale, const std::vector<at::Tensor>& v_scale,
                            const at::Tensor& slots, const at::Tensor& positions,
                            const std::optional<at::Tensor>& read_rows,
                            const std::optional<at::Tensor>& write_rows,
                            const std::optional<at::Tensor>& logit_rows) const {
    TORCH_CHECK(ends.has_value(), "this DecodeStack has no embedding / norm / head (set_ends)");
    const DecodeEnds& e = *ends;
    const at::Tensor ids = ids_.to(at::kLong).contiguous().view({-1});
    const int64_t vocab = e.embed.size(0);
    TORCH_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < vocab),
                "token ids outside the vocabulary (", vocab, ")");
    at::Tensor x = e.embed.index_select(0, ids);
    if (e.embed_scales) x = dequant_q8(x, e.embed_scales->index_select(0, ids), e.embed_group, false);
    if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);  // bf16 / fp16 rows: exact
    x = forward(x, cos, sin, k, v, k_scale, v_scale, slots, positions, read_rows, write_rows);
    if (logit_rows) {  // a prefill wants the logits of a few rows only (the head is the largest matmul)
      const at::Tensor r = logit_rows->to(at::kLong);
      TORCH_CHECK(r.numel() == 0 || (r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < x.size(0)),
                  "logit_rows outside the step's rows");
      x = x.index_select(0, r);
    }
    return e.head(rms_norm(x, e.norm, e.eps), int8_act && e.head_int8);
  }

  // x [M, hidden]; cos/sin [M, D]; k/v caches and (int8 storage) their scales, one per layer; slots and
  // positions [M] int64; paged pools: read_rows [M, KV, S] and write_rows [M, KV] int64 (StepRows).
  at::Tensor forward(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_,
                     const std::vector<at::Tensor>& k, const std::vector<at::Tensor>& v,
                     const std::vector<at::Tensor>& k_scale, const std::vector<at::Tensor>& v_scale,
                     const at::Tensor& slots_, const at::Tensor& positions_,
                     const std::optional<at::Tensor>& read_rows, const std::optional<at::Tensor>& write_rows) const {
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
    StepRows rows{slots.data_ptr<int64_t>(), pos.data_ptr<int64_t>()};
    const bool paged = read_rows.has_value();
    at::Tensor read, write;  // paged: checked once against the pools' row count
    if (paged && !layers.empty()) {
      TORCH_CHECK(write_rows.has_value(), "paged KV rows need both read_rows and write_rows");
      const int64_t KV = layers[0].n_kv_heads;
      read = read_rows->to(at::kLong).contiguous(), write = write_rows->to(at::kLong).contiguous();
      TORCH_CHECK(read.dim() == 3 && read.size(0) == M && read.size(1) == KV && write.numel() == M * KV,
                  "read_rows must be [M, n_kv_heads, S] and write_rows [M, n_kv_heads]");
      const int64_t pool_rows = k[0].numel() / D, S = read.size(2);
      for (int64_t m = 0; m < M; ++m) TORCH_CHECK(rows.pos[m] < S, "a row's position is past read_rows' keys");
      TORCH_CHECK(read.numel() == 0 || (read.min().item<int64_t>() >= 0 && read.max().item<int64_t>() < pool_rows &&
                                        write.min().item<int64_t>() >= 0 && write.max().item<int64_t>() < pool_rows),
                  "KV rows outside the pool");
      rows.read = read.data_ptr<int64_t>(), rows.write = write.data_ptr<int64_t>(), rows.S = S;
    }
    const KeyGroups groups(rows, M, layers.empty() ? 0 : layers[0].n_kv_heads);
    at::Tensor x = x_.clone();
    for (size_t i = 0; i < layers.size(); ++i) {
      const at::Tensor& kc = k[i];
      TORCH_CHECK(kc.is_contiguous() && v[i].is_contiguous() && kc.dim() == 4 && kc.size(1) == layers[i].n_kv_heads &&
                      kc.size(3) == layers[i].head_dim && (!paged || kc.sizes() == k[0].sizes()),
                  "KV cache must be contiguous [slots, n_kv_heads, max_seq, head_dim] (paged: equal pools)");
      TORCH_CHECK(q8 ? kc.scalar_type() == at::kChar : kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kHalf,
                  "KV cache must be float32, float16 or int8 with scales");
      TORCH_CHECK(v[i].scalar_type() == kc.scalar_type() && v[i].sizes() == kc.sizes(), "K and V caches must match");
      for (int64_t m = 0; !paged && m < M; ++m)
        TORCH_CHECK(rows.slots[m] < kc.size(0) && rows.pos[m] < kc.size(2), "slot or position outside the KV cache");
    }
    StepBuffers buf;
    const auto run_layers = [&] {
      for (size_t i = 0; i < layers.size(); ++i) {
        const at::Tensor none;
        layers[i].forward(x, cos.data_ptr<float>(), sin.data_ptr<float>(), k[i], v[i], q8 ? k_scale[i] : none,
                          q8 ? v_scale[i] : none, rows, groups, int8_act,
                          i + 1 < layers.size() ? &layers[i + 1].qkv : ends ? &ends->head : nullptr, buf,
                          profile.size() == kPhases ? profile.data() : nullptr);
      }
    };
    // Rows one GEMV pass takes (a decode step, a verify): one parallel region for all the layers (team.h).
    // More (a chained prefill): the GEMMs' own regions, each piece big enough to pay for its fork.
    if (M <= kGemvPassRows)
      Team::run(run_layers);
    else
      run_layers();
    return x;
  }
};

// What team.h's parallel_for hands out, for tests: (thread, begin, end) of each piece of [0, n) with
// `grain`, run `times` times inside one Team::run (team: true) or by at::parallel_for; a piece starting
// at throw_at throws (-1: none).
std::vector<std::tuple<int64_t, int64_t, int64_t>> team_pieces(int64_t n, int64_t grain, int64_t times, bool team,
                                                               int64_t throw_at) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> got(times * std::max<int64_t>(n, 1));
  std::atomic<int64_t> count{0};
  const auto pieces = [&] {
    for (int64_t r = 0; r < times; ++r)
      parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        TORCH_CHECK(b != throw_at, "piece at ", b, " failed");
        got[count.fetch_add(1)] = {at::get_thread_num(), b, e};
      });
  };
  if (team)
    Team::run(pieces);
  else
    pieces();
  got.resize(count.load());
  return got;
}

void bind_decode(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("team_pieces", &team_pieces, "(thread, begin, end) of parallel_for's pieces, in a Team or not (tests)",
        py::arg("n"), py::arg("grain"), py::arg("times"), py::arg("team"), py::arg("throw_at") = -1,
        py::call_guard<py::gil_scoped_release>());
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
      .def("gemm_linears", [](const DecodeStack& s) { return s.count(&DecodeLinear::gemm_capable); },
           "how many Linears take a GEMM past 16 rows on int8 activations (all 4 per layer: long chains pay)")
      .def("int8_linears", [](const DecodeStack& s) { return s.count(&DecodeLinear::int8_capable); },
           "how many Linears the int8-activation kernels can run")
      .def("set_ends", &DecodeStack::set_ends, py::arg("embed"), py::arg("embed_scales"), py::arg("embed_group"),
           py::arg("norm"), py::arg("eps"), py::arg("head"), py::arg("head_int8"))
      .def_property_readonly("has_ends", [](const DecodeStack& s) { return s.ends.has_value(); })
      .def("forward_tokens", &DecodeStack::forward_tokens, py::arg("ids"), py::arg("cos"), py::arg("sin"),
           py::arg("k"), py::arg("v"), py::arg("k_scale"), py::arg("v_scale"), py::arg("slots"),
           py::arg("positions"), py::arg("read_rows") = py::none(), py::arg("write_rows") = py::none(),
           py::arg("logit_rows") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("forward", &DecodeStack::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("k"),
           py::arg("v"), py::arg("k_scale"), py::arg("v_scale"), py::arg("slots"), py::arg("positions"),
           py::arg("read_rows") = py::none(), py::arg("write_rows") = py::none(),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
