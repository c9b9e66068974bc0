// The nibble kernel of the int8-activation GEMV (int4 and int5 weights; gemv_i8_impl.h includes this
// file between its shared helpers and the int8 loops, inside no namespace: it opens its own anonymous
// one, the same unique namespace as the includer's). Needs XPack, kPackRows, i8_prefetch and i8_hsum.

namespace leanformer {
namespace {

// How the weight groups fall on 64-column chunks (one chunk = blocks 2c and 2c+1 of 32 columns):
// group 32 | a multiple of 64 | an odd multiple of 32 >= 96; the *Coded twins take 8-bit scale codes
// (I8Args::sc / zc / lut) and look the table up inside nib_rows' loops, with the same fp32 values and
// roundings as the fp32-array path (bit-identical results). Used from 32 groups per row up (gemv_i8.cpp
// kLookupMinGroups), where it measured 0.87-0.93x the time of q4_codes.h's decode pass over chunks of
// rows; a decode of each row into an L1 buffer before its loops measured no faster than that pass.
enum class Groups { k32, k64n, kOther, k32Coded, k64nCoded, kOtherCoded };
constexpr bool coded(Groups S) { return S >= Groups::k32Coded; }
constexpr Groups layout(Groups S) { return coded(S) ? Groups(int(S) - 3) : S; }

// The weight scales of chunk c as 8 lanes: block 2c's in lanes 0-3, block 2c+1's in lanes 4-7.
// g: the group of chunk c (k64n only, counted by the caller: a division per chunk measured ~20% slower).
// Coded: the same fp32 values, lut[codes[group]].
template <Groups S>
inline __m256 i8_chunk_scales(const float* sc, const uint8_t* codes, const float* lut, int64_t c, int64_t g,
                              int64_t bpg) {
  if constexpr (S == Groups::k32Coded) {  // two table loads as broadcasts, blended
    return _mm256_blend_ps(_mm256_broadcast_ss(lut + codes[2 * c]), _mm256_broadcast_ss(lut + codes[2 * c + 1]), 0xF0);
  } else if constexpr (S == Groups::k64nCoded) {
    return _mm256_broadcast_ss(lut + codes[g]);
  } else if constexpr (S == Groups::kOtherCoded) {
    return _mm256_blend_ps(_mm256_broadcast_ss(lut + codes[(2 * c) / bpg]),
                           _mm256_broadcast_ss(lut + codes[(2 * c + 1) / bpg]), 0xF0);
  } else if constexpr (S == Groups::k32) {  // one 8-byte load and a lane permute
    const __m128d two = _mm_load_sd(reinterpret_cast<const double*>(sc + 2 * c));
    const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(two)), lanes);
  } else if constexpr (S == Groups::k64n) {
    return _mm256_set1_ps(sc[g]);
  } else {  // rare group sizes (96, 160, ...): a chunk may straddle two groups
    return _mm256_set_m128(_mm_set1_ps(sc[(2 * c + 1) / bpg]), _mm_set1_ps(sc[(2 * c) / bpg]));
  }
}

// The same 8 lanes from the fp16 copy (I8Args::scales_h): blocks 2c, 2c + 1 of row scales h, one
// 4-byte load; fp16 -> fp32 is exact, so the lanes equal i8_chunk_scales' k32 ones.
inline __m256 i8_chunk_scales_half(const uint16_t* h, int64_t c) {
  int32_t two;
  __builtin_memcpy(&two, h + 2 * c, 4);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two))),
                                  _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// t[codes[0..7]] as 8 lanes: a table load per lane as a broadcast (a load-port op) merged by immediate
// blends. Measured on Zen 3 (a 576 x 576 microbenchmark): the AVX2 gather ~1.2x and lane inserts
// (_mm256_setr_ps: shuffle-port bound) ~1.1x the time of this.
inline __m256 i8_lut8(const float* t, const uint8_t* codes) {
  const auto at = [&](int i) { return _mm256_broadcast_ss(t + codes[i]); };
  __m256 v = at(0);
  v = _mm256_blend_ps(v, at(1), 0x02);
  v = _mm256_blend_ps(v, at(2), 0x04);
  v = _mm256_blend_ps(v, at(3), 0x08);
  v = _mm256_blend_ps(v, at(4), 0x10);
  v = _mm256_blend_ps(v, at(5), 0x20);
  v = _mm256_blend_ps(v, at(6), 0x40);
  return _mm256_blend_ps(v, at(7), 0x80);
}

