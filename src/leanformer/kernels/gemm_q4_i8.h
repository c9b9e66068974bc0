// The int8-activation int4 GEMM loops for prefill-sized inputs (gemm_q4_i8.cpp drives them), written once
// over a vector policy and included by each instruction-set translation unit after its target pragma:
// gemv_i8.cpp (AVX2: maddubs + madd), gemv_vnni.h (AVX-VNNI / AVX-512 VNNI: vpdpbusd; LF_I8_WIDE: 512-bit).
// Everything has internal linkage except LF_I8_NS::q4_gemm (see int8_act.h for why).
//
// Why not the decode GEMVs in passes of 16 rows: they put the weight rows in the vector lanes' columns
// and suit one to a few activation rows; at 128 rows they reached ~19 multiply-adds per cycle here. This
// puts L activation rows in the lanes instead (L = 16 on 512-bit vectors, 8 on 256-bit) and one weight
// row's 4 codes broadcast to all lanes, so one vpdpbusd is 4 columns x L rows and a block of 32 columns
// is 8 of them, then one convert and one FMA per (weight row, L activation rows, block). NR weight rows
// x TJ lane tiles of accumulators stay in registers across a whole row of blocks.
//
// Math, per output: y[m, n] = sum_b s[n, g(b)] * d[m, b] * (sum_{k in b} q[n, k] xq[m, k] - o sum_{k in b} xq[m, k])
// with w = (q - o) s (+ z, added by the driver), the -o entering as the integer accumulator's start
// value (xo = -o * the block's code sum), so each block's integer sum is exact and its float step is one
// FMA in block order: a row's result does not depend on M or on which lane it lands in. int4: q the
// nibble, o = 8. int8 (VNNI only: AVX2's maddubs would saturate on 255 x 127 pairs): q = w + 128, o = 128.

namespace leanformer {
namespace {

struct GemmVec8 {  // 8 int32 / fp32 lanes
  using I = __m256i;
  using F = __m256;
  static constexpr int L = 8;
  static I load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I bcast(const uint8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static I izero() { return _mm256_setzero_si256(); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
#ifdef LF_VNNI_DPBUSD
  static I dot(I acc, I u, I s) { return LF_VNNI_DPBUSD(acc, u, s); }
#else  // maddubs' int16 pair sums stay exact: codes <= 15, |xq| <= 127
  static I dot(I acc, I u, I s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
#endif
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static F zero() { return _mm256_setzero_ps(); }
  static F mul(F a, float b) { return _mm256_mul_ps(a, _mm256_set1_ps(b)); }
  static F fma(I acc, F s, F out) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, out); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

#ifdef LF_I8_WIDE
struct GemmVec16 {  // 16 int32 / fp32 lanes
  using I = __m512i;
  using F = __m512;
  static constexpr int L = 16;
  static I load(const int8_t* p) { return _mm512_loadu_si512(p); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I bcast(const uint8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static I izero() { return _mm512_setzero_si512(); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static F zero() { return _mm512_setzero_ps(); }
  static F mul(F a, float b) { return _mm512_mul_ps(a, _mm512_set1_ps(b)); }
  static F fma(I acc, F s, F out) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, out); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
using GemmVec = GemmVec16;  // the tiles' lanes; a last tile of at most 8 rows runs on GemmVec8
constexpr int kGemmNR = 6, kGemmTJ = 2;  // 12 int + 12 float accumulators of 32 registers
#else
using GemmVec = GemmVec8;
constexpr int kGemmNR = 2, kGemmTJ = 2;  // 16 registers: 4 int + 4 float accumulators, 2 tiles, temps
#endif

// NR weight rows (codes: [NR][K] u8, natural column order) x TJ lane tiles starting at tile t0 -> yt rows,
// on vectors of V::L lanes: the tiles' first V::L lanes of GemmVec::L (the layout's). Each lane's steps
// are the same whatever V, so a row's result is too.
template <class V, int NR, int TJ>
inline void gemm_tiles(const GemmQ4Args& a, const uint8_t* codes, const float* const* srow, int64_t t0,
                       float* const* yrow) {
  constexpr int L = GemmVec::L;  // the layout's lanes per tile
  const int64_t B = a.K / 32, tile_bytes = 32 * L;  // one block of one tile: 8 quads x L lanes x 4 bytes
  typename V::F out[NR][TJ];
  LF_UNROLL for (int r = 0; r < NR; ++r) LF_UNROLL for (int j = 0; j < TJ; ++j) out[r][j] = V::zero();
  const int64_t per_group = a.group / 32;  // blocks per scale
  // P partial sums per accumulator (quad q into acc[q % P]): with one tile, 2, so 2 NR chains of
  // vpdpbusd are in flight instead of NR (latency, not throughput, bound them); integer sums, so the
  // result is the same
  constexpr int P = TJ == 1 ? 2 : 1;
  for (int64_t b = 0, g = 0, left = per_group; b < B; ++b) {
    typename V::I acc[P][NR][TJ];
    const int8_t* xb[TJ];
    LF_UNROLL for (int j = 0; j < TJ; ++j) {
      const int64_t tb = (t0 + j) * B + b;
      const typename V::I start = V::loadi(a.xo + tb * L);
      LF_UNROLL for (int r = 0; r < NR; ++r) {
        acc[0][r][j] = start;
        LF_UNROLL for (int p = 1; p < P; ++p) acc[p][r][j] = V::izero();
      }
      xb[j] = a.xt + tb * tile_bytes;
    }
    LF_UNROLL for (int q = 0; q < 8; ++q) {
      typename V::I x[TJ];
      LF_UNROLL for (int j = 0; j < TJ; ++j) x[j] = V::load(xb[j] + q * 4 * L);
      LF_UNROLL for (int r = 0; r < NR; ++r) {
        const typename V::I wq = V::bcast(codes + r * a.K + 32 * b + 4 * q);
        LF_UNROLL for (int j = 0; j < TJ; ++j) acc[q % P][r][j] = V::dot(acc[q % P][r][j], wq, x[j]);
      }
    }
    LF_UNROLL for (int p = 1; p < P; ++p) LF_UNROLL for (int r = 0; r < NR; ++r) LF_UNROLL for (int j = 0; j < TJ; ++j)
      acc[0][r][j] = V::iadd(acc[0][r][j], acc[p][r][j]);
    LF_UNROLL for (int j = 0; j < TJ; ++j) {
      const typename V::F d = V::loadf(a.dx + ((t0 + j) * B + b) * L);
      LF_UNROLL for (int r = 0; r < NR; ++r) out[r][j] = V::fma(acc[0][r][j], V::mul(d, srow[r][g]), out[r][j]);
    }
    if (--left == 0) ++g, left = per_group;
  }
  LF_UNROLL for (int r = 0; r < NR; ++r) LF_UNROLL for (int j = 0; j < TJ; ++j) V::store(yrow[r] + (t0 + j) * L, out[r][j]);
}

// Weight row n's nibbles (low = even column) -> K u8 codes in column order.
inline void gemm_unpack_row(const uint8_t* w, int64_t K, uint8_t* out) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < K / 2; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
  }
}

// int8 weights (q8: w [N, K] int8) -> w + 128 as u8 codes, the 128 taken off by the offset start
inline void gemm_offset_row(const uint8_t* w, int64_t K, uint8_t* out) {
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < K; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)), flip));
}

// Rows' fp16 scales h[r][0..G) widened into out[r] (fp16 -> fp32 exact), 8 per conversion: a weight row's
// scales before gemm_rows' tiles, which read fp32 scales. False (nothing done) past kHalfWiden.
template <int NR>
inline bool i8_widen_half(const uint16_t* const (&h)[NR], int64_t G, float (&out)[NR][kHalfWiden]) {
  if (G > kHalfWiden) return false;
  for (int r = 0; r < NR; ++r) {
    int64_t j = 0;
    for (; j + 8 <= G; j += 8)
      _mm256_store_ps(out[r] + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h[r] + j))));
    for (; j < G; ++j) out[r][j] = _cvtsh_ss(h[r][j]);
  }
  return true;
}

