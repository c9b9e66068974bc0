// One Linear of the fused decode step (decode.cpp): its operands as the module holds them, and the GEMV
// kernel call that applies them (fp32 activations, or int8 per block of 32 where the weights allow).
#pragma once

#include <ATen/ops/constant_pad_nd.h>

#include <optional>
#include <string>
#include <utility>

#include "common.h"
#include "int8_act.h"  // I8Next
#include "q4_codes.h"  // Q4I8, q4_i8

namespace leanformer {

// Rows one int8-activation GEMV call reads the weights once for (gemv_i8.cpp kI8Rows).
constexpr int64_t kGemvPassRows = 16;

// One Linear's operands, as the module holds them (see models/fused.py for who provides what).
struct DecodeLinear {
  enum class Kind { f32, bf16, f16, q8, q4, q5 };
  Kind kind;  // "f32": w fp32 [N, K]; "bf16" / "f16": w bf16 / fp16 [N, K] (fp32 activations and math);
              // "q8": w int8 [N, K] + scales; "q4": w uint8 [N, Kp/2] + scales/zeros (zeros none: symmetric);
              // "q5": w uint8 [N, Kp/2] nibbles + scales [N, Kp/32], `zeros` the int32 high bits [N, Kp/32]
  at::Tensor w;
  std::optional<at::Tensor> scales, zeros, bias, input_scale;
  std::optional<at::Tensor> lut;  // q4 with uint8 scale/zero codes: their fp32 table [512] (q4_codes.h)
  int64_t group = 0;     // q8: 0 (per row) or columns per scale; q4: group size
  int64_t k_padded = 0;  // q4: the codes' column count (input zero-padded up to it)
  bool zeros_all_zero = false;  // q4: every zero point 0 when built (see q4_zeros)
  int64_t zeros_version = -1;   // the zeros' version counter then (-1: an inference tensor, which has none)
  c10::VariableVersion zeros_counter{c10::VariableVersion::DISABLED};  // that counter, read without the tensor
  int64_t scales_version = -1;  // the same for the scales (their fp16 copies stand for them while unchanged)
  c10::VariableVersion scales_counter{c10::VariableVersion::DISABLED};
  std::optional<Q4I8> q4_i8_op;  // int8-capable q4 / q8: the GEMV's operands, checked once
  std::optional<Q8I8> q8_i8_op;
  int64_t n_out = 0;

  DecodeLinear(std::string kind_, at::Tensor w_, std::optional<at::Tensor> scales_, std::optional<at::Tensor> zeros_,
               std::optional<at::Tensor> bias_, std::optional<at::Tensor> input_scale_, int64_t group_,
               int64_t k_padded_, std::optional<at::Tensor> lut_)
      : kind(parse(kind_)), w(std::move(w_)), scales(std::move(scales_)), zeros(std::move(zeros_)),
        bias(std::move(bias_)), input_scale(std::move(input_scale_)), lut(std::move(lut_)), group(group_),
        k_padded(k_padded_) {
    TORCH_CHECK(dense() || scales.has_value(), "quantized DecodeLinear needs scales");
    n_out = w.size(0);
    TORCH_CHECK(kind != Kind::q5 || (zeros.has_value() && group == 32), "q5 DecodeLinear needs high bits, group 32");
    if (scales.has_value() && !scales->is_inference()) {
      scales_version = scales->_version();
      scales_counter = scales->unsafeGetTensorImpl()->version_counter();
    }
    if (kind == Kind::q4) {
      // none (a symmetric Int4Linear, GGUF Q4_0): all zero for good; codes 0 are not zero points
      zeros_all_zero = !zeros.has_value() || (!lut.has_value() && !zeros->any().item<bool>());
      zeros_version = !zeros.has_value() || zeros->is_inference() ? -1 : zeros->_version();
      if (zeros_version >= 0) zeros_counter = zeros->unsafeGetTensorImpl()->version_counter();
      if (int8_capable()) q4_i8_op = q4_i8_operands(w, *scales, zeros, group, bias, lut);
      // an fp16 copy of GGUF-born scales (and zero points) for the group-32 loops (Q4Scales::add_half)
      if (q4_i8_op && group == 32) q4_i8_op->qs.add_half();
    }
    if (kind == Kind::q8 && int8_capable()) {
      q8_i8_op = q8_i8_operands(w, *scales, bias, group);
      if (act_isa_id() == kAvx512Vnni) q8_i8_op->add_half();  // the span loop's fp16 copy (Q8I8::add_half)
    }
    stream_ = make_stream();
  }

