// int4 group scales / zeros as the int4 kernels receive them: fp32 or fp16 arrays [N, G] (each; fp16: an
// Int4Linear's GGUF block scales, compress/int4.py compact_scales, read as they are by the group-32
// int8-activation loops and decoded per chunk of rows like the codes elsewhere), or 8-bit codes [N, G]
// with a 512-entry fp32 lookup table (compress/double_quant.py, "dq8": scale = lut[sc], zero =
// lut[256 + zc] * scale).
//
// Why codes: fp32 scales + zeros cost 8 bytes per group, i.e. 2 bits per weight at group 32, on top of
// the 4.5 bits the model file holds; decoding them once at load made an int4-g32-dq8 model take 1.55x
// its weights in RAM. The kernels instead decode a chunk of rows' scales into a small buffer (<= 4 KB,
// L1-resident) right before those rows run, so every inner loop stays as it is and reads exactly the
// fp32 values the decoded arrays held (the table is built by the same torch expression; zero = offset *
// scale is one fp32 multiply), i.e. results are bit-identical to the fp32-array path. (The int8-
// activation GEMV instead looks the codes up inside its loops for rows of >= 32 groups: gemv_i8.cpp.)
//
// AVX2 side only (includes ATen): the AVX-512 / VNNI translation units receive plain pointers to the
// decoded chunk through their Args structs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace leanformer {

// An fp16 copy of fp32 `t` into `hold` when fp16 holds every value exactly (a GGUF's block scales and
// mins), else null: the loops then stream 2 bytes per value instead of 4, with the same results.
inline const uint16_t* exact_half_copy(const at::Tensor& t, at::Tensor& hold) {
  at::Tensor half = t.to(at::kHalf);
  if (!half.to(at::kFloat).equal(t)) return nullptr;
  hold = half.contiguous();
  return static_cast<const uint16_t*>(hold.data_ptr());
}

struct Q4Scales {
  const float* s = nullptr;  // fp32 [N, G] (null when coded or held as fp16: h)
  const float* z = nullptr;  // fp32 [N, G]; null: symmetric codes (no zero point), coded, or held as fp16 (hz)
  const uint8_t* sc = nullptr;  // coded: scale codes [N, G]
  const uint8_t* zc = nullptr;  // coded: zero codes [N, G]
  const float* lut = nullptr;   // coded: [512] scale per code, then zero offset (in scale units) per code
  // the scales as fp16 [N, G]: the tensor passed (an Int4Linear holds a GGUF's fp16 block scales so,
  // compress/int4.py compact_scales), or an exact copy of fp32 ones (add_half)
  const uint16_t* h = nullptr;
  const uint16_t* hz = nullptr;  // the same for zero points (a GGUF Q4_1's mins where fp16 holds min + 8 d)
  int64_t G = 0;
  at::Tensor hold[5];  // contiguous copies the pointers point into

  bool coded() const { return sc != nullptr; }
  bool has_zeros() const { return z || hz || zc; }
  // Whether every scale / zero point present is an fp32 array (else chunks() decodes rows first).
  bool direct() const { return !coded() && s && (z || !hz); }

  // Makes `h` when every fp32 scale is an fp16 value (a GGUF's blocks: fp16 scales), for the 512-bit
  // group-32 loops: a SmolLM2 token then streams 6.6 MB less of the blocks' 66 MB; and `hz` likewise
  // for zero points (a GGUF Q4_1's fp16 mins: 22 bytes per 32 weights streamed, not 24, as the file
  // holds them). Results unchanged: fp16 -> fp32 is exact. Returns whether there is an `h` (made here,
  // or the scales were passed as fp16).
  bool add_half() {
    if (coded() || (!h && !(h = exact_half_copy(hold[0], hold[3])))) return false;
    if (z && !hz) hz = exact_half_copy(hold[1], hold[4]);
    return true;
  }

