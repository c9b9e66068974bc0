// AVX-512 instantiation of the attention kernel (attention_impl.h), called per block of (batch, head)
// pairs by attention.cpp on CPUs that have AVX-512 F/BW/VL/DQ.
//
// Only this file is compiled for AVX-512 (the pragma below), and it includes nothing but <immintrin.h>,
// <cstdint> and plain headers: see avx512.h for why.
#include <immintrin.h>

#include <cstdint>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#endif

#include "attention.h"
#include "vec16.h"  // V16, exp16_nonpos

#include "attention_impl.h"

namespace leanformer {
namespace avx512 {
// 24-row query blocks; QK tiles of 24 accumulators: 6 rows x 64 keys, or for short inputs (whose keys
// would mostly be padding in a 64-key tile) 12 x 32 or 24 x 16; PV tiles of 24 accumulators (head_dim
// 32: 12 rows x 2 vectors, 64: 6 x 4).
void attention_heads(const AttnArgs& a, int64_t bh0, int64_t bh1, float* scratch) {
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    if (a.T <= 16)
      attn_head<V16, 24, 24, 1, 24>(a, bh, scratch);
    else if (a.T <= 32)
      attn_head<V16, 24, 12, 2, 24>(a, bh, scratch);
    else
      attn_head<V16, 24, 6, 4, 24>(a, bh, scratch);
  }
}
}  // namespace avx512
}  // namespace leanformer

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
