// The int4 nibble loop and the int8 loop on 512-bit vectors (AVX-512 VNNI only: gemv_avx512vnni.cpp
// defines LF_I8_WIDE and gemv_i8_impl.h includes this file after gemv_i8_nib.h). Needs XPack, kPackRows,
// i8_chunk_scales, i8_hsum and nib_finish; its rows are packed by i8_pack<M, 2>.
//
// Why: at batch 1 the 256-bit loop spends ~14 instructions per 64 weights of a row (load, two masks, a
// shift, the chunk's scales, two activation loads, two vpdpbusd, the block scales' load and product, a
// convert, an FMA). One 512-bit register holds 128 nibbles, and when the activations of those 128
// columns sit as [64 even columns | 64 odd columns] the same ~14 instructions cover 128 weights: int32
// lane l of the two vpdpbusd sums is then columns 8l..8l+7, so lanes 4b..4b+3 are 32-column block b,
// whose activation scale d_b the existing [d x4 | d x4] pairs of two chunks already give as 16 lanes.
//
// Activation layout ("wide", I8Args::wide): per 128-column superchunk the 64 even columns then the 64
// odd ones (gemv_i8.cpp swaps the middle 32-byte quarters of the 64-column chunk layout); an odd last
// 64-column chunk and a last 32 columns keep that layout's places, so dv, xs and nib_finish are shared.
// Rows keep one accumulator chain each, in chunk order, so a row's result does not depend on the call's
// row count (speculative verification). Weight groups: 32 or a multiple of 64, fp32 scales, their exact
// fp16 copy (group 32, I8Args::scales_h) or 8-bit scale codes (the same fp32 values: results bit-equal to
// the fp32 arrays'); others stay on nib_rows.

namespace leanformer {
namespace {

// Lanes l and l + 8 of each 16-lane accumulator added: the 8-lane sums the 256-bit code finishes from.
template <int NR, int M>
inline void fold16(const __m512 (&acc)[NR][M], __m256 (&acc8)[NR][M]) {
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m)
      acc8[r][m] = _mm256_add_ps(_mm512_castps512_ps256(acc[r][m]),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][m]), 1)));
}

