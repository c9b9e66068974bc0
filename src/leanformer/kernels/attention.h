// Interface between attention.cpp (AVX2 side: checks, threading, bindings) and attention_avx512.cpp.
//
// Plain declarations and one internal-linkage helper only, for the reason avx512.h gives: anything
// inline with external linkage shared by the AVX2 and AVX-512 translation units may be emitted as
// AVX-512 code for both and crash AVX2-only CPUs.
#pragma once

#include <cstdint>

namespace leanformer {

// Non-causal softmax attention of one batch, q/k/v [B, H, T, D] (any strides, last dim contiguous),
// out [B, T, H, D] contiguous (the layout the output projection reads), fp32 throughout.
struct AttnArgs {
  const float* q;
  const float* k;
  const float* v;
  int64_t q_stride[3];  // element strides of b, h, t
  int64_t k_stride[3];
  int64_t v_stride[3];
  float* out;
  const uint8_t* mask;  // [B, T] key mask, nonzero = attend; null = every key
  int64_t B, H, T, D;
  float scale;
};

// Floats of scratch one (b, h) needs, enough for every instruction set's blocking (see attention_impl.h:
// query block <= 24 rows, keys padded to 64, head_dim padded to 16), plus room to align each part.
static inline int64_t attn_scratch_floats(int64_t T, int64_t D) {
  const int64_t tp = T + 64, dp = D + 16, mq = 24;
  return D * tp + T * dp + mq * D + mq * tp + mq * dp + tp + mq + 8 * 16;
}

namespace avx512 {
// Attention of the (batch, head) pairs bh in [bh0, bh1) (bh = b * H + h). Only call when the CPU has
// AVX-512 F/BW/VL/DQ (use_avx512()).
void attention_heads(const AttnArgs& a, int64_t bh0, int64_t bh1, float* scratch);
}  // namespace avx512

}  // namespace leanformer
