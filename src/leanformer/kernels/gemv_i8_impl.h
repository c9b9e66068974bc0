// The int8-activation GEMV loops, written once over a dot-product policy `D` and included by each
// instruction-set translation unit (gemv_i8.cpp: AVX2; gemv_avxvnni.cpp / gemv_avx512vnni.cpp, through
// gemv_vnni.h: AVX-VNNI / AVX-512 VNNI).
// Everything here has internal linkage (anonymous namespace), so no copy compiled for VNNI can be
// picked by the linker for the AVX2 callers (see int8_act.h). Include <immintrin.h> (after the target
// pragma, if any) and int8_act.h first; define LF_I8_NS to the namespace whose q4_rows / q8_rows / q5_rows to
// emit and LF_I8_DOT to the policy type.
//
// The policy gives 8 int32 lanes, lane l = sum over bytes 4l..4l+3 of u8 * s8 products:
//   dot(u, s)            one 32-byte pair
//   dot2(u1, s1, u2, s2) two pairs summed
// AVX2 builds it from maddubs (u8 x s8 -> int16 pair sums) + madd with ones; VNNI has it in one
// instruction (vpdpbusd). Both are exact here: int4 codes 0..15 x |xq| <= 127 keep maddubs' int16 sums
// (even two of them added) far from saturation, and int8 weights enter as |w| (u8, at most 128) with
// the weight's sign moved onto the activation (sign_epi8), so 2 * 128 * 127 < 32767.
//
// Math per output: y = sum_blocks d_b * s_g * (sum_k xq_k q_k) + sum_g (z_g - 8 s_g) * xs_g for int4
// (w = (q - 8) s + z: the -8 and the zero point only need the activation sum of the group), and
// y = s_n * sum_b d_b * (sum_k xq_k w_k) (per row) or sum_b d_b s_g (...) (group-wise) for int8.