// Eight accumulators' lane sums in one pass, each by fold16 + i8_hsum's tree bit for bit (lanes l + l+8,
// then i + i+4, then 0 + 2 and 1 + 3, then those two; a + b == b + a exactly): 24 shuffles and adds for
// eight rows instead of ~7 dependent ops each. Returns sum(a[i]) in lane i.
inline __m256 sum8(__m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4, __m512 a5, __m512 a6, __m512 a7) {
  auto halves = [](__m512 a, __m512 b) {  // [a v0-3 | a v4-7 | b v0-3 | b v4-7], v_l = lane l + lane l+8
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  };
  auto quarters = [](__m512 z, __m512 u) {  // quarter k: s_0..s_3 (s_i = v_i + v_(i+4)) of the k-th row
    return _mm512_add_ps(_mm512_shuffle_f32x4(z, u, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(z, u, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const __m512 s = quarters(halves(a0, a1), halves(a2, a3)), s2 = quarters(halves(a4, a5), halves(a6, a7));
  // quarter k: [s0 + s2, s1 + s3] of row k, then of row k + 4
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s, s2, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(s, s2, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, _MM_SHUFFLE(2, 3, 0, 1)));  // lanes 4k, 4k + 2
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, y));
}

// out[r][m] = the lane sum of acc[r][m] (fold16 + i8_hsum's value): eight accumulators per sum8 where
// there are a multiple of eight (8 activation rows), else one by one.
template <int NR, int M>
inline void wide_sums(const __m512 (&acc)[NR][M], float (&out)[NR][M]) {
  constexpr int T = NR * M;
  auto at = [&](int i) { return acc[i / M][i % M]; };
  if constexpr (T % 8 == 0) {
    LF_UNROLL
    for (int i = 0; i < T; i += 8) {
      alignas(32) float y[8];
      _mm256_store_ps(y, sum8(at(i), at(i + 1), at(i + 2), at(i + 3), at(i + 4), at(i + 5), at(i + 6), at(i + 7)));
      LF_UNROLL
      for (int j = 0; j < 8; ++j) out[(i + j) / M][(i + j) % M] = y[j];
    }
  } else {
    LF_UNROLL
    for (int i = 0; i < T; ++i) {
      const __m512 v = at(i);
      out[i / M][i % M] =
          i8_hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
  }
}

// Whole 512-column spans (I8Args::spans: group 32), added into acc[r][m] (zero points, a last 32
// columns: nib_finish / nib_tail, as for the 128-column steps).
//
// Why: the 128-column step below spends, per activation row, two vpdpbusd, a multiply of the activation
// by the weight scales and an FMA per 128 columns, and on Zen 5 those share two pipes; a span's 16 blocks
// of 32 columns fill one register's 16 lanes exactly when lane L holds block b(L)'s whole integer sum:
// then a row takes 8 vpdpbusd, one multiply and one FMA per 512 columns (10 pipe ops instead of 16).
// The weights keep Int4Linear's row layout: a 4 x 4 dword transpose of the span's four 64-byte vectors
// (8 unpacks, once per weight row, shared by all activation rows) gives vector j = dword j of every
// 16-byte block, lane L = 4k + s <- block b = 4s + k (vector s, 128-bit lane k); the activations were
// laid out to match (act_quant.h to_span_layout), with each lane's offset sum `so` and scale `sd`.
// High nibbles stay in place (16 x the code, one AND instead of a shift and an AND: the shift pipes are
// the ones the transpose loads, 4 fewer ops per span), the low nibbles' sums times 16 join them, and sd
// holds d / 16: 16 v converted is exactly 16 x v's float and d / 16 x w exactly (d x w) / 16, so the FMA
// gets the same product and every result is the same bit for bit (L2-resident one-thread GEMV on Zen 4:
// 0.95-0.96x the time at 1,536-2,048 columns, 1.0x at 576; docs/BENCHMARKS.md session 24).
// kCoded: the weight scales are 8-bit codes looked up in a.lut (the same fp32 values as the arrays).
// Zero points (a.zeros, or codes): lane L's z * (its group's activation sum, a.sx), one FMA per row pair
// and span, instead of nib_finish's pass over the groups after the loop (~a third of a 576-column row's
// work per activation row).
template <int NR, int M, bool kCoded, bool kHalf>
inline void span_rows(const I8Args& a, int64_t n, const uint8_t* __restrict const (&w)[NR], const float* const (&sc)[NR],
                      const uint8_t* const (&scc)[NR], const uint16_t* const (&sh)[NR], __m512 (&acc)[NR][M]) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // b(L)
  const int64_t stride = 16 * a.spans, G = a.K / 32;  // so / sd / sx row stride; groups of a weight row
  const bool zeros = kCoded || a.zeros || a.zeros_h;
  for (int64_t s = 0; s < a.spans; ++s) {
    __m512i lo[NR][4], hi[NR][4];
    __m512 ws[NR], zs[NR];  // block b(L)'s weight scale, zero point in lane L
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      const uint8_t* p = w[r] + 256 * s;
      LF_UNROLL
      for (int q = 0; q < 4; ++q) i8_prefetch<kI8AheadNib>(w[r], 256 * s + 64 * q);
      const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 64);
      const __m512i v2 = _mm512_loadu_si512(p + 128), v3 = _mm512_loadu_si512(p + 192);
      const __m512i t0 = _mm512_unpacklo_epi32(v0, v1), t1 = _mm512_unpackhi_epi32(v0, v1);
      const __m512i t2 = _mm512_unpacklo_epi32(v2, v3), t3 = _mm512_unpackhi_epi32(v2, v3);
      const __m512i tr[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2), _mm512_unpacklo_epi64(t1, t3),
                             _mm512_unpackhi_epi64(t1, t3)};
      LF_UNROLL
      for (int j = 0; j < 4; ++j)
        lo[r][j] = _mm512_and_si512(tr[j], mask), hi[r][j] = _mm512_andnot_si512(mask, tr[j]);  // hi: 16 x code
      if constexpr (kCoded) {
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scc[r] + 16 * s)));
        ws[r] = _mm512_i32gather_ps(_mm512_permutexvar_epi32(order, codes), a.lut, 4);
        // z = lut[256 + zc] * s rounded to fp32, as the fp32 arrays hold it (nib_finish)
        const __m512i zc = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zc + (n + r) * G + 16 * s)));
        zs[r] = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_permutexvar_epi32(order, zc), a.lut + 256, 4), ws[r]);
        asm("" : "+v"(zs[r]));  // no FMA contraction into the zero FMA below
      } else {
        ws[r] = _mm512_permutexvar_ps(order, kHalf ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sh[r] + 16 * s)))
                                                   : _mm512_loadu_ps(sc[r] + 16 * s));
        if (zeros)
          zs[r] = _mm512_permutexvar_ps(
              order, kHalf && a.zeros_h ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.zeros_h + (n + r) * G + 16 * s)))
                                        : _mm512_loadu_ps(a.zeros + (n + r) * G + 16 * s));
      }
    }
    LF_UNROLL
    for (int m = 0; m < M; ++m) {  // each activation vector loaded once for the NR weight rows
      const int8_t* x = a.xq + m * a.Kx + 512 * s;
      const __m512i o = _mm512_loadu_si512(a.so + m * stride + 16 * s);
      // per row two chains of four (lo, hi nibbles), the offset sums starting one
      __m512i even[NR], odd[NR];
      LF_UNROLL
      for (int r = 0; r < NR; ++r) even[r] = o, odd[r] = _mm512_setzero_si512();
      LF_UNROLL
      for (int j = 0; j < 4; ++j) {
        const __m512i xl = _mm512_load_si512(x + 128 * j), xh = _mm512_load_si512(x + 128 * j + 64);
        LF_UNROLL
        for (int r = 0; r < NR; ++r)
          even[r] = _mm512_dpbusd_epi32(even[r], lo[r][j], xl), odd[r] = _mm512_dpbusd_epi32(odd[r], hi[r][j], xh);
      }
      const __m512 d = _mm512_loadu_ps(a.sd + m * stride + 16 * s);
      LF_UNROLL
      for (int r = 0; r < NR; ++r)
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(even[r], 4), odd[r])),
                                    _mm512_mul_ps(d, ws[r]), acc[r][m]);
      if (zeros) {
        const __m512 xs = _mm512_loadu_ps(a.sx + m * stride + 16 * s);
        LF_UNROLL
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(zs[r], xs, acc[r][m]);
      }
    }
  }
}

