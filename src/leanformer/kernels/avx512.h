// Interface between the AVX2 translation units and gemv_avx512.cpp (AVX-512 kernels).
//
// Why this header holds only plain structs and declarations: gemv_avx512.cpp is compiled for AVX-512.
// Any inline function or template it shared with the AVX2 files (ATen, <algorithm>, common.h) would be
// emitted by both as a weak symbol, and the linker may keep the AVX-512 copy for everyone, which then
// crashes AVX2-only CPUs. So that file includes nothing but this, <cstdint> and <immintrin.h>, and
// the AVX2 side does the threading (at::parallel_for) and calls these per block of rows.
#pragma once

#include <cstdint>

// Software prefetch distance along the weight stream: on top of the hardware prefetcher it measured
// ~10-25% faster on AVX2 (int8 at M = 1, fp32 at M = 8) and neutral elsewhere. -DLF_PREFETCH=0 disables.
#ifndef LF_PREFETCH
#define LF_PREFETCH 2048
#endif

// Fully unroll the short loops over activation rows / accumulators: GCC keeps vector arrays in
// registers only when every index is a compile-time constant after unrolling (otherwise it spills
// the accumulators to the stack on every FMA: measured 2.5x slower at M = 8).
#define LF_UNROLL _Pragma("GCC unroll 16")

namespace leanformer {

// 16-bit float weights, as their bit patterns (tags for the kernels' overloads): bfloat16 and IEEE half.
struct Bf16 {
  uint16_t bits;
};
struct Fp16 {
  uint16_t bits;
};

// One call's operands, at most kMaxRows (8) activation rows.
struct KernelArgs {
  const float* x;       // [M, K] fp32; q4: the even columns [M, Kh]
  const float* xo;      // q4 only: the odd columns [M, Kh] (0 past K)
  const void* w;        // f32 [N, K] float, bf16 / fp16 [N, K] Bf16 / Fp16, q8 [N, K] int8, q4 [N, Kh] packed nibbles
  const float* scales;  // q8: [N] (group 0) or [N, n_groups]; q4: [N, n_groups]; f32: unused
  const float* zeros;   // q4 only: [N, n_groups], or null (symmetric: no zero points)
  const float* bias;    // [N] or null
  float* y;             // [M, N]
  int64_t M, N;
  int64_t K;      // columns; q4: bytes per weight row (Kh = ceil(K/2))
  int64_t group;  // q8: columns per scale (0: one scale per row); q4: bytes per group (group_size / 2)
};

namespace avx512 {
// y[:, n] for the weight rows n in [n0, n1). Only call when cpu_has_avx512() (gemv.cpp) is true.
void f32_rows(const KernelArgs& a, int64_t n0, int64_t n1);
void bf16_rows(const KernelArgs& a, int64_t n0, int64_t n1);  // w: bf16 [N, K] (Bf16)
void f16_rows(const KernelArgs& a, int64_t n0, int64_t n1);   // w: fp16 [N, K] (Fp16)
void q8_rows(const KernelArgs& a, int64_t n0, int64_t n1);
void q4_rows(const KernelArgs& a, int64_t n0, int64_t n1);
}  // namespace avx512

}  // namespace leanformer
