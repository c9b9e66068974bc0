// Interface between attention_h16.cpp (bindings, checks, threading: AVX2) and attention_h16_avx512fp16.cpp
// (the AVX512-FP16 loops). Plain declarations only: see avx512.h for why no inline code is shared.
//
// Encoder self-attention on the fp16 output of the fused q/k/v matmul (kernels/h16.py, models/bert.py):
// S = Q K^T and the softmax in fp16 arithmetic (the row sum in fp32), then P V with the products summed in
// fp16 along chains of kH16Chain pairs of keys (gemm_h16.h), each chain added into fp32; the output,
// divided by the row's sum, in fp16 for the output projection (or fp32).
#pragma once

#include <cstdint>

namespace leanformer {

struct H16AttnArgs {
  const uint16_t* qkv;  // fp16 [B * T, ld]: head h's q at column h * D, its k at (H + h) * D, v at (2H + h) * D
  int64_t ld;
  const uint8_t* mask;  // [B, T] key mask, nonzero = attend; null = every key
  int64_t B, H, T, D;   // D a multiple of 16
  float scale;
  uint16_t* out16;  // [B * T, ldo] fp16, head h at columns [h * D, (h + 1) * D); or null, then out32
  float* out32;
  int64_t ldo;
};

// Bytes of scratch one thread needs for any (b, h) of these sizes (64-byte aligned parts).
int64_t h16_attn_scratch_bytes(int64_t T, int64_t D);

// Attention of the (batch, head) pairs bh in [bh0, bh1) (bh = b * H + h); returns the largest |value|
// written to out16 (0 for out32). Finite q / k / v give finite outputs (the caller checks the inputs).
// Only call when the CPU has AVX512-FP16.
float h16_attention_heads(const H16AttnArgs& a, int64_t bh0, int64_t bh1, void* scratch);

}  // namespace leanformer