  // Validates and wraps scales / zeros [N, G]: each fp32 or fp16 (zeros optional when
  // `zeros_optional`), or both uint8 codes with lut fp32 [512].
  Q4Scales(const at::Tensor& scales, const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& lut_,
           int64_t N, int64_t G_, bool zeros_optional)
      : G(G_) {
    const bool has_z = zeros.has_value() && zeros->defined();
    TORCH_CHECK(has_z || zeros_optional, "int4 kernels need zeros");
    const bool is_coded = scales.scalar_type() == at::kByte;
    for (const at::Tensor* t : {&scales, has_z ? &*zeros : &scales}) {
      const auto dt = t->scalar_type();
      TORCH_CHECK(t->device().is_cpu() && (is_coded ? dt == at::kByte : dt == at::kFloat || dt == at::kHalf) &&
                      t->dim() == 2 && t->size(0) == N && t->size(1) == G,
                  "int4 scales/zeros must be float32 or float16 (each), or both uint8 codes, shaped [N, n_groups] = [",
                  N, ", ", G, "], got ", t->scalar_type(), " ", t->sizes());
    }
    hold[0] = scales.contiguous();
    if (has_z) hold[1] = zeros->contiguous();
    if (!is_coded) {
      TORCH_CHECK(!(lut_.has_value() && lut_->defined()), "a lut goes with uint8 scale codes only");
      const auto as_half = [](const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); };
      if (hold[0].scalar_type() == at::kHalf) h = as_half(hold[0]); else s = hold[0].data_ptr<float>();
      if (has_z) {
        if (hold[1].scalar_type() == at::kHalf) hz = as_half(hold[1]); else z = hold[1].data_ptr<float>();
      }
      return;
    }
    TORCH_CHECK(has_z, "uint8 scale codes need uint8 zero codes");
    TORCH_CHECK(lut_.has_value() && lut_->defined() && lut_->device().is_cpu() && lut_->scalar_type() == at::kFloat &&
                    lut_->numel() == 512,
                "uint8 scale codes need lut float32 [512] (256 scales, then 256 zero offsets)");
    hold[2] = lut_->contiguous();
    sc = hold[0].data_ptr<uint8_t>();
    zc = hold[1].data_ptr<uint8_t>();
    lut = hold[2].data_ptr<float>();
  }

  // Rows [r0, r1) decoded into s_out / z_out [r1 - r0, G] (z_out untouched without zero points).
  void decode(int64_t r0, int64_t r1, float* __restrict s_out, float* __restrict z_out) const {
    const int64_t i0 = r0 * G, n = (r1 - r0) * G;
    if (!coded()) {  // fp32 or fp16 arrays: copied / widened (exact)
      const auto take = [&](const float* f, const uint16_t* h16, float* out) {
        if (f) return std::copy(f + i0, f + i0 + n, out), void();
        const auto* hv = reinterpret_cast<const at::Half*>(h16 + i0);
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(hv[i]);
      };
      take(s, h, s_out);
      if (z || hz) take(z, hz, z_out);
      return;
    }
    const uint8_t* a = sc + i0;
    const uint8_t* b = zc + i0;
    const float* off = lut + 256;
    for (int64_t i = 0; i < n; ++i) {
      const float v = lut[a[i]];
      s_out[i] = v;
      z_out[i] = off[b[i]] * v;  // one fp32 multiply, as torch's (zlo + zc * zspan / 255) * scale
    }
  }

  // Runs fn(c0, c1, s, z) over rows [n0, n1) in consecutive chunks [c0, c1), with s / z pointing at
  // row c0's G scales / zeros (row c0 + i at + i * G; z null when there are none). fp32 arrays: one
  // chunk pointing into them; codes or fp16 arrays: chunks of <= 512 scales decoded into a buffer.
  template <class Fn>
  void chunks(int64_t n0, int64_t n1, const Fn& fn) const {
    if (direct()) return fn(n0, n1, s + n0 * G, z ? z + n0 * G : nullptr);
    constexpr int64_t kFloats = 1024;  // 4 KB: scales then zeros of the chunk, kept in L1 beside the weights
    const int64_t rows = std::max<int64_t>(1, kFloats / (2 * G));
    float stack[kFloats];
    std::vector<float> heap;
    float* buf = stack;
    if (2 * rows * G > kFloats) heap.resize(2 * rows * G), buf = heap.data();  // G > 512: one row
    const bool zeros = has_zeros();
    for (int64_t c0 = n0; c0 < n1; c0 += rows) {
      const int64_t c1 = std::min(n1, c0 + rows);
      decode(c0, c1, buf, buf + rows * G);
      fn(c0, c1, static_cast<const float*>(buf), zeros ? static_cast<const float*>(buf + rows * G) : nullptr);
    }
  }
};

// An int4 Linear's operands for the int8-activation GEMV (gemv_i8.cpp q4_i8), checked once: the fused
// step keeps one per Linear (decode_linear.h). Read from their tensors on every call they cost ~1 us of
// cache misses (TensorImpl, then storage, then data, one after another): a token streams every weight
// through the caches, evicting the metadata before the next token needs it.
struct Q4I8 {
  Q4Scales qs;
  at::Tensor w_hold, bias_hold;  // the contiguous tensors w / bias point into
  const uint8_t* w;              // [N, Kp / 2] nibbles
  const float* bias;             // [N] or null
  int64_t N, Kp, G, group;
};

struct I8Next;
Q4I8 q4_i8_operands(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                    int64_t group_size, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lut);
// x [M, K] fp32 (K <= Kp; zero-padded) -> y [M, N]; zeros false: no zero points read (all zero, GGUF Q4_0)
// zeros: read the zero points; half_scales / half_zeros: the fp16 copies (Q4Scales::h / hz) may stand
// for them (false once the scales / zeros changed since they were made)
void q4_i8(const Q4I8& op, const float* x, int64_t M, int64_t K, float* y, const I8Next* next, bool zeros,
           bool half_scales = true, bool half_zeros = true);

}  // namespace leanformer