// Weight rows n..n+NR-1 against the M activation rows (wide layout), int4, into out[r][m]. Inlined into
// rows_mp's loop: out of line, its set-up (row pointers, constants) ran once per NR rows (a sixth of the
// samples of a 576-column GEMV; 1.02-1.11x the time at one row on Zen 4, in L2 and streamed).
template <int NR, int M, class D, Groups S, bool kHalf = false>
__attribute__((always_inline)) inline void wide_rows(const I8Args& a, const XPack& p, int64_t n, float (&out)[NR][M]) {
  static_assert(layout(S) == Groups::k32 || layout(S) == Groups::k64n, "the wide loop takes groups of 32 / 64n");
  constexpr bool kCoded = coded(S);
  const int64_t Kh = a.K / 2, G = a.K / a.group, cpg = a.group / 64, chunks = a.K / 64;
  const uint8_t* __restrict w[NR];
  const float* sc[NR];
  const uint8_t* scc[NR];  // coded: the row's scale codes [G], looked up in a.lut
  const uint16_t* sh[NR];   // kHalf: the row's fp16 scales [G] (the fp32 ones for tails and zero points)
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const uint8_t*>(a.w) + (n + r) * Kh;
    sc[r] = kCoded || kHalf ? nullptr : a.scales + (n + r) * G;
    scc[r] = kCoded ? a.sc + (n + r) * G : nullptr;
    sh[r] = kHalf ? a.scales_h + (n + r) * G : nullptr;
  }
  const float* lut = a.lut;
  auto scale = [&](int r, int64_t j) { return kCoded ? lut[scc[r][j]] : kHalf ? _cvtsh_ss(sh[r][j]) : sc[r][j]; };
  constexpr bool kP = M >= kPackRows;
  const int8_t* xr[M];
  const float* dr[M];
  const int32_t* orow[M];
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    xr[m] = kP ? p.x + 128 * m : p.x + m * a.Kx;
    dr[m] = kP ? p.d + 16 * m : p.d + m * (a.Kx / 8);
    orow[m] = kP ? p.o + 16 * m : p.o + m * (a.Kx / 8);
  }
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[NR][M];
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t g = 0, left = cpg;  // k64n: the group of chunk c, its chunks still ahead
  int64_t c = 0;
  if constexpr (layout(S) == Groups::k32)
    if (a.spans > 0) span_rows<NR, M, kCoded, kHalf>(a, n, w, sc, scc, sh, acc), c = 8 * a.spans;  // the lanes' total: the same sum
  for (; c + 1 < chunks; c += 2) {  // one 128-column superchunk: 64 weight bytes per row
    int64_t g2 = g;  // k64n: the group of chunk c + 1
    if (layout(S) == Groups::k64n && left == 1) g2 = g + 1;
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      i8_prefetch<kI8AheadNib>(w[r], 32 * c);
      const __m512i v = _mm512_loadu_si512(w[r] + 32 * c);
      const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      __m512 ws;  // blocks 2c .. 2c + 3's weight scales, each in 4 lanes
      if constexpr (S == Groups::k32 && kHalf)
        ws = _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sh[r] + 2 * c)))));
      else if constexpr (S == Groups::k32)
        ws = _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(_mm_loadu_ps(sc[r] + 2 * c)));
      else if constexpr (S == Groups::k32Coded)
        ws = _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(_mm_setr_ps(
                                              scale(r, 2 * c), scale(r, 2 * c + 1), scale(r, 2 * c + 2), scale(r, 2 * c + 3))));
      else
        ws = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(scale(r, g))),
                                                 _mm256_castps_pd(_mm256_set1_ps(scale(r, g2))), 1));
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xr[m] + (kP ? 64 * M : 64) * c;
        // the chunks' offset lanes start the sums: lane l covers 8 columns, as xc's lanes of chunks c, c + 1
        const __m512i o = _mm512_loadu_si512(orow[m] + (kP ? 8 * M : 8) * c);
        const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(o, lo, _mm512_loadu_si512(x)), hi, _mm512_loadu_si512(x + 64));
        const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(dr[m] + (kP ? 8 * M : 8) * c), ws);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[r][m]);
      }
    }
    if (layout(S) == Groups::k64n)
      for (int k = 0; k < 2; ++k)
        if (--left == 0) ++g, left = cpg;
  }
  // Zero points the loops take themselves: the spans' groups, and when the spans are followed by just one
  // odd 64-column chunk (SmolLM2's 576 columns) its two groups too: then no nib_finish pass is left.
  const bool zeros = kCoded || a.zeros || a.zeros_h;
  const bool tail_zeros = layout(S) == Groups::k32 && zeros && a.spans > 0 && chunks == 8 * a.spans + 1 && a.K % 64 == 0;
  const int64_t zeros_done = layout(S) == Groups::k32 ? 16 * a.spans + (tail_zeros ? 2 : 0) : 0;
  if (c < chunks) {  // an odd last 64-column chunk, in the chunk layout: [lo | hi] x [evens | odds] in one step
    const __m512i mask_hi = _mm512_set1_epi8(0x0F);
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    // v[0], v[1] in lanes 0 and 4 (blocks 2c and 2c + 1: lanes 0-3 / 4-7 are theirs), zero elsewhere
    auto two = [&](const float* v) {
      return _mm512_maskz_permutexvar_ps(0x11, pair, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(v)))));
    };
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + 32 * c)));
      const __m512i lohi = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), mask_hi);
      const __m256 ws8 = kHalf ? i8_chunk_scales_half(sh[r], c) : i8_chunk_scales<S>(sc[r], scc[r], lut, c, g, a.group / 32);
      const __m512 ws = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(ws8)),
                                                            _mm256_castps_pd(ws8), 1));
      __m512 zs = _mm512_setzero_ps();  // tail_zeros: z of blocks 2c, 2c + 1 in lanes 0, 4
      if (tail_zeros) {
        alignas(8) float z[2];
        for (int k = 0; k < 2; ++k) {
          float zk = kCoded                 ? lut[256 + a.zc[(n + r) * G + 2 * c + k]] * scale(r, 2 * c + k)
                     : kHalf && a.zeros_h ? _cvtsh_ss(a.zeros_h[(n + r) * G + 2 * c + k])
                                          : a.zeros[(n + r) * G + 2 * c + k];
          asm("" : "+x"(zk));  // rounded to fp32 as the arrays hold it (nib_finish)
          z[k] = zk;
        }
        zs = two(z);
      }
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const int8_t* x = kP ? p.x + 64 * (c * M + m) : xr[m] + 64 * c;
        const int32_t* op = kP ? p.o + 8 * (c * M + m) : orow[m] + 8 * c;
        const float* dp = kP ? p.d + 8 * (c * M + m) : dr[m] + 8 * c;
        // lanes 0-7: evens x low nibbles + the offset lanes, 8-15: odds x high nibbles; the fold adds them
        const __m512i o = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(op)));
        const __m512i sum = _mm512_dpbusd_epi32(o, lohi, _mm512_loadu_si512(x));
        const __m512 d = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(dp))));
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, ws), acc[r][m]);
        if (tail_zeros) acc[r][m] = _mm512_fmadd_ps(zs, two(a.xs + m * G + 2 * c), acc[r][m]);
      }
    }
  }
  // symmetric codes (GGUF Q4_0), or every zero point taken above: the sums are the results, but a last
  // 32 columns
  if (!zeros || zeros_done == G) {
    wide_sums(acc, out);
    if (a.K % 64)
      LF_UNROLL
      for (int r = 0; r < NR; ++r)
        LF_UNROLL
        for (int m = 0; m < M; ++m) out[r][m] += nib_tail<false>(a, w[r], 0, scale(r, G - 1), m);
    return;
  }
  __m256 acc8[NR][M];  // the 16 lanes folded to nib_finish's 8 (lanes l and l + 8: the same block slot)
  fold16(acc, acc8);
  nib_finish<NR, M, S, false>(a, n, acc8, out);
}


