// int4 group-wise weights x fp32 activations: y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[n, g] + z[n, g]).
//
// Per group g: sum_k x_k * ((q_k - 8) * s + z) = s * sum_k x_k * (q_k - 8) + z * sum_k x_k. Group sums
// of x are computed once per call, so the zero points cost one short dot product per output row
// (zero_terms) and never touch the hot loop.
//
// Decoding 4-bit codes to floats, not memory, is the bottleneck at batch 1 on AVX2. Two decoders:
//  * fast (group_size 32 or a multiple of 64, i.e. whole 32-byte blocks per scale): builds the float
//    1 + q/16 directly as the bit pattern 0x3F80_0000 | q << 19: one table lookup (pshufb:
//    q -> 0x80 | q << 3) and two in-lane unpacks that put that byte under a 0x3F byte in the top half
//    of each 32-bit lane. No int->float conversion; ~1.5x the generic decoder's throughput. Since
//    16 * (1 + q/16) = q + 16, the caller pre-scales x by 16 and sum x (q - 8) = sum 16x(1 + q/16)
//    - 24 sum x, the -24 sum x joining the zero-point terms. The unpacks emit columns in a fixed
//    permuted order, so x is permuted to match once per call (fast_pos).
//  * generic (any even group size, and the tail of a row that is not a whole number of blocks): table
//    lookup to signed q - 8, sign-extend, convert.
#include "common.h"
#include "q4_codes.h"

namespace leanformer {
namespace {

struct Q4Args {
  const float* xe;  // [M, Kh] even columns of x (Kh = bytes per weight row), natural order
  const float* xo;  // [M, Kh] odd columns (0 past K)
  const float* xp;  // [M, 2*Kh] per full 32-byte block, its 64 x values in the fast decoder's order
  const float* xs;  // [M, n_groups] sum of x over each group
  const float* xf;  // [M, n_groups] sum of x over the columns of each group the fast decoder covers
  const uint8_t* w;
  const float* scales;
  const float* zeros;
  const float* bias;
  float* y;
  int64_t N, Kh, n_groups, group_bytes;
  bool fast;
};

// Column order of the fast decoder within a 32-byte block: float vector t (0..3) of the low (part 0)
// or high (part 1) nibbles holds bytes {4t..4t+3} and {16+4t..16+4t+3} (in-lane unpacks).
inline int64_t fast_pos(int part, int t, int lane, int i) { return 32 * part + 8 * t + 4 * lane + i; }

// acc += x * (1 + q/16) for one 32-byte block (x pre-scaled by 16). With kScaleW the decoded weights
// are first multiplied by the block's scale vector s, so acc can run across groups.
template <int M, int A, bool kScaleW>
inline void fast_block(const Q4Args& a, const uint8_t* w, int64_t b, __m256 s, __m256 (&acc)[M][A]) {
  const __m256i lut = _mm256_setr_epi8(  // code q -> byte 0x80 | q << 3, both 128-bit lanes
      -128, -120, -112, -104, -96, -88, -80, -72, -64, -56, -48, -40, -32, -24, -16, -8, -128, -120, -112, -104,
      -96, -88, -80, -72, -64, -56, -48, -40, -32, -24, -16, -8);
  const __m256i mask = _mm256_set1_epi8(0x0F), exp = _mm256_set1_epi8(0x3F), zero = _mm256_setzero_si256();
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b));
  const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, mask));
  const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
  const __m256i halves[4] = {_mm256_unpacklo_epi8(lo, exp), _mm256_unpackhi_epi8(lo, exp),
                             _mm256_unpacklo_epi8(hi, exp), _mm256_unpackhi_epi8(hi, exp)};
  LF_UNROLL
  for (int h = 0; h < 4; ++h) {
    __m256 f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, halves[h]));
    __m256 f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, halves[h]));
    if constexpr (kScaleW) f0 = _mm256_mul_ps(f0, s), f1 = _mm256_mul_ps(f1, s);
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      const float* x = a.xp + m * 2 * a.Kh + 2 * b + 16 * h;  // h = 2 * part + t / 2
      acc[m][(2 * h) % A] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(x), acc[m][(2 * h) % A]);
      acc[m][(2 * h + 1) % A] = _mm256_fmadd_ps(f1, _mm256_loadu_ps(x + 8), acc[m][(2 * h + 1) % A]);
    }
  }
}