  // The zero points for the int8-activation int4 kernel: none when they are all zero (GGUF Q4_0's
  // symmetric blocks), which saves reading 4 of every 20 bytes per 32 weights. Checked once here; an
  // in-place write to the zeros since then (version counter) brings them back.
  std::optional<at::Tensor> q4_zeros() const { return skip_zeros() ? std::nullopt : zeros; }
  bool skip_zeros() const { return zeros_all_zero && zeros_unchanged(); }
  // whether the zeros are as built (then their fp16 copy, Q4Scales::hz, is theirs); an inference tensor
  // has no version counter and is taken as unchanged
  bool zeros_unchanged() const { return zeros_version < 0 || zeros_counter.current_version() == zeros_version; }
  bool scales_unchanged() const { return scales_version < 0 || scales_counter.current_version() == scales_version; }

  static Kind parse(const std::string& name) {
    if (name == "f32") return Kind::f32;
    if (name == "bf16") return Kind::bf16;
    if (name == "f16") return Kind::f16;
    if (name == "q8") return Kind::q8;
    if (name == "q5") return Kind::q5;
    TORCH_CHECK(name == "q4", "DecodeLinear kind must be f32, bf16, f16, q8, q4 or q5, got '", name, "'");
    return Kind::q4;
  }

  int64_t out_features() const { return n_out; }
  bool dense() const { return kind == Kind::f32 || kind == Kind::bf16 || kind == Kind::f16; }  // float weights  // held here: the weight tensor is cold during a step

  // Whether the int8-activation kernels (gemv_i8.cpp) can run this Linear: integer weights whose
  // scale groups are whole 32-column activation blocks.
  bool int8_capable() const {
    if (kind == Kind::q8) return group % 32 == 0 || group == 16;  // 16: GGUF Q6_K
    if (kind == Kind::q5) return true;
    return kind == Kind::q4 && group % 32 == 0 && k_padded % group == 0;
  }

  // Whether past 16 rows this Linear takes a GEMM (gemm_q4_i8.cpp) on int8 activations: int4 (8-bit
  // scale codes decoded for the call: coded_scales); int8 with groups of 32 or one scale per row, on
  // AVX-VNNI / AVX-512 VNNI.
  bool q8_gemm_capable() const {
    return kind == Kind::q8 && act_isa_id() != kAvx2 && w.size(1) % 32 == 0 && (group == 0 || group % 32 == 0) &&
           (group == 0 || w.size(1) % group == 0);
  }
  bool gemm_capable() const {
    return (kind == Kind::q4 && int8_capable() && (!lut.has_value() || q4_i8_op)) || q8_gemm_capable();
  }

  // 8-bit scale / zero codes decoded to the fp32 [N, G] pair the GEMM reads (the values every other path
  // decodes: Q4Scales::decode), made per call: 8 bytes per group, next to the GEMM's work on 16+ rows.
  std::pair<at::Tensor, at::Tensor> coded_scales() const {
    const Q4Scales& qs = q4_i8_op->qs;
    at::Tensor s = at::empty({n_out, qs.G}, at::kFloat), z = at::empty({n_out, qs.G}, at::kFloat);
    qs.decode(0, n_out, s.data_ptr<float>(), z.data_ptr<float>());
    return {s, z};
  }

  // The weight streams the int8-activation kernels read, for the call before this one to start (I8Next):
  // found once (the tensors are held here; reading their pointers per call measured ~0.4 us).
  const I8Next& stream() const { return stream_; }