namespace leanformer {
namespace {

inline float i8_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void i8_prefetch(const void* row, int64_t off) {
  if (LF_PREFETCH > 0 && (off & 63) == 0) _mm_prefetch(static_cast<const char*>(row) + off + LF_PREFETCH, _MM_HINT_T0);
}

// Independent accumulator chains per activation row: one FMA per 32 or 64 weights on a single chain
// would wait on the FMA latency (4-5 cycles) every step at M = 1. The same count for every M, so a
// row's float sum order, hence its result bit for bit, does not depend on how many rows the call has
// (speculative verification runs k+1 rows through the GEMV plain decoding runs one row at a time:
// greedy identity needs equal logits). 2 chains x at most kPassRows rows = 8 accumulators stay in
// registers; more rows run as further passes over the same weight row while it is in L1.
constexpr int kI8Chains = 2;
constexpr int kPassRows = 4;
template <int M>
constexpr int i8_chains() {
  return kI8Chains;
}

// The loop both kernels share: acc = 0, then step(i, u) for i in [0, n) in order, step i feeding
// chain u = i % A (the remainder all into chain 0); i8_chain_sum adds the chains up. Always inlined:
// GCC keeps acc in registers only where every index is a constant (see LF_UNROLL).
template <int M, int A, class Step>
__attribute__((always_inline)) inline void i8_run_chains(int64_t n, __m256 (&acc)[M][A], const Step& step) {
  LF_UNROLL
  for (int m = 0; m < M; ++m)
    LF_UNROLL
    for (int u = 0; u < A; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + A <= n; i += A) {
    LF_UNROLL
    for (int u = 0; u < A; ++u) step(i + u, u);
  }
  for (; i < n; ++i) step(i, 0);
}

// sum over the chains of row m
template <int M, int A>
__attribute__((always_inline)) inline __m256 i8_chain_sum(const __m256 (&acc)[M][A], int m) {
  __m256 t = acc[m][0];
  LF_UNROLL
  for (int u = 1; u < A; ++u) t = _mm256_add_ps(t, acc[m][u]);
  return t;
}

// How the weight groups fall on 64-column chunks (one chunk = blocks 2c and 2c+1 of 32 columns):
// group 32 | a multiple of 64 | an odd multiple of 32 >= 96; the *Coded twins take 8-bit scale codes
// (I8Args::sc / zc / lut) and look the table up inside q4_row's loops, with the same fp32 values and
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

template <int M, class D, Groups S>
inline void q4_row(const I8Args& a, int64_t n, float* out) {
  constexpr int A = i8_chains<M>();
  const int64_t Kh = a.K / 2, G = a.K / a.group, bpg = a.group / 32, cpg = a.group / 64;
  const uint8_t* __restrict w = static_cast<const uint8_t*>(a.w) + n * Kh;
  constexpr bool kCoded = coded(S);
  const float* sc = kCoded ? nullptr : a.scales + n * G;
  const float* zr = !kCoded && a.zeros ? a.zeros + n * G : nullptr;  // null: symmetric codes (GGUF Q4_0)
  const uint8_t* scc = kCoded ? a.sc + n * G : nullptr;              // coded: the row's codes [G]
  const uint8_t* zcc = kCoded ? a.zc + n * G : nullptr;
  const float* lut = a.lut;
  auto scale = [&](int64_t j) { return kCoded ? lut[scc[j]] : sc[j]; };
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t chunks = a.K / 64;
  __m256 acc[M][A];
  int64_t g = 0, left = cpg;  // k64n: the group of the next chunk, its chunks still ahead
  // one 64-column chunk (32 weight bytes) into chain u
  auto chunk = [&](int64_t c, int u) __attribute__((always_inline)) {
    i8_prefetch(w, 32 * c);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
    const __m256i lo = _mm256_and_si256(v, mask);                        // even columns
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);  // odd columns
    const __m256 ws = i8_chunk_scales<S>(sc, scc, lut, c, g, bpg);
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      const int8_t* x = a.xq + m * a.Kx + 64 * c;
      const __m256i s = D::dot2(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), hi,
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
      const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(a.dv + m * a.Kx / 8 + 8 * c), ws);
      acc[m][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[m][u]);
    }
    if (layout(S) == Groups::k64n && --left == 0) ++g, left = cpg;
  };
  i8_run_chains<M, A>(chunks, acc, chunk);
  // The -8 of the codes and the zero points: sum_g (z_g - 8 s_g) * xs_g, eight groups per vector. (A
  // scalar loop here was one serial FMA chain per row, ~4 cycles per group: it measured a third of the
  // time of a 576-column row.)
  const __m256 minus8 = _mm256_set1_ps(-8.f);
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    __m256 t8 = i8_chain_sum<M, A>(acc, m);
    const float* xs = a.xs + m * G;
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) {
      __m256 off;
      if constexpr (kCoded) {  // exactly as the fp32 arrays were made: z = lut[256 + zc] * s, stored as fp32
        const __m256 s8 = i8_lut8(lut, scc + j);
        __m256 z8 = _mm256_mul_ps(i8_lut8(lut + 256, zcc + j), s8);
        asm("" : "+x"(z8));  // z rounded to fp32 (no FMA contraction into the add)
        off = _mm256_add_ps(_mm256_mul_ps(s8, minus8), z8);
      } else {
        off = _mm256_mul_ps(_mm256_loadu_ps(sc + j), minus8);
        if (zr) off = _mm256_add_ps(off, _mm256_loadu_ps(zr + j));
      }
      t8 = _mm256_fmadd_ps(off, _mm256_loadu_ps(xs + j), t8);
    }
    float r = i8_hsum(t8);
    for (; j < G; ++j) {
      const float s = scale(j);
      float z = kCoded ? lut[256 + zcc[j]] * s : zr ? zr[j] : 0.f;
      asm("" : "+x"(z));  // as above
      r += (z - 8.f * s) * xs[j];
    }
    if (a.K % 64) {  // a last 32 columns (in the last group), natural order: scalar, exact in int
      const int64_t b0 = 32 * chunks;
      const int8_t* x = a.xq + m * a.Kx + 2 * b0;
      int32_t t = 0;
      for (int64_t k = 0; k < 16; ++k) t += x[2 * k] * (w[b0 + k] & 15) + x[2 * k + 1] * (w[b0 + k] >> 4);
      r += static_cast<float>(t) * a.dv[m * a.Kx / 8 + 8 * chunks] * scale(G - 1);
    }
    out[m] = r;
  }
}