template <int NR>
inline void gemm_rows(const GemmQ4Args& a, int64_t n, uint8_t* codes) {
  const float* srow[NR];
  float* yrow[NR];
  const uint16_t* hrow[NR];
  alignas(32) float wide[NR][kHalfWiden];  // a.scales_h: the rows' scales in fp32 (exact)
  for (int r = 0; r < NR; ++r) {
    if (a.q8)
      gemm_offset_row(a.w + (n + r) * a.K, a.K, codes + r * a.K);
    else
      gemm_unpack_row(a.w + (n + r) * (a.K / 2), a.K, codes + r * a.K);
    srow[r] = a.scales_h ? wide[r] : a.scales + (n + r) * (a.K / a.group);
    hrow[r] = a.scales_h ? a.scales_h + (n + r) * (a.K / 32) : nullptr;
    yrow[r] = a.yt + (n + r) * a.T * GemmVec::L;
  }
  if (a.scales_h) i8_widen_half<NR>(hrow, a.K / 32, wide);
  int64_t t = 0;
  // a last tile of at most 8 rows on 8-lane vectors (17..24 rows: a third less arithmetic)
  const bool half = GemmVec::L > 8 && a.M - (a.T - 1) * GemmVec::L <= 8;
  const int64_t full = half ? a.T - 1 : a.T;
  for (; t + kGemmTJ <= full; t += kGemmTJ) gemm_tiles<GemmVec, NR, kGemmTJ>(a, codes, srow, t, yrow);
  for (; t < full; ++t) gemm_tiles<GemmVec, NR, 1>(a, codes, srow, t, yrow);
  if (half) gemm_tiles<GemmVec8, NR, 1>(a, codes, srow, t, yrow);
}

}  // namespace

namespace LF_I8_NS {
void q4_gemm(const GemmQ4Args& a, int64_t n0, int64_t n1, uint8_t* codes) {
  int64_t n = n0;
  for (; n + kGemmNR <= n1; n += kGemmNR) gemm_rows<kGemmNR>(a, n, codes);
  for (; n < n1; ++n) gemm_rows<1>(a, n, codes);
}
}  // namespace LF_I8_NS

}  // namespace leanformer