inline __m256 i8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

template <int M, int A>
inline __m256 reduce(const __m256 (&acc)[M][A], int m) {
  __m256 d = acc[m][0];
  LF_UNROLL
  for (int i = 1; i < A; ++i) d = _mm256_add_ps(d, acc[m][i]);
  return d;
}

template <int M, int A>
inline void zero_acc(__m256 (&acc)[M][A]) {
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    LF_UNROLL
    for (int i = 0; i < A; ++i) acc[m][i] = _mm256_setzero_ps();
  }
}

// Generic decoder for bytes [start, Kh) of row w, group by group: tot += s_g * sum x * (q - 8).
template <int M, int A>
inline void generic_part(const Q4Args& a, const uint8_t* w, const float* sc, int64_t start, __m256 (&tot)[M]) {
  const __m128i lut = _mm_setr_epi8(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t g = start / a.group_bytes; g < a.n_groups; ++g) {
    int64_t b = std::max(start, g * a.group_bytes);
    const int64_t b1 = std::min(a.Kh, (g + 1) * a.group_bytes);
    __m256 acc[M][A];
    zero_acc(acc);
    for (; b + 8 <= b1; b += 8) {  // 16 weights per step
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + b));
      const __m256 we = i8x8_to_ps(_mm_shuffle_epi8(lut, _mm_and_si128(v, mask)));
      const __m256 wo = i8x8_to_ps(_mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), mask)));
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(a.xe + m * a.Kh + b), acc[m][0]);
        acc[m][1 % A] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(a.xo + m * a.Kh + b), acc[m][1 % A]);
      }
    }
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      float t = 0.f;  // byte tail (< 8 bytes), scalar, folded into lane 0
      for (int64_t j = b; j < b1; ++j)
        t += a.xe[m * a.Kh + j] * static_cast<float>((w[j] & 15) - 8) +
             a.xo[m * a.Kh + j] * static_cast<float>((w[j] >> 4) - 8);
      const __m256 d = _mm256_add_ps(reduce(acc, m), _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0));
      tot[m] = _mm256_fmadd_ps(d, _mm256_set1_ps(sc[g]), tot[m]);
    }
  }
}

// sum_g z_g * xs_g - 24 * s_g * xf_g: the zero points (z null: none), and the -24 of the fast decoder's
// 16(1 + q/16).
inline float zero_terms(const float* z, const float* s, const float* xs, const float* xf, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    if (z) acc = _mm256_fmadd_ps(_mm256_loadu_ps(z + g), _mm256_loadu_ps(xs + g), acc);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_set1_ps(-24.f)), _mm256_loadu_ps(xf + g), acc);
  }
  float r = hsum(acc);
  for (; g < G; ++g) r += (z ? z[g] * xs[g] : 0.f) - 24.f * s[g] * xf[g];
  return r;
}