// kG16: one scale per 16 columns (GGUF Q6_K as Int8Linear group 16), two per 32-column block
template <int M, class D, bool kG16 = false>
inline void q8_row(const I8Args& a, int64_t n, float* out) {
  constexpr int A = i8_chains<M>();
  const int8_t* __restrict w = static_cast<const int8_t*>(a.w) + n * a.K;
  const int64_t blocks = a.K / 32, nb = a.Kx / 32;
  const bool grouped = a.group > 0;
  const int64_t per_group = grouped ? a.group / 32 : 1;
  const float* sc = a.scales + (grouped ? n * ((a.K + a.group - 1) / a.group) : n);
  __m256 acc[M][A];
  int64_t g = 0, left = per_group;
  auto block = [&](int64_t b, int u) __attribute__((always_inline)) {
    i8_prefetch(w, 32 * b);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b));
    const __m256i av = _mm256_abs_epi8(v);  // -128 -> 0x80 = 128 as u8
    const __m256 ws = kG16 ? i8_chunk_scales<Groups::k32>(sc, nullptr, nullptr, b, 0, 1) : _mm256_set1_ps(grouped ? sc[g] : 1.f);
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + m * a.Kx + 32 * b));
      const __m256i s = D::dot(av, _mm256_sign_epi8(x, v));
      const __m256 d = _mm256_set1_ps(a.dv[m * nb + b]);
      acc[m][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), grouped ? _mm256_mul_ps(d, ws) : d, acc[m][u]);
    }
    if (--left == 0) ++g, left = per_group;
  };
  i8_run_chains<M, A>(blocks, acc, block);
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    float r = i8_hsum(i8_chain_sum<M, A>(acc, m));
    if (a.K % 32) {  // partial last block: scalar, exact in int
      const int8_t* x = a.xq + m * a.Kx;
      int32_t t = 0, t2 = 0;  // t2: kG16's columns past the block's first 16
      for (int64_t k = 32 * blocks; k < a.K; ++k) (kG16 && k >= 32 * blocks + 16 ? t2 : t) += x[k] * w[k];
      const float s = kG16 ? sc[2 * blocks] : (grouped ? sc[(32 * blocks) / a.group] : 1.f);
      const float s2 = kG16 && t2 ? sc[2 * blocks + 1] : 0.f;
      r += (static_cast<float>(t) * s + static_cast<float>(t2) * s2) * a.dv[m * nb + blocks];
    }
    out[m] = grouped ? r : r * sc[0];
  }
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

// int5 (GGUF Q5_0, compress/int5.py): w = (q - 16) * s per 32 columns, q = low nibble | 16 * high bit,
// 0..31. Nibbles as int4's (a.w, two per byte, low = even column); a.high: per 64-column chunk two
// words in i8_high16's bit order; a last half chunk: one word in natural column order.
// Exact: maddubs pairs of 31 * 127 products, two pairs summed (dot2) stay below 32767. The -16 enters
// like int4's -8, through the activation group sums xs.
template <int M, class D>
inline void q5_row(const I8Args& a, int64_t n, float* out) {
  constexpr int A = i8_chains<M>();
  const int64_t G = a.K / 32;
  const uint8_t* __restrict w = static_cast<const uint8_t*>(a.w) + n * (a.K / 2);
  const uint32_t* hb = a.high + n * G;
  const float* sc = a.scales + n * G;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t chunks = a.K / 64;
  __m256 acc[M][A];
  auto chunk = [&](int64_t c, int u) __attribute__((always_inline)) {
    i8_prefetch(w, 32 * c);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
    __m256i lo, hi;
    i8_high16(hb, c, lo, hi);
    lo = _mm256_or_si256(_mm256_and_si256(v, mask), lo);
    hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), hi);
    const __m256 ws = i8_chunk_scales<Groups::k32>(sc, nullptr, nullptr, c, 0, 1);
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      const int8_t* x = a.xq + m * a.Kx + 64 * c;
      const __m256i s = D::dot2(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), hi,
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
      const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(a.dv + m * a.Kx / 8 + 8 * c), ws);
      acc[m][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[m][u]);
    }
  };
  i8_run_chains<M, A>(chunks, acc, chunk);
  const __m256 minus16 = _mm256_set1_ps(-16.f);
  LF_UNROLL
  for (int m = 0; m < M; ++m) {
    __m256 t8 = i8_chain_sum<M, A>(acc, m);
    const float* xs = a.xs + m * G;
    int64_t j = 0;
    for (; j + 8 <= G; j += 8)
      t8 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + j), minus16), _mm256_loadu_ps(xs + j), t8);
    float r = i8_hsum(t8);
    for (; j < G; ++j) r += -16.f * sc[j] * xs[j];
    if (a.K % 64) {  // a last 32 columns, natural order: scalar, exact in int
      const int64_t b0 = 32 * chunks;
      const int8_t* x = a.xq + m * a.Kx + 2 * b0;
      const uint32_t h = hb[G - 1];
      int32_t t = 0;
      for (int64_t k = 0; k < 16; ++k) {
        const int even = (w[b0 + k] & 15) | static_cast<int>(((h >> (2 * k)) & 1) << 4);
        const int odd = (w[b0 + k] >> 4) | static_cast<int>(((h >> (2 * k + 1)) & 1) << 4);
        t += x[2 * k] * even + x[2 * k + 1] * odd;
      }
      r += static_cast<float>(t) * a.dv[m * a.Kx / 8 + 8 * chunks] * sc[G - 1];
    }
    out[m] = r;
  }
}

