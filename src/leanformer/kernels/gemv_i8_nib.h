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

// 32 bits -> 32 bytes, byte j = 16 if bit j is set, else 0 (the 5th bit of int5 codes, as a value).
// The 5th bits of 64-column chunk c as bytes 16 / 0 on the nibble bytes: lo over its 32 even columns,
// hi over its 32 odd ones. H = the chunk's 64 bits (words 2c, 2c + 1); byte p of qword lane Q of lo
// is bit 4 of byte p of H >> Q (H's bit 8p + 4 + Q), of hi bit 4 of H << (4 - Q) (bit 8p + Q): one
// broadcast, two variable shifts and two ands per 64 weights (compress/int5.py packs that order).
inline void i8_high16(const uint32_t* hb, int64_t c, __m256i& lo, __m256i& hi) {
  const __m256i h = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(hb + 2 * c)));
  const __m256i bit4 = _mm256_set1_epi8(16);
  lo = _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 1, 2, 3)), bit4);
  hi = _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_setr_epi64x(4, 3, 2, 1)), bit4);
}

// The nibble kernel: int4 (kQ5 false) and int5 (kQ5 true, GGUF Q5_0, compress/int5.py), weight rows
// n..n+NR-1 against the M activation rows into out[r][m].
// int4: w = (q - 8) s + z per group, q = the nibble. int5: w = (q - 16) s per 32 columns, q = nibble |
// 16 * high bit, 0..31; nibbles as int4's (a.w, two per byte, low = even column), a.high per 64-column
// chunk two words in i8_high16's bit order, a last half chunk one word in natural column order. Exact:
// maddubs pairs of 31 * 127 products, two pairs summed (dot2) stay below 32767. The -8 / -16 and the
// zero points enter through the activation group sums xs.
template <int NR, int M, class D, Groups S, bool kQ5>
inline void nib_rows(const I8Args& a, const XPack& p, int64_t n, float (&out)[NR][M]) {
  const int64_t group = kQ5 ? 32 : a.group;
  const int64_t Kh = a.K / 2, G = a.K / group, bpg = group / 32, cpg = group / 64;
  constexpr bool kCoded = coded(S);
  const uint8_t* __restrict w[NR];
  const float* sc[NR];
  const float* zr[NR];  // null: symmetric codes (GGUF Q4_0, int5), no zero point
  const uint8_t* scc[NR];  // coded: the row's scale / zero codes [G]
  const uint8_t* zcc[NR];
  const uint32_t* hb[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const uint8_t*>(a.w) + (n + r) * Kh;
    sc[r] = kCoded ? nullptr : a.scales + (n + r) * G;
    zr[r] = !kQ5 && !kCoded && a.zeros ? a.zeros + (n + r) * G : nullptr;
    scc[r] = kCoded ? a.sc + (n + r) * G : nullptr;
    zcc[r] = kCoded ? a.zc + (n + r) * G : nullptr;
    hb[r] = kQ5 ? a.high + (n + r) * G : nullptr;
  }
  const float* lut = a.lut;
  auto scale = [&](int r, int64_t j) { return kCoded ? lut[scc[r][j]] : sc[r][j]; };
  constexpr bool kP = M >= kPackRows;
  const int8_t* xr[M];  // activation row m's codes and chunk scales (hoisted: the loop recomputed m * Kx / 8)
  const float* dr[M];
  LF_UNROLL
  for (int m = 0; m < M; ++m) xr[m] = kP ? p.x + 64 * m : p.x + m * a.Kx, dr[m] = kP ? p.d + 8 * m : p.d + m * (a.Kx / 8);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t chunks = a.K / 64;
  __m256 acc[NR][M];
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t g = 0, left = cpg;  // k64n: the group of chunk c, its chunks still ahead
  for (int64_t c = 0; c < chunks; ++c) {  // one 64-column chunk (32 weight bytes per row)
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      i8_prefetch(w[r], 32 * c);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + 32 * c));
      __m256i lo = _mm256_and_si256(v, mask);                        // even columns
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);  // odd columns
      if constexpr (kQ5) {
        __m256i lo5, hi5;
        i8_high16(hb[r], c, lo5, hi5);
        lo = _mm256_or_si256(lo, lo5);
        hi = _mm256_or_si256(hi, hi5);
      }
      const __m256 ws = i8_chunk_scales<S>(sc[r], scc[r], lut, c, g, bpg);
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xr[m] + (kP ? 64 * M : 64) * c;
        const __m256i s = D::dot2(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), hi,
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
        const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(dr[m] + (kP ? 8 * M : 8) * c), ws);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r][m]);
      }
    }
    if (layout(S) == Groups::k64n && --left == 0) ++g, left = cpg;
  }
  // The -8 (-16) of the codes and the zero points: sum_g (z_g - 8 s_g) * xs_g, eight groups per vector.
  // (A scalar loop here was one serial FMA chain per row, ~4 cycles per group: it measured a third of
  // the time of a 576-column row.)
  const float off0 = kQ5 ? -16.f : -8.f;
  const __m256 minus8 = _mm256_set1_ps(off0);
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      __m256 t8 = acc[r][m];
      const float* xs = a.xs + m * G;
      int64_t j = 0;
      for (; j + 8 <= G; j += 8) {
        __m256 off;
        if constexpr (kCoded) {  // exactly as the fp32 arrays were made: z = lut[256 + zc] * s, stored as fp32
          const __m256 s8 = i8_lut8(lut, scc[r] + j);
          __m256 z8 = _mm256_mul_ps(i8_lut8(lut + 256, zcc[r] + j), s8);
          asm("" : "+x"(z8));  // z rounded to fp32 (no FMA contraction into the add)
          off = _mm256_add_ps(_mm256_mul_ps(s8, minus8), z8);
        } else {
          off = _mm256_mul_ps(_mm256_loadu_ps(sc[r] + j), minus8);
          if (zr[r]) off = _mm256_add_ps(off, _mm256_loadu_ps(zr[r] + j));
        }
        t8 = _mm256_fmadd_ps(off, _mm256_loadu_ps(xs + j), t8);
      }
      float y = i8_hsum(t8);
      for (; j < G; ++j) {
        const float s = scale(r, j);
        float z = kCoded ? lut[256 + zcc[r][j]] * s : zr[r] ? zr[r][j] : 0.f;
        asm("" : "+x"(z));  // as above
        y += (z + off0 * s) * xs[j];
      }
      if (a.K % 64) {  // a last 32 columns (in the last group), natural order: scalar, exact in int
        const int64_t b0 = 32 * chunks;
        const int8_t* x = a.xq + m * a.Kx + 2 * b0;
        const uint32_t h = kQ5 ? hb[r][G - 1] : 0;
        int32_t t = 0;
        for (int64_t k = 0; k < 16; ++k) {
          const int even = (w[r][b0 + k] & 15) | static_cast<int>(((h >> (2 * k)) & 1) << 4);
          const int odd = (w[r][b0 + k] >> 4) | static_cast<int>(((h >> (2 * k + 1)) & 1) << 4);
          t += x[2 * k] * even + x[2 * k + 1] * odd;
        }
        y += static_cast<float>(t) * a.dv[m * (a.Kx / 8) + 8 * chunks] * scale(r, G - 1);
      }
      out[r][m] = y;
    }
  }
}

}  // namespace
}  // namespace leanformer