// The int5 codes of 64-column chunk c (compress/int5.py packs them): 32 bytes A (v) and 64 bits E (words
// 2c, 2c + 1 of hb). lo byte j (column 2j) = A_j & 31; hi byte j (column 2j + 1) = ((A_j >> 3) ^ S_j) & 31,
// S_j = E >> (8p + 2Q) for byte j = 8Q + p (qword lane Q: one broadcast and one variable shift). The
// packer chose E and A's top 3 bits so that XOR gives the code: 4 ops per 64 weights on top of the load
// (int4 takes 3), where storing the 5th bits apart and OR-ing them in took 9 (measured 1.46x int4's time
// on a 3072 x 576 GEMV at M = 1; this layout 1.14x).
inline void i8_q5_codes(__m256i v, const uint32_t* hb, int64_t c, __m256i& lo, __m256i& hi) {
  const __m256i e = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(hb + 2 * c)));
  const __m256i m31 = _mm256_set1_epi8(0x1F);
  lo = _mm256_and_si256(v, m31);
  const __m256i s = _mm256_srlv_epi64(e, _mm256_setr_epi64x(0, 2, 4, 6));
  hi = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(v, 3), s), m31);  // srli16: bits 5-7 masked off
}

// A last 32 columns of weight row w (K % 64 = 32, in the last group; natural order) against activation
// row m: scalar, exact in int. h: int5's last word of 5th bits; s: the last group's scale.
template <bool kQ5>
inline float nib_tail(const I8Args& a, const uint8_t* w, uint32_t h, float s, int m) {
  const int64_t b0 = 32 * (a.K / 64);
  const int8_t* x = a.xq + m * a.Kx + 2 * b0;
  const int off = kQ5 ? -16 : -8;
  int32_t t = 0;
  for (int64_t k = 0; k < 16; ++k) {
    const int b = w[b0 + k];  // int5: A_k = code 2k | code (2k+1) bits 2-4 << 5, bits 0-1 in h
    const int even = (kQ5 ? b & 31 : b & 15) + off;
    const int odd = (kQ5 ? ((b >> 5) << 2) | static_cast<int>((h >> (2 * k)) & 3) : b >> 4) + off;
    t += x[2 * k] * even + x[2 * k + 1] * odd;
  }
  return static_cast<float>(t) * a.dv[m * (a.Kx / 8) + 8 * (a.K / 64)] * s;
}

// The end of a nibble row (nib_rows, and wide_rows of gemv_i8_wide.h): acc[r][m] holds the chunks'
// sum, the codes' -8 (-16) included (I8Args::xc); add the zero points (of the groups past the span
// loop's, gemv_i8_wide.h span_rows: it adds its own) and a last 32 columns into out[r][m].
template <int NR, int M, Groups S, bool kQ5>
inline void nib_finish(const I8Args& a, int64_t n, const __m256 (&acc)[NR][M], float (&out)[NR][M]) {
  const int64_t group = kQ5 ? 32 : a.group;
  const int64_t Kh = a.K / 2, G = a.K / group;
  constexpr bool kCoded = coded(S);
  const uint8_t* w[NR];
  const float* sc[NR];
  const float* zr[NR];  // null: symmetric codes (GGUF Q4_0, int5), no zero point
  const uint8_t* scc[NR];  // coded: the row's scale / zero codes [G]
  const uint8_t* zcc[NR];
  const uint32_t* hb[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const uint8_t*>(a.w) + (n + r) * Kh;
    sc[r] = kCoded || !a.scales ? nullptr : a.scales + (n + r) * G;  // null: held as fp16 only (a.scales_h)
    zr[r] = !kQ5 && !kCoded && a.zeros ? a.zeros + (n + r) * G : nullptr;
    scc[r] = kCoded ? a.sc + (n + r) * G : nullptr;
    zcc[r] = kCoded ? a.zc + (n + r) * G : nullptr;
    hb[r] = kQ5 ? a.high + (n + r) * G : nullptr;
  }
  const float* lut = a.lut;
  auto scale = [&](int r, int64_t j) {
    return kCoded ? lut[scc[r][j]] : sc[r] ? sc[r][j] : _cvtsh_ss(a.scales_h[(n + r) * G + j]);
  };
  // The zero points: sum_g z_g * xs_g, eight groups per vector. (A scalar loop here was one serial FMA
  // chain per row, ~4 cycles per group: it measured a third of the time of a 576-column row.) Symmetric
  // codes (GGUF Q4_0, int5) have none: their rows end at the sum.
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    const bool zeros = kCoded || zr[r] || (!kQ5 && a.zeros_h);
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      __m256 t8 = acc[r][m];
      const float* xs = a.xs + m * G;
      int64_t j = 16 * a.spans;
      if (zeros)
        for (; j + 8 <= G; j += 8) {
          __m256 z8;
          if constexpr (kCoded) {  // exactly as the fp32 arrays were made: z = lut[256 + zc] * s, stored as fp32
            z8 = _mm256_mul_ps(i8_lut8(lut + 256, zcc[r] + j), i8_lut8(lut, scc[r] + j));
            asm("" : "+x"(z8));  // z rounded to fp32 (no FMA contraction into the next one)
          } else if (a.zeros_h) {  // their fp16 copy (exact)
            z8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros_h + (n + r) * G + j)));
          } else {
            z8 = _mm256_loadu_ps(zr[r] + j);
          }
          t8 = _mm256_fmadd_ps(z8, _mm256_loadu_ps(xs + j), t8);
        }
      float y = i8_hsum(t8);
      if (zeros)
        for (; j < G; ++j) {
          float z = kCoded ? lut[256 + zcc[r][j]] * scale(r, j) : a.zeros_h ? _cvtsh_ss(a.zeros_h[(n + r) * G + j]) : zr[r][j];
          asm("" : "+x"(z));  // as above
          y += z * xs[j];
        }
      if (a.K % 64) y += nib_tail<kQ5>(a, w[r], kQ5 ? hb[r][G - 1] : 0, scale(r, G - 1), m);
      out[r][m] = y;
    }
  }
}