// Which row function a call runs: int4 (group layout S), int8 (per row / per group, or kG16: Q6_K's two
// scales per 32-column block), int5.
enum class Kind { q4, q8, q8g16, q5 };

// Activation rows [m0, m0 + P) of one weight row n into out[m0..]: a view of a shifted by m0 rows.
template <int P, class D, Kind K, Groups S>
__attribute__((always_inline)) inline void row_pass(const I8Args& a, int64_t n, int m0, float* out) {
  constexpr bool chunked = K == Kind::q4 || K == Kind::q5;  // dv per 64-column chunk, xs per group
  I8Args b = a;
  if (m0) {
    const int64_t G = chunked ? a.K / (K == Kind::q5 ? 32 : a.group) : 0;
    b.xq = a.xq + m0 * a.Kx;
    b.dv = a.dv + m0 * (chunked ? a.Kx / 8 : a.Kx / 32);
    b.xs = chunked ? a.xs + m0 * G : a.xs;
  }
  if constexpr (K == Kind::q4)
    q4_row<P, D, S>(b, n, out + m0);
  else if constexpr (K == Kind::q5)
    q5_row<P, D>(b, n, out + m0);
  else
    q8_row<P, D, K == Kind::q8g16>(b, n, out + m0);
}

template <int M, class D, Kind K, Groups S>
inline void rows_m(const I8Args& a, int64_t n0, int64_t n1) {
  constexpr int P = M < kPassRows ? M : kPassRows;  // rows of the first pass; M > 4: a second pass
  for (int64_t n = n0; n < n1; ++n) {
    float out[M];
    row_pass<P, D, K, S>(a, n, 0, out);
    if constexpr (M > kPassRows) row_pass<M - kPassRows, D, K, S>(a, n, kPassRows, out);
    LF_UNROLL
    for (int m = 0; m < M; ++m) a.y[m * a.N + n] = out[m] + (a.bias ? a.bias[n] : 0.f);
  }
}

template <class D, Kind K, Groups S = Groups::k32>
inline void rows(const I8Args& a, int64_t n0, int64_t n1) {
  switch (a.M) {
    case 1: return rows_m<1, D, K, S>(a, n0, n1);
    case 2: return rows_m<2, D, K, S>(a, n0, n1);
    case 3: return rows_m<3, D, K, S>(a, n0, n1);
    case 4: return rows_m<4, D, K, S>(a, n0, n1);
    case 5: return rows_m<5, D, K, S>(a, n0, n1);
    case 6: return rows_m<6, D, K, S>(a, n0, n1);
    case 7: return rows_m<7, D, K, S>(a, n0, n1);
    default: return rows_m<8, D, K, S>(a, n0, n1);
  }
}

template <class D>
inline void q8_any(const I8Args& a, int64_t n0, int64_t n1) {
  if (a.group == 16) return rows<D, Kind::q8g16>(a, n0, n1);
  rows<D, Kind::q8>(a, n0, n1);
}

template <class D>
inline void q4_any(const I8Args& a, int64_t n0, int64_t n1) {
  if (a.lut) {  // 8-bit scale codes
    if (a.group == 32) return rows<D, Kind::q4, Groups::k32Coded>(a, n0, n1);
    if (a.group % 64 == 0) return rows<D, Kind::q4, Groups::k64nCoded>(a, n0, n1);
    return rows<D, Kind::q4, Groups::kOtherCoded>(a, n0, n1);
  }
  if (a.group == 32) return rows<D, Kind::q4, Groups::k32>(a, n0, n1);
  if (a.group % 64 == 0) return rows<D, Kind::q4, Groups::k64n>(a, n0, n1);
  rows<D, Kind::q4, Groups::kOther>(a, n0, n1);
}

}  // namespace

namespace LF_I8_NS {
void q4_rows(const I8Args& a, int64_t n0, int64_t n1) { q4_any<LF_I8_DOT>(a, n0, n1); }
void q8_rows(const I8Args& a, int64_t n0, int64_t n1) { q8_any<LF_I8_DOT>(a, n0, n1); }
void q5_rows(const I8Args& a, int64_t n0, int64_t n1) { rows<LF_I8_DOT, Kind::q5>(a, n0, n1); }
}  // namespace LF_I8_NS

}  // namespace leanformer