// int8 weights, rows n..n+NR-1 into out[r][m], 64 columns (two 32-column blocks) per 512-bit step:
// the same sums as q8_rows_nr (|w| as u8 against x carrying w's sign; AVX-512 has no vpsignb, so a
// mask of w's sign bits subtracts x from zero), lanes 0-7 block b, 8-15 block b + 1. kGrouped: a scale
// per group of 32 or 64n columns; else one per row. An odd last block takes the 256-bit step, a
// partial last block q8_rows_nr's scalar one.
template <int NR, int M, class D, bool kGrouped>
inline void wide_q8_rows(const I8Args& a, int64_t n, float (&out)[NR][M]) {
  const int64_t blocks = a.K / 32, nb = a.Kx / 32;
  const int64_t per_group = kGrouped ? a.group / 32 : 1, G = kGrouped ? (a.K + a.group - 1) / a.group : 1;
  const int8_t* __restrict w[NR];
  const float* sc[NR];
  LF_UNROLL
  for (int r = 0; r < NR; ++r) w[r] = static_cast<const int8_t*>(a.w) + (n + r) * a.K, sc[r] = a.scales + (kGrouped ? (n + r) * G : n + r);
  const int8_t* xr[M];
  const float* dr[M];
  LF_UNROLL
  for (int m = 0; m < M; ++m) xr[m] = a.xq + m * a.Kx, dr[m] = a.dv + m * nb;
  const __m512i pairs = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i zero = _mm512_setzero_si512();
  auto two = [&](const float* p) {  // p[0] in lanes 0-7, p[1] in lanes 8-15
    return _mm512_permutexvar_ps(pairs, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))));
  };
  __m512 acc[NR][M];
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t b = 0, g = 0, left = per_group;  // grouped: block b's group, its blocks still ahead
  for (; b + 1 < blocks; b += 2) {
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      i8_prefetch(w[r], 32 * b);
      const __m512i v = _mm512_loadu_si512(w[r] + 32 * b);
      const __m512i av = _mm512_abs_epi8(v);  // -128 -> 0x80 = 128 as u8
      const __mmask64 neg = _mm512_movepi8_mask(v);
      __m512 ws = _mm512_set1_ps(1.f);
      if constexpr (kGrouped)
        ws = per_group == 1 ? two(sc[r] + b)
                            : _mm512_set1_ps(sc[r][g]);  // groups of 64n: both blocks in group g
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const __m512i x = _mm512_loadu_si512(xr[m] + 32 * b);
        const __m512i s = _mm512_dpbusd_epi32(zero, av, _mm512_mask_sub_epi8(x, neg, zero, x));
        const __m512 d = two(dr[m] + b);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), kGrouped ? _mm512_mul_ps(d, ws) : d, acc[r][m]);
      }
    }
    if (kGrouped && per_group > 1 && (left -= 2) == 0) ++g, left = per_group;
  }
  float y[NR][M];
  __m256 acc8[NR][M];
  if (b == blocks) {  // an even number of blocks: eight sums at a time
    wide_sums(acc, y);
  } else {
    fold16(acc, acc8);
  }
  if (b < blocks) {  // an odd last block
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + 32 * b));
      const __m256i av = _mm256_abs_epi8(v);
      const __m256 ws = _mm256_set1_ps(kGrouped ? sc[r][b / per_group] : 1.f);
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + 32 * b));
        const __m256i s = D::dot(av, _mm256_sign_epi8(x, v));
        const __m256 d = _mm256_set1_ps(dr[m][b]);
        acc8[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), kGrouped ? _mm256_mul_ps(d, ws) : d, acc8[r][m]);
      }
    }
    LF_UNROLL
    for (int r = 0; r < NR; ++r)
      LF_UNROLL
      for (int m = 0; m < M; ++m) y[r][m] = i8_hsum(acc8[r][m]);
  }
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      if (a.K % 32) {  // partial last block: scalar, exact in int
        int32_t t = 0;
        for (int64_t k = 32 * blocks; k < a.K; ++k) t += xr[m][k] * w[r][k];
        y[r][m] += static_cast<float>(t) * (kGrouped ? sc[r][(32 * blocks) / a.group] : 1.f) * dr[m][blocks];
      }
      out[r][m] = kGrouped ? y[r][m] : y[r][m] * sc[r][0];
    }
  }
}