 private:
  I8Next stream_;
  I8Next make_stream() const {
    if (kind != Kind::q4 && kind != Kind::q8) return {};
    const bool grouped = kind == Kind::q4 ? !lut.has_value() : group > 0;  // fp32 scales per group
    // the fp16 copy the 512-bit loops read
    const uint16_t* h = kind == Kind::q4 ? (q4_i8_op ? q4_i8_op->qs.h : nullptr) : (q8_i8_op ? q8_i8_op->h : nullptr);
    const bool half = h != nullptr;
    const char* s = half ? reinterpret_cast<const char*>(h) : grouped ? static_cast<const char*>(scales->data_ptr()) : nullptr;
    return {static_cast<const char*>(w.data_ptr()), w.size(0), w.size(1) * w.element_size(), s,
            grouped ? scales->size(1) * (half ? 2 : 4) : 0};
  }

 public:
  // x [M, K] fp32 contiguous -> [M, N]; int8_act: quantize x per block of 32 and use integer dot products;
  // next: the Linear the caller runs after this one (its weights requested ahead), or null; out: where
  // the int8-activation GEMVs write when it is [M, N] (common.h output())
  at::Tensor operator()(at::Tensor x, bool int8_act = false, const DecodeLinear* next = nullptr,
                        const at::Tensor* out = nullptr) const {
    const I8Next nx = next && int8_act ? next->stream() : I8Next{};
    const I8Next* np = nx.w ? &nx : nullptr;
    if (input_scale.has_value()) x = x.mul(*input_scale);
    if (kind == Kind::f32) return linear_f32(x, w, bias);
    if (kind == Kind::bf16) return linear_bf16(x, w, bias);
    if (kind == Kind::f16) return linear_f16(x, w, bias);
    const bool i8 = int8_act && int8_capable();
    if (kind == Kind::q8 && i8 && x.size(0) > kGemvPassRows && q8_gemm_capable())
      return gemm_q8_i8(x, w, *scales, group, bias);  // a chained prefill: the GEMM (VNNI)
    const bool plain = x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous();
    if (kind == Kind::q8 && i8 && q8_i8_op && plain && x.size(1) == q8_i8_op->K) {  // the operands checked once
      at::Tensor y = output(out, x.size(0), out_features(), x.options());
      q8_i8(*q8_i8_op, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), np, scales_unchanged());
      return y;
    }
    if (kind == Kind::q8)
      return i8 ? linear_q8_i8(x, w, *scales, bias, group, np, out) : linear_q8(x, w, *scales, bias, group);
    if (kind == Kind::q5) {  // fp32 activations: no fp32 GEMV for int5, so the dequantized weight (exact)
      if (i8) return linear_q5_i8(x, w, *zeros, *scales, bias);
      if (k_padded > x.size(1)) x = at::constant_pad_nd(x, {0, k_padded - x.size(1)});
      return linear_f32(x, dequant_q5(w, *zeros, *scales), bias);
    }
    // more rows than one GEMV pass takes (a chained prefill, engine/prefill.py): the GEMM, weights read once
    if (i8 && x.size(0) > kGemvPassRows && !lut.has_value()) return gemm_q4_i8(x, w, *scales, q4_zeros(), group, bias);
    if (i8 && x.size(0) > kGemvPassRows && q4_i8_op) {
      const auto [s, z] = coded_scales();
      return gemm_q4_i8(x, w, s, z, group, bias);
    }
    if (i8 && q4_i8_op && plain) {  // the operands checked once
      at::Tensor y = output(out, x.size(0), out_features(), x.options());
      q4_i8(*q4_i8_op, x.data_ptr<float>(), x.size(0), x.size(1), y.data_ptr<float>(), np, !skip_zeros(),
            scales_unchanged(), zeros_unchanged());
      return y;
    }
    if (i8) return linear_q4_i8(x, w, *scales, q4_zeros(), group, bias, lut, np, out);  // pads x to k_padded itself
    if (k_padded > x.size(1)) x = at::constant_pad_nd(x, {0, k_padded - x.size(1)});
    return linear_q4(x, w, *scales, zeros, group, bias, lut);
  }
};

}  // namespace leanformer
