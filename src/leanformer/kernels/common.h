// Shared helpers of the leanformer GEMV kernels (gemv.cpp: fp32/int8 + bindings, gemv_q4.cpp: int4).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "avx512.h"  // LF_UNROLL, LF_PREFETCH, KernelArgs
#include "team.h"    // parallel_for: the fused step's team, or torch's pool

namespace leanformer {

constexpr int kMaxRows = 8;                 // activation rows handled in one pass over W
constexpr int64_t kMinTaskBytes = 48 << 10;  // below this much weight per task, threading costs more

constexpr int64_t kPrefetchBytes = LF_PREFETCH;

// Prefetches the bytes [p + kPrefetchBytes, + step) of a weight row, one request per cache line;
// call once per `step`-byte inner iteration (step < 64 issues one request every 64 bytes).
template <int step>
inline void prefetch_ahead(const void* row, int64_t byte_offset) {
  if (kPrefetchBytes <= 0) return;
  const char* p = static_cast<const char*>(row) + byte_offset + kPrefetchBytes;
  if constexpr (step < 64) {
    if (byte_offset % 64 == 0) _mm_prefetch(p, _MM_HINT_T0);
  } else {
    for (int off = 0; off < step; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Independent accumulator chains per activation row: with M rows there are M*unroll<M>() FMA chains,
// enough to cover FMA latency (4-5 cycles x 2 ports) while the registers still hold W and x.
template <int M>
constexpr int unroll() {
  return M <= 2 ? 4 : (M <= 4 ? 2 : 1);
}

// Runs fn(n0, n1) over blocks of weight rows covering [0, N) on torch's thread pool (or the fused step's
// team, team.h), each thread taking
// one contiguous block. Rows are processed one (or, on AVX-512, two) at a time on purpose: W is then
// read as one or two sequential streams per thread, which the hardware prefetcher follows at full
// speed (interleaving 4 rows measured ~25% slower on the 113 MB lm_head). The grain keeps each task at
// >= kMinTaskBytes of weights, so tiny matrices stay on the calling thread with no fork/join cost.
template <class Fn>
void for_row_blocks(int64_t N, int64_t row_bytes, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, row_bytes));
  parallel_for(0, N, grain, fn);
}

template <class Fn>
void for_rows(int64_t N, int64_t row_bytes, const Fn& fn) {
  for_row_blocks(N, row_bytes, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) fn(n);
  });
}

// Whether calls take the AVX-512 kernels (gemv_avx512.cpp): the CPU has them and set_isa allows it.
bool use_avx512();

// ------------------------------------------------------------------------------- dispatch & checks

// Calls fn(std::integral_constant<int, M>) with M = rows (1..8) as a compile-time constant.
template <class Fn>
void dispatch_rows(int64_t rows, const Fn& fn) {
  switch (rows) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 6: return fn(std::integral_constant<int, 6>());
    case 7: return fn(std::integral_constant<int, 7>());
    default: return fn(std::integral_constant<int, 8>());
  }
}

inline void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat,
              "x must be a 2-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
}

inline const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t N, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "bias must be float32 [N]");
  holder = bias->contiguous();
  return holder.data_ptr<float>();
}

// y [M, N] fp32: *out when the caller passes a tensor of that shape (the fused step's buffers, reused
// from layer to layer: decode.cpp StepBuffers), else a new one.
inline at::Tensor output(const at::Tensor* out, int64_t M, int64_t N, const at::TensorOptions& options) {
  if (out && out->defined() && out->dim() == 2 && out->size(0) == M && out->size(1) == N &&
      out->scalar_type() == at::kFloat && out->is_contiguous())
    return *out;
  return at::empty({M, N}, options);
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
at::Tensor linear_f16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, int64_t group_size);
// int4: scales/zeros fp32 [N, G], or uint8 codes [N, G] with lut fp32 [512] (q4_codes.h)
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                     int64_t group_size, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& lut = std::nullopt);
at::Tensor dequant_q4(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t group_size,
                      int64_t K, bool bf16, const std::optional<at::Tensor>& lut = std::nullopt);
at::Tensor dequant_q8(const at::Tensor& w, const at::Tensor& scales, int64_t group_size, bool bf16);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor* out = nullptr);
// int8-activation kernels (gemv_i8.cpp); next: the weights the caller runs next (int8_act.h I8Next)
struct I8Next;
at::Tensor linear_q4_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t group_size,
                        const std::optional<at::Tensor>& bias,  // zeros null: symmetric (code - 8) * scale
                        const std::optional<at::Tensor>& lut = std::nullopt, const I8Next* next = nullptr,
                        const at::Tensor* out = nullptr,  // out: see output()
                        bool half_scales = false);  // the fp16 copy of the scales, as DecodeLinear holds it
at::Tensor linear_q8_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias, int64_t group_size, const I8Next* next = nullptr,
                        const at::Tensor* out = nullptr, bool half_scales = false);
// An int8 Linear's operands for the int8-activation GEMV, checked once (as Q4I8, q4_codes.h): the fused
// step keeps one per Linear (decode_linear.h).
struct Q8I8 {
  at::Tensor w_hold, s_hold, bias_hold;  // the contiguous tensors the pointers point into
  const int8_t* w;                        // [N, K]
  const float* s;                         // [N] (group 0) or [N, ceil(K / group)]; null: held as fp16 (h)
  const float* bias;                      // [N] or null
  int64_t N, K, group;
  at::Tensor h_hold;
  // group 32: the scales as fp16 [N, K / 32], passed so (an Int8Linear holds GGUF Q8_0's fp16 block
  // scales so: compress/int8.py compact_scales; every ISA's loops read them), or the exact copy of fp32
  // ones (add_half)
  const uint16_t* h = nullptr;

  // Makes `h` when every scale is an fp16 value (a GGUF's Q8_0 blocks: fp16 scales), for the 512-bit
  // span loop: 2 bytes per 32 weights instead of 4 (an int8 row then streams 34 bytes per 32 weights, as
  // the GGUF block does, not 36). Results unchanged: fp16 -> fp32 is exact. Returns whether there is an
  // `h` (made here, or the scales were passed as fp16).
  bool add_half();  // gemv_i8.cpp (q4_codes.h exact_half_copy)
};
Q8I8 q8_i8_operands(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                    int64_t group_size);
// x [M, K] fp32 -> y [M, N]; half_scales: op.h may stand for the scales (false once they changed)
void q8_i8(const Q8I8& op, const float* x, int64_t M, float* y, const I8Next* next, bool half_scales = true);
// int4 for many rows (prefill): activation rows in the vector lanes (gemm_q4_i8.cpp)
at::Tensor gemm_q4_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, int64_t group, const std::optional<at::Tensor>& bias);
at::Tensor gemm_q8_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t group,
                      const std::optional<at::Tensor>& bias);  // int8 weights, AVX-VNNI / AVX-512 VNNI only
// int5 codes (GGUF Q5_0, compress/int5.py): int8-activation GEMV and dequantization to fp32 [R, Kp]
at::Tensor linear_q5_i8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& high, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias);
at::Tensor dequant_q5(const at::Tensor& w, const at::Tensor& high, const at::Tensor& scales);

}  // namespace leanformer