template <int M>
inline void q4_row(const Q4Args& a, int64_t n, float* out) {
  // Two ways to apply the per-group scale in the fast loop. One x row: reduce each block's partial
  // dot and FMA it into tot (keeps the hot loop at one multiply per weight). Several x rows: scale the
  // decoded weights once and let M accumulators run across groups (per-block reduction of M rows
  // would need 2M live vectors and spill).
  constexpr bool kScaleW = M >= 3;
  constexpr int A = M == 1 ? 4 : (M == 2 ? 2 : 1);  // accumulator chains per x row (1 or 2 measured slower)
  const uint8_t* __restrict w = a.w + n * a.Kh;
  const float* sc = a.scales + n * a.n_groups;
  __m256 tot[M], acc[M][A];
  LF_UNROLL
  for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps();
  zero_acc(acc);
  // Fast part: whole 32-byte blocks; with 16-byte groups (group_size 32) the two 128-bit lanes of a
  // block belong to consecutive groups and get their own scale.
  const int64_t fast_bytes = a.fast ? a.Kh / 32 * 32 : 0;
  const bool paired = a.group_bytes == 16;
  const int64_t blocks_per_group = paired ? 1 : a.group_bytes / 32;
  int64_t g = 0, left = blocks_per_group;  // counters, not b / group_bytes: no divide in the loop
  for (int64_t b = 0; b < fast_bytes; b += 32) {
    prefetch_ahead<32>(w, b);
    const __m256 s = paired ? _mm256_setr_m128(_mm_broadcast_ss(sc + 2 * g), _mm_broadcast_ss(sc + 2 * g + 1))
                            : _mm256_broadcast_ss(sc + g);
    fast_block<M, A, kScaleW>(a, w, b, s, acc);
    if constexpr (!kScaleW) {
      LF_UNROLL
      for (int m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(reduce(acc, m), s, tot[m]);
      zero_acc(acc);
    }
    if (--left == 0) ++g, left = blocks_per_group;
  }
  if constexpr (kScaleW) {
    LF_UNROLL
    for (int m = 0; m < M; ++m) tot[m] = reduce(acc, m);
  }
  if (fast_bytes < a.Kh) generic_part<M, A>(a, w, sc, fast_bytes, tot);
  const float* zr = a.zeros ? a.zeros + n * a.n_groups : nullptr;  // null: no zero points
  LF_UNROLL
  for (int m = 0; m < M; ++m)
    out[m] = hsum(tot[m]) + zero_terms(zr, sc, a.xs + m * a.n_groups, a.xf + m * a.n_groups, a.n_groups);
}

// Rows [c0, c1) whose scales / zeros start at s / z (q4_codes.h: the arrays, or a decoded chunk).
template <int M>
void q4_chunk_rows(const Q4Args& a, int64_t c0, int64_t c1, const float* s, const float* z) {
  Q4Args b = a;
  b.w = a.w + c0 * a.Kh, b.scales = s, b.zeros = z;
  for (int64_t n = 0; n < c1 - c0; ++n) {
    float out[M];
    q4_row<M>(b, n, out);
    LF_UNROLL
    for (int m = 0; m < M; ++m) a.y[m * a.N + c0 + n] = out[m] + (a.bias ? a.bias[c0 + n] : 0.f);
  }
}

template <int M>
void q4_rows(const Q4Args& a, const Q4Scales& qs) {
  // bytes streamed per row include the scale and zero of each group (fp32, or 8-bit codes)
  for_row_blocks(a.N, a.Kh + (qs.coded() ? 2 : 8) * a.n_groups, [&](int64_t n0, int64_t n1) {
    qs.chunks(n0, n1, [&](int64_t c0, int64_t c1, const float* s, const float* z) { q4_chunk_rows<M>(a, c0, c1, s, z); });
  });
}

// x [M, K] -> its even columns xe [M, Kh] and odd columns xo [M, Kh] (0 past K): byte j of a weight
// row holds columns 2j and 2j+1; the AVX2 generic decoder and the AVX-512 kernel read x this way.
void split_x(const float* x, int64_t M, int64_t K, float* xe, float* xo) {
  const int64_t Kh = (K + 1) / 2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < Kh; ++j) {
      xe[m * Kh + j] = x[m * K + 2 * j];
      xo[m * Kh + j] = 2 * j + 1 < K ? x[m * K + 2 * j + 1] : 0.f;
    }
}