// int8 weights, group 32, K a multiple of 32 (I8Args::spans > 0: the activations in the span layout of
// act_quant.h to_q8_span_layout), rows n..n+NR-1 into out[r][m], 256 columns per step.
//
// Why: wide_q8_rows spends, per weight row, activation row and 64 columns, a vpdpbusd, the sign moved
// onto x, the two blocks' scale product, a convert and an FMA: at 8 rows the LM head (49152 x 576) cost
// ~4x its one-row time, most of a verification row. Here a 4 x 4 dword transpose of the weight row's
// four 64-byte vectors (once per weight row, shared by all activation rows) puts in lane L = 4k + s the
// dwords of one 16-column group g = 4s + k (half a block): per activation row four vpdpbusd sum each
// lane's group exactly, then one convert, one multiply and one FMA take 256 columns. vpdpbusd wants one
// unsigned operand: the activations come as code + 128, and the weight row's 128 * sum per group
// (4 vpdpbusd, shared by the rows) starts each sum negated. Columns past K load as zeros (weights) /
// 128 (activations): nothing.
template <int NR, int M, bool kHalf = false>
inline void q8_span_rows(const I8Args& a, int64_t n, float (&out)[NR][M]) {
  const int64_t spans = a.spans, G = a.K / 32;
  const int8_t* __restrict w[NR];
  const float* sc[NR];
  const uint16_t* sh[NR];  // kHalf: the row's fp16 scales (Q8I8::add_half)
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    w[r] = static_cast<const int8_t*>(a.w) + (n + r) * a.K, sc[r] = a.scales + (n + r) * G,
    sh[r] = kHalf ? a.scales_h + (n + r) * G : nullptr;
  const uint8_t* xu = reinterpret_cast<const uint8_t*>(a.xq);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i block = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);  // g(L) / 2
  __m512 acc[NR][M];
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t left = a.K - 256 * s;  // columns of this span still in the row (a last span: < 256)
    __m512i tr[NR][4], neg[NR];
    __m512 ws[NR];
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = w[r] + 256 * s;
      __m512i v[4];
      if (left >= 256) {
        LF_UNROLL
        for (int q = 0; q < 4; ++q) i8_prefetch(w[r], 256 * s + 64 * q), v[q] = _mm512_loadu_si512(p + 64 * q);
        ws[r] = _mm512_permutexvar_ps(
            block, _mm512_castps256_ps512(kHalf ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sh[r] + 8 * s)))
                                                : _mm256_loadu_ps(sc[r] + 8 * s)));
      } else {
        LF_UNROLL
        for (int q = 0; q < 4; ++q) {
          const int64_t bytes = left - 64 * q;
          const __mmask64 k = bytes >= 64 ? ~__mmask64{0} : bytes > 0 ? (__mmask64{1} << bytes) - 1 : 0;
          v[q] = _mm512_maskz_loadu_epi8(k, p + 64 * q);
        }
        const __mmask8 k8 = static_cast<__mmask8>((1u << (left / 32)) - 1);
        ws[r] = _mm512_permutexvar_ps(
            block, _mm512_castps256_ps512(kHalf ? _mm256_cvtph_ps(_mm_maskz_loadu_epi16(k8, sh[r] + 8 * s))
                                                : _mm256_maskz_loadu_ps(k8, sc[r] + 8 * s)));
      }
      const __m512i t0 = _mm512_unpacklo_epi32(v[0], v[1]), t1 = _mm512_unpackhi_epi32(v[0], v[1]);
      const __m512i t2 = _mm512_unpacklo_epi32(v[2], v[3]), t3 = _mm512_unpackhi_epi32(v[2], v[3]);
      tr[r][0] = _mm512_unpacklo_epi64(t0, t2), tr[r][1] = _mm512_unpackhi_epi64(t0, t2);
      tr[r][2] = _mm512_unpacklo_epi64(t1, t3), tr[r][3] = _mm512_unpackhi_epi64(t1, t3);
      __m512i c = _mm512_setzero_si512();
      LF_UNROLL
      for (int j = 0; j < 4; ++j) c = _mm512_dpbusd_epi32(c, bias, tr[r][j]);
      neg[r] = _mm512_sub_epi32(_mm512_setzero_si512(), c);
    }
    LF_UNROLL
    for (int m = 0; m < M; ++m) {  // each activation vector loaded once for the NR weight rows
      const uint8_t* x = xu + m * a.Kx + 256 * s;
      __m512i xv[4];
      LF_UNROLL
      for (int j = 0; j < 4; ++j) xv[j] = _mm512_loadu_si512(x + 64 * j);
      const __m512 d = _mm512_loadu_ps(a.sd + m * 16 * spans + 16 * s);
      LF_UNROLL
      for (int r = 0; r < NR; ++r) {
        __m512i t = neg[r];
        LF_UNROLL
        for (int j = 0; j < 4; ++j) t = _mm512_dpbusd_epi32(t, xv[j], tr[r][j]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(d, ws[r]), acc[r][m]);
      }
    }
  }
  wide_sums(acc, out);
}

}  // namespace
}  // namespace leanformer