// The nibble kernel: int4 (kQ5 false) and int5 (kQ5 true, GGUF Q5_0, compress/int5.py), weight rows
// n..n+NR-1 against the M activation rows into out[r][m].
// int4: w = (q - 8) s + z per group, q = the nibble. int5: w = (q - 16) s per 32 columns, q in 0..31,
// per 64-column chunk 32 bytes of a.w and two words of a.high (i8_q5_codes' layout); a last half chunk
// 16 bytes A_k (code 2k | bits 2-4 of code 2k + 1 << 5) and one word (bits 2k, 2k + 1: code 2k + 1's
// bits 0-1). Exact:
// maddubs pairs of 31 * 127 products, two pairs summed (dot2) stay below 32767. The -8 / -16 starts
// each chunk's integer sums (I8Args::xc), the zero points enter through the activation group sums xs.
// kHalf (group 32): the scales (and zero points) as their fp16 copies (I8Args::scales_h / zeros_h).
template <int NR, int M, class D, Groups S, bool kQ5, bool kHalf = false>
inline void nib_rows(const I8Args& a, const XPack& p, int64_t n, float (&out)[NR][M]) {
  const int64_t group = kQ5 ? 32 : a.group;
  const int64_t Kh = a.K / 2, G = a.K / group, bpg = group / 32, cpg = group / 64;
  constexpr bool kCoded = coded(S);
  const uint8_t* __restrict w[NR];
  const float* sc[NR];
  const uint8_t* scc[NR];  // coded: the row's scale codes [G]
  const uint32_t* hb[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const uint8_t*>(a.w) + (n + r) * Kh;
    sc[r] = kCoded || kHalf ? nullptr : a.scales + (n + r) * G;
    scc[r] = kCoded ? a.sc + (n + r) * G : nullptr;
    hb[r] = kQ5 ? a.high + (n + r) * G : nullptr;
  }
  const float* lut = a.lut;
  constexpr bool kP = M >= kPackRows;
  const int8_t* xr[M];  // activation row m's codes, chunk scales and offset lanes (hoisted: the loop
  const float* dr[M];   // recomputed m * Kx / 8)
  const int32_t* orow[M];
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    xr[m] = kP ? p.x + 64 * m : p.x + m * a.Kx;
    dr[m] = kP ? p.d + 8 * m : p.d + m * (a.Kx / 8);
    orow[m] = kP ? p.o + 8 * m : p.o + m * (a.Kx / 8);
  }
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t chunks = a.K / 64;
  const uint16_t* hr[NR];  // kHalf: the rows' fp16 scales, each chunk's converted where it is used
  LF_UNROLL
  for (int r = 0; r < NR; ++r) hr[r] = kHalf ? a.scales_h + (n + r) * G : nullptr;
  __m256 acc[NR][M];
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t g = 0, left = cpg;  // k64n: the group of chunk c, its chunks still ahead
  for (int64_t c = 0; c < chunks; ++c) {  // one 64-column chunk (32 weight bytes per row)
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      i8_prefetch<kI8AheadNib>(w[r], 32 * c);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + 32 * c));
      __m256i lo, hi;  // even / odd columns' codes
      if constexpr (kQ5) {
        i8_q5_codes(v, hb[r], c, lo, hi);
      } else {
        lo = _mm256_and_si256(v, mask);
        hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      }
      const __m256 ws = kHalf ? i8_chunk_scales_half(hr[r], c) : i8_chunk_scales<S>(sc[r], scc[r], lut, c, g, bpg);
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xr[m] + (kP ? 64 * M : 64) * c;
        const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(orow[m] + (kP ? 8 * M : 8) * c));
        const __m256i s = _mm256_add_epi32(o, D::dot2(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), hi,
                                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
        const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(dr[m] + (kP ? 8 * M : 8) * c), ws);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r][m]);
      }
    }
    if (layout(S) == Groups::k64n && --left == 0) ++g, left = cpg;
  }
  nib_finish<NR, M, S, kQ5>(a, n, acc, out);
}

}  // namespace
}  // namespace leanformer