// Per-call activation prep for the AVX2 decoders, O(M*K) (negligible next to reading W): natural
// even/odd columns, the fast decoder's permuted copy, and the two kinds of group sums.
void prepare_x(const float* x, int64_t M, int64_t K, int64_t group_size, bool fast, float* xe, float* xo,
               float* xp, float* xs, float* xf) {
  const int64_t Kh = (K + 1) / 2, n_groups = (K + group_size - 1) / group_size;
  const int64_t fast_bytes = fast ? Kh / 32 * 32 : 0;  // bytes covered by full 32-byte blocks
  split_x(x, M, K, xe, xo);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    const float *e = xe + m * Kh, *o = xo + m * Kh;
    float* p = xp + m * 2 * Kh;
    for (int64_t blk = 0; blk < fast_bytes; blk += 32)
      for (int t = 0; t < 4; ++t)
        for (int lane = 0; lane < 2; ++lane)
          for (int i = 0; i < 4; ++i) {
            const int64_t j = blk + 16 * lane + 4 * t + i;
            // x 16: the decoder yields 1 + q/16, so sum 16x(1 + q/16) = sum x q + 16 sum x (exact scaling)
            p[2 * blk + fast_pos(0, t, lane, i)] = 16.f * e[j];
            p[2 * blk + fast_pos(1, t, lane, i)] = 16.f * o[j];
          }
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t k0 = g * group_size, k1 = std::min(K, k0 + group_size);
      const int64_t kf = std::min(k1, std::max(k0, 2 * fast_bytes));  // fast columns end here
      float s = 0.f, f = 0.f;
      for (int64_t k = k0; k < k1; ++k) (k < kf ? f : s) += xr[k];
      xs[m * n_groups + g] = s + f;
      xf[m * n_groups + g] = f;
    }
  }
}

}  // namespace

at::Tensor linear_q4(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scales_,
                     const std::optional<at::Tensor>& zeros_,
                     int64_t group_size, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lut) {
  check_x(x_);
  const int64_t M = x_.size(0), K = x_.size(1), Kh = (K + 1) / 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "group_size must be positive and even");
  const int64_t n_groups = (K + group_size - 1) / group_size;
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kByte && w_.size(1) == Kh,
              "Wq must be uint8 [N, ceil(K/2)] (two 4-bit codes per byte)");
  const int64_t N = w_.size(0);
  const Q4Scales qs(scales_, zeros_, lut, N, n_groups, /*zeros_optional=*/true);  // none: symmetric (Q4_0)
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor bh;
  const float* b = bias_ptr(bias, N, bh);
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t row_bytes = Kh + (qs.coded() ? 2 : 8) * n_groups;
  if (use_avx512()) {  // decodes by table lookup: needs only the even/odd columns of x
    at::Tensor prep = at::empty({2 * M * Kh}, x.options());
    float *xe = prep.data_ptr<float>(), *xo = xe + M * Kh;
    split_x(x.data_ptr<float>(), M, K, xe, xo);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const KernelArgs a{xe + m0 * Kh, xo + m0 * Kh, w.data_ptr<uint8_t>(), nullptr, nullptr, b,
                         y.data_ptr<float>() + m0 * N, std::min<int64_t>(kMaxRows, M - m0), N, Kh, group_size / 2};
      for_row_blocks(N, row_bytes, [&](int64_t n0, int64_t n1) {
        qs.chunks(n0, n1, [&](int64_t c0, int64_t c1, const float* s, const float* z) {
          KernelArgs c = a;  // rows [c0, c1) as rows [0, c1 - c0) of a shifted view
          c.w = w.data_ptr<uint8_t>() + c0 * Kh, c.scales = s, c.zeros = z, c.y = a.y + c0;
          c.bias = b ? b + c0 : nullptr;
          avx512::q4_rows(c, 0, c1 - c0);
        });
      });
    }
    return y;
  }
  const bool fast = group_size % 64 == 0 || group_size == 32;  // whole 32-byte blocks per scale lane
  at::Tensor prep = at::empty({M * (4 * Kh + 2 * n_groups)}, x.options());
  float* xe = prep.data_ptr<float>();
  float *xo = xe + M * Kh, *xp = xo + M * Kh, *xs = xp + M * 2 * Kh, *xf = xs + M * n_groups;
  prepare_x(x.data_ptr<float>(), M, K, group_size, fast, xe, xo, xp, xs, xf);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const Q4Args a{xe + m0 * Kh, xo + m0 * Kh, xp + m0 * 2 * Kh, xs + m0 * n_groups, xf + m0 * n_groups,
                   w.data_ptr<uint8_t>(), nullptr, nullptr, b, y.data_ptr<float>() + m0 * N, N, Kh, n_groups,
                   group_size / 2, fast};
    dispatch_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto mc) { q4_rows<decltype(mc)::value>(a, qs); });
  }
  return y;
}

}  // namespace leanformer
