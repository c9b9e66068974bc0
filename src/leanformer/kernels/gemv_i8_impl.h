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

// How far ahead of the loop the weight stream is prefetched. The AVX-512 VNNI build (512-bit loops)
// consumes W about twice as fast per instruction, so like gemv_avx512.cpp it looks 4x as far: on Zen 5,
// 2 threads, SmolLM2 Q4_0 (scripts/i8_rows_ab.py) the int8 head took 0.67x the time and the 120 int4
// block GEMVs 0.82x at one row (2048 bytes left one core at ~17 GB/s of the ~40 a plain sum reads).
#ifdef LF_I8_WIDE
constexpr int64_t kI8Ahead = 4 * LF_PREFETCH;
#else
constexpr int64_t kI8Ahead = LF_PREFETCH;
#endif

// The 512-bit int4 / int5 loops look half as far (the same number of weights ahead as the int8 ones):
// since one row per pass made each thread's weights one sequential stream, 8 KB ahead was too far on
// Zen 4 (SmolLM2 Q4_0 step + head 0.977-0.980x the time at 4 KB, 2 threads, scripts/i8_rows_ab.py; the
// int8 head no faster at 4 KB, the AVX2 loops no faster at 1 KB).
#ifdef LF_I8_WIDE
constexpr int64_t kI8AheadNib = kI8Ahead / 2;
#else
constexpr int64_t kI8AheadNib = kI8Ahead;
#endif

template <int64_t Ahead = kI8Ahead>
inline void i8_prefetch(const void* row, int64_t off) {
  if (Ahead > 0 && (off & 63) == 0) _mm_prefetch(static_cast<const char*>(row) + off + Ahead, _MM_HINT_T0);
}

// One float accumulator chain per (weight row n, activation row m), over the chunks in order: a row's
// sum order, hence its result bit for bit, does not depend on how many rows the call has (speculative
// verification runs k+1 rows through the GEMV plain decoding runs one row at a time: greedy identity
// needs equal logits).
// rows_mp takes one weight row per pass (the loops below take NR rows, NR = 1 there), so each thread's
// weights arrive as one sequential stream. Several rows per pass (4 at M = 1 for 4 independent chains,
// 2 at M = 2-4 to load each activation chunk once for both) were faster in L2-resident loops but
// interleave the rows' streams, and streamed from memory on Zen 4 that ran far below the memory's rate:
// one row per pass took 0.5-0.6x the time of 4 on a 1536-column int4 or int8 GEMV at M = 1 (the
// 512-bit and the AVX2 loops alike), and the fused SmolLM2 step + head 0.85x (512-bit) / 0.79x (AVX2)
// at M = 1, 0.89-0.96x at M = 2-4 (docs/BENCHMARKS.md session 20).
// From kPackRows activation rows on, rows_m first interleaves the activations per chunk ([chunk][m]
// instead of [m][chunk], XPack) so the loop reads them at constant offsets from one pointer: with M
// row pointers for the codes and M for the scales the loop ran out of registers and reloaded them
// from the stack (measured 8-11% faster at M = 5..8 on SmolLM2's shapes, 0-4% at M = 3..4). The
// int4 / int5 loops only: int8's measured faster unpacked (its scales are one float per block).
constexpr int kPackRows = 3;

// The nibble loop's activation operands: row m's 64-column chunk c (64 codes, 8 scales, 8 offset
// lanes) at x + 64 c + m a.Kx (d, o: + 8 c + m a.Kx / 8), or packed (M >= kPackRows) at x + 64 (c M + m)
// (d, o: + 8 (c M + m)).
struct XPack {
  const int8_t* x;
  const float* d;
  const int32_t* o;  // I8Args::xc
};

// The packed copy's storage: plain new[] / delete[] (no std:: container: the VNNI translation units
// include this file and must share no inline library code with the AVX2 ones, see int8_act.h).
// p: 64-byte aligned, so each 64-byte activation / scale load of the 512-bit loops is one cache line
// (new[] gives 16: most loads then straddled two lines).
struct I8Buf {
  int8_t* raw = nullptr;
  int8_t* p = nullptr;
  I8Buf() = default;
  I8Buf(const I8Buf&) = delete;
  I8Buf& operator=(const I8Buf&) = delete;
  ~I8Buf() { delete[] raw; }
  int8_t* alloc(int64_t bytes) {
    raw = new int8_t[bytes + 63];
    p = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t{63});
    return p;
  }
};

// Rows [0, M) of a's chunks as the nibble loops read them: unpacked, or (M >= kPackRows) per group of
// G chunks (1: nib_rows; 2: gemv_i8_wide.h's 128-column superchunks) [m][64 G codes], the scales and
// then the offset lanes after all codes the same way ([m][8 G]); chunks past the last whole group one at
// a time.
template <int M, int G = 1>
inline XPack i8_pack(const I8Args& a, I8Buf& buf) {
  if constexpr (M < kPackRows) {
    return {a.xq, a.dv, a.xc};
  } else {
    const int64_t chunks = a.K / 64;
    int8_t* xb = buf.alloc(chunks * M * (64 + 32 + 32));
    float* db = reinterpret_cast<float*>(xb + chunks * M * 64);
    int32_t* ob = reinterpret_cast<int32_t*>(db + chunks * M * 8);
    for (int64_t c = 0; c < chunks;) {
      const int g = c + G <= chunks ? G : 1;
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const int8_t* x = a.xq + m * a.Kx + 64 * c;
        const float* d = a.dv + m * (a.Kx / 8) + 8 * c;
        const int32_t* o = a.xc + m * (a.Kx / 8) + 8 * c;
        int8_t* to = xb + (c * M + g * m) * 64;
        float* dt = db + (c * M + g * m) * 8;
        int32_t* ot = ob + (c * M + g * m) * 8;
        for (int i = 0; i < g; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 64 * i),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * i)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 64 * i + 32),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * i + 32)));
          _mm256_storeu_ps(dt + 8 * i, _mm256_loadu_ps(d + 8 * i));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ot + 8 * i),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + 8 * i)));
        }
      }
      c += g;
    }
    return {xb, db, ob};
  }
}

}  // namespace
}  // namespace leanformer

#include "gemv_i8_nib.h"  // Groups, nib_rows: the int4 / int5 loops
#ifdef LF_I8_WIDE
#include "gemv_i8_wide.h"  // wide_rows: the int4 loop on 512-bit vectors (AVX-512 VNNI)
#endif

namespace leanformer {
namespace {

// int8 weights, rows n..n+NR-1 into out[r][m]. kG16: one scale per 16 columns (GGUF Q6_K as
// Int8Linear group 16), two per 32-column block.
template <int NR, int M, class D, bool kG16 = false, bool kHalf = false>
inline void q8_rows_nr(const I8Args& a, int64_t n, float (&out)[NR][M]) {
  const int64_t blocks = a.K / 32, nb = a.Kx / 32;
  const bool grouped = a.group > 0;
  const int64_t per_group = grouped ? a.group / 32 : 1;
  const int8_t* __restrict w[NR];
  const float* sc[NR];
  const uint16_t* hs[NR];  // kHalf (group 32): the row's fp16 scales (I8Args::scales_h)
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const int8_t*>(a.w) + (n + r) * a.K;
    const int64_t at = grouped ? (n + r) * ((a.K + a.group - 1) / a.group) : n + r;
    sc[r] = kHalf ? nullptr : a.scales + at;
    hs[r] = kHalf ? a.scales_h + at : nullptr;
  }
  // kHalf: each scale converted where it is used (fp16 -> fp32 is exact): at one row the halved scale
  // bytes make it 0.84-0.94x the fp32 arrays' time. (At 4-8 rows SmolLM2's int8 head took ~1.05x the fp32
  // arrays' time on Zen 4 either way, widening each row's scales into an fp32 buffer first or not:
  // docs/BENCHMARKS.md session 26.)
  auto scale = [&](int r, int64_t j) { return kHalf ? _cvtsh_ss(hs[r][j]) : sc[r][j]; };
  const int8_t* xr[M];  // activation row m's codes and block scales
  const float* dr[M];
  LF_UNROLL
  for (int m = 0; m < M; ++m) xr[m] = a.xq + m * a.Kx, dr[m] = a.dv + m * nb;
  __m256 acc[NR][M];
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t g = 0, left = per_group;
  for (int64_t b = 0; b < blocks; ++b) {
    LF_UNROLL
    for (int r = 0; r < NR; ++r) {
      i8_prefetch(w[r], 32 * b);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + 32 * b));
      const __m256i av = _mm256_abs_epi8(v);  // -128 -> 0x80 = 128 as u8
      const __m256 ws =
          kG16 ? i8_chunk_scales<Groups::k32>(sc[r], nullptr, nullptr, b, 0, 1) : _mm256_set1_ps(grouped ? scale(r, g) : 1.f);
      LF_UNROLL
      for (int m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[m] + 32 * b));
        const __m256i s = D::dot(av, _mm256_sign_epi8(x, v));
        const __m256 d = _mm256_set1_ps(dr[m][b]);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), grouped ? _mm256_mul_ps(d, ws) : d, acc[r][m]);
      }
    }
    if (--left == 0) ++g, left = per_group;
  }
  LF_UNROLL
  for (int r = 0; r < NR; ++r) {
    LF_UNROLL
    for (int m = 0; m < M; ++m) {
      float y = i8_hsum(acc[r][m]);
      if (a.K % 32) {  // partial last block: scalar, exact in int
        const int8_t* x = a.xq + m * a.Kx;
        int32_t t = 0, t2 = 0;  // t2: kG16's columns past the block's first 16
        for (int64_t k = 32 * blocks; k < a.K; ++k) (kG16 && k >= 32 * blocks + 16 ? t2 : t) += x[k] * w[r][k];
        const float s = kG16 ? sc[r][2 * blocks] : (grouped ? scale(r, (32 * blocks) / a.group) : 1.f);
        const float s2 = kG16 && t2 ? sc[r][2 * blocks + 1] : 0.f;
        y += (static_cast<float>(t) * s + static_cast<float>(t2) * s2) * a.dv[m * nb + blocks];
      }
      out[r][m] = grouped ? y : y * scale(r, 0);
    }
  }
}

// Which row function a call runs: int4 (group layout S), int8 (per row / per group, or kG16: Q6_K's two
// scales per 32-column block), int5.
// q4w / q8w / q8s: the 512-bit loops (gemv_i8_wide.h); q4wh / q8sh / q4h / q8h: q4w / q8s / q4 / q8 reading
// the fp16 scales (I8Args::scales_h), each converted where it is used; q5h: q5 likewise
enum class Kind { q4, q8, q8g16, q5, q4w, q8w, q8s, q4wh, q8sh, q4h, q8h, q5h };
constexpr bool q8_spans(Kind K) { return K == Kind::q8s || K == Kind::q8sh; }
constexpr bool nib256(Kind K) { return K == Kind::q4 || K == Kind::q4h || K == Kind::q5 || K == Kind::q5h; }
constexpr bool nibbles(Kind K) { return nib256(K) || K == Kind::q4w || K == Kind::q4wh; }
constexpr bool half_scales(Kind K) {
  return K == Kind::q4wh || K == Kind::q8sh || K == Kind::q4h || K == Kind::q8h || K == Kind::q5h;
}
constexpr bool wide_nibbles(Kind K) { return K == Kind::q4w || K == Kind::q4wh; }

// Rows [0, M) of a's activations as K's loop reads them (packed from kPackRows rows for the nibbles).
template <int M, Kind K>
inline XPack i8_pack_for(const I8Args& a, I8Buf& buf) {
#ifdef LF_I8_WIDE
  if constexpr (wide_nibbles(K)) return i8_pack<M, 2>(a, buf);
#endif
  if constexpr (nib256(K)) return i8_pack<M>(a, buf);
  return XPack{a.xq, a.dv, a.xc};
}

// Weight rows n..n+NR-1 against all M activation rows, into a.y (+ bias).
template <int NR, int M, class D, Kind K, Groups S>
__attribute__((always_inline)) inline void rows_nr(const I8Args& a, const XPack& p, int64_t n) {
  float out[NR][M];
#ifdef LF_I8_WIDE
  if constexpr (wide_nibbles(K)) wide_rows<NR, M, D, S, K == Kind::q4wh>(a, p, n, out);
  else if constexpr (K == Kind::q8w) a.group > 0 ? wide_q8_rows<NR, M, D, true>(a, n, out) : wide_q8_rows<NR, M, D, false>(a, n, out);
  else if constexpr (q8_spans(K)) q8_span_rows<NR, M, K == Kind::q8sh>(a, n, out);
  else
#endif
  if constexpr (nib256(K))
    nib_rows<NR, M, D, S, K == Kind::q5 || K == Kind::q5h, K == Kind::q4h || K == Kind::q5h>(a, p, n, out);
  else
    q8_rows_nr<NR, M, D, K == Kind::q8g16, K == Kind::q8h>(a, n, out);
  LF_UNROLL
  for (int r = 0; r < NR; ++r)
    LF_UNROLL
    for (int m = 0; m < M; ++m) a.y[m * a.N + n + r] = out[r][m] + (a.bias ? a.bias[n + r] : 0.f);
}

// Bytes per weight row, and per row of the scale stream beside it (fp32 scales or 8-bit codes; q8
// with one scale per row: none worth prefetching).
template <Kind K>
inline int64_t i8_row_bytes(const I8Args& a) {
  return nibbles(K) ? a.K / 2 : a.K;
}
inline int64_t i8_scale_row_bytes(const I8Args& a, bool nib) {
  if (!nib && a.group == 0) return 0;
  const int64_t g = nib ? a.K / (a.group > 0 ? a.group : 32) : (a.K + a.group - 1) / a.group;
  return a.sc ? g : 4 * g;
}

// Prefetch `bytes` from p, a line at a time.
inline void i8_prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(static_cast<const char*>(p) + off, _MM_HINT_T0);
}

// Weight rows [n0, n1) against the M activation rows of a, p = i8_pack<M>(a) (int4 / int5).
// The streams start at full speed: the loops prefetch the weights kAhead bytes ahead, so the first
// kAhead bytes of this thread's rows are requested here at once (else they arrive as demand misses,
// ~1 us per call and thread on the small per-layer matrices), and the scales, a second stream the
// loops do not prefetch, are requested as many rows ahead.
template <int M, class D, Kind K, Groups S>
inline void rows_mp(const I8Args& a, const XPack& p, int64_t n0, int64_t n1) {
  const int64_t wrow = i8_row_bytes<K>(a), srow = half_scales(K) ? 2 * ((a.K + 31) / 32) : i8_scale_row_bytes(a, nibbles(K));
  constexpr int64_t kAhead = nibbles(K) ? kI8AheadNib : kI8Ahead;  // bytes
  const int64_t ahead = wrow > 0 ? (kAhead + wrow - 1) / wrow : 0;  // rows
  const char* w0 = static_cast<const char*>(a.w);
  const char* s0 = half_scales(K) ? reinterpret_cast<const char*>(a.scales_h)
                   : a.sc          ? reinterpret_cast<const char*>(a.sc)
                                   : reinterpret_cast<const char*>(a.scales);
  if (kAhead > 0 && !a.warm) {
    const int64_t first = (ahead < n1 - n0 ? ahead : n1 - n0);
    i8_prefetch_bytes(w0 + n0 * wrow, first * wrow);
    if (srow > 0) i8_prefetch_bytes(s0 + n0 * srow, first * srow);
  }
  for (int64_t n = n0; n < n1; ++n) {  // one weight row per pass (see the top of this file)
    // past n1 too (up to N): a thread's next block (row_split.h) usually follows, like the weights' prefetch
    if (kAhead > 0 && srow > 0 && n + ahead < a.N) i8_prefetch_bytes(s0 + (n + ahead) * srow, srow);
    rows_nr<1, M, D, K, S>(a, p, n);
  }
  if (kAhead > 0 && a.next.w && a.N > 0) {  // the same share of the next call's weights
    const int64_t r0 = (a.next.from >= 0 ? a.next.from : n0) * a.next.N / a.N, left = a.next.N - r0;
    // the next call may be of another kind (the last block's down, then the int8 head): its own distance
    const int64_t rows_ahead = a.next.row_bytes > 0 ? (kI8Ahead + a.next.row_bytes - 1) / a.next.row_bytes : 0;
    const int64_t r = rows_ahead < left ? rows_ahead : left;
    i8_prefetch_bytes(a.next.w + r0 * a.next.row_bytes, r * a.next.row_bytes);
    if (a.next.s) i8_prefetch_bytes(a.next.s + r0 * a.next.s_row_bytes, r * a.next.s_row_bytes);
  }
}

// One function per M, not inlined into `rows` (which would then hold every M's loops: the int8 head
// measured ~10% slower at M = 4 and 8 that way). p null: pack a's rows here.
template <int M, class D, Kind K, Groups S>
__attribute__((noinline)) void rows_m(const I8Args& a, const XPack* p, int64_t n0, int64_t n1) {
  I8Buf buf;
  const XPack q = p ? *p : i8_pack_for<M, K>(a, buf);
  rows_mp<M, D, K, S>(a, q, n0, n1);
}

template <int M>
struct MRows {
  static constexpr int value = M;
};

// fn(MRows<M>{}) with M = rows (1..Max; more: Max) as a compile-time constant; Max 16 for the 512-bit
// loops that take 9-16 rows in one pass.
template <int Max, int M = 1, class Fn>
inline void i8_with_rows(int64_t rows, const Fn& fn) {
  if constexpr (M == Max) {
    return fn(MRows<M>{});
  } else {
    if (rows <= M) return fn(MRows<M>{});
    return i8_with_rows<Max, M + 1>(rows, fn);
  }
}

// Up to 8 activation rows in one pass; 9..16 as 8 rows + the rest taken tile by tile over the weight
// rows, so the second part reads each tile from L1 / L2 instead of streaming W from memory a second time
// (two passes: 9 rows cost 4.7x one row on SmolLM2; the 49152 x 576 int8 head at 9 rows 0.78x that
// time in one pass, load 7). Split 8 + rest, not in halves: 5 + 4 measured 1.16x 8 + 1 on the int4
// blocks (the 8-row loop is the cheapest per row). Every (weight row, activation row) product runs
// the same loop whatever part or tile it is in.
template <class D, Kind K, Groups S = Groups::k32>
inline void rows(const I8Args& a, int64_t n0, int64_t n1) {
  constexpr bool kNib = nibbles(K);
  if (a.M <= 8) {
    return i8_with_rows<8>(a.M, [&](auto t) { rows_m<decltype(t)::value, D, K, S>(a, nullptr, n0, n1); });
  }
#ifdef LF_I8_WIDE
  // The 512-bit int4 and int8-span loops keep 9-16 rows in one pass (one weight row per pass, so the
  // 32 registers hold its unpacked codes and the rows' accumulators): the split below paid a second,
  // compute-bound pass over every weight tile (SmolLM2 int4 in the server: 9 chained rows cost 1.36x
  // 8 rows).
  if constexpr (wide_nibbles(K) || q8_spans(K))
    return i8_with_rows<16>(a.M, [&](auto t) { rows_m<decltype(t)::value, D, K, S>(a, nullptr, n0, n1); });
#endif
  I8Args h[2] = {a, a};
  h[0].M = 8, h[1].M = a.M - 8;
  h[0].next = h[1].next = I8Next{};  // tile by tile: no single end to request the next weights from
  const int64_t m0 = h[0].M, groups = kNib ? a.K / (K == Kind::q5 || K == Kind::q5h ? 32 : a.group) : 0;
  h[1].xq += m0 * a.Kx, h[1].y += m0 * a.N;
  if (a.dv) h[1].dv += m0 * (kNib ? a.Kx / 8 : a.Kx / 32);
  if (kNib) h[1].xs += m0 * groups, h[1].xc += m0 * (a.Kx / 8);
  if (a.so) h[1].so += m0 * 16 * a.spans;
  if (a.sd) h[1].sd += m0 * 16 * a.spans;
  if (a.sx) h[1].sx += m0 * 16 * a.spans;
  I8Buf buf[2];
  XPack p[2];
  for (int i = 0; i < 2; ++i)
    i8_with_rows<8>(h[i].M, [&](auto t) { p[i] = i8_pack_for<decltype(t)::value, K>(h[i], buf[i]); });
  // ~16 KB of weights per tile (a row: K / 2 nibble bytes + scales, or K int8 bytes), a multiple of 8 rows
  const int64_t row_bytes = kNib ? a.K / 2 + a.K / 8 : a.K + a.K / 8;
  const int64_t fit = ((16 << 10) / (row_bytes > 0 ? row_bytes : 1)) & ~int64_t{7};  // no <algorithm> here: int8_act.h
  const int64_t tile = fit > 8 ? fit : 8;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = t0 + tile < n1 ? t0 + tile : n1;
    for (int i = 0; i < 2; ++i)
      i8_with_rows<8>(h[i].M, [&](auto t) { rows_m<decltype(t)::value, D, K, S>(h[i], &p[i], t0, t1); });
  }
}

template <class D>
inline void q8_any(const I8Args& a, int64_t n0, int64_t n1) {
  if (a.group == 16) return rows<D, Kind::q8g16>(a, n0, n1);
#ifdef LF_I8_WIDE
  if (a.spans > 0)  // set by gemv_i8.cpp: group 32, whole blocks
    return a.scales_h ? rows<D, Kind::q8sh>(a, n0, n1) : rows<D, Kind::q8s>(a, n0, n1);
  if (a.group == 0 || a.group == 32 || a.group % 64 == 0) return rows<D, Kind::q8w>(a, n0, n1);
#endif
  if (!a.scales) return rows<D, Kind::q8h>(a, n0, n1);  // group 32, held as fp16 only (gemv_i8.cpp)
  rows<D, Kind::q8>(a, n0, n1);
}

template <class D>
inline void q4_any(const I8Args& a, int64_t n0, int64_t n1) {
#ifdef LF_I8_WIDE
  if (a.wide) {  // set by gemv_i8.cpp for groups of 32 or 64n only
    if (a.group == 32)
      return a.lut ? rows<D, Kind::q4w, Groups::k32Coded>(a, n0, n1)
             : a.scales_h ? rows<D, Kind::q4wh, Groups::k32>(a, n0, n1) : rows<D, Kind::q4w, Groups::k32>(a, n0, n1);
    return a.lut ? rows<D, Kind::q4w, Groups::k64nCoded>(a, n0, n1) : rows<D, Kind::q4w, Groups::k64n>(a, n0, n1);
  }
#endif
  if (a.lut) {  // 8-bit scale codes
    if (a.group == 32) return rows<D, Kind::q4, Groups::k32Coded>(a, n0, n1);
    if (a.group % 64 == 0) return rows<D, Kind::q4, Groups::k64nCoded>(a, n0, n1);
    return rows<D, Kind::q4, Groups::kOtherCoded>(a, n0, n1);
  }
  // the fp16 scales at one activation row, where the 256-bit loop streams its weights; at 4 rows it
  // is compute-bound and the conversion per chunk cost more than the bytes (SmolLM2 step + head, AVX2
  // loops on Zen 4: 0.93-0.96x the time at 1 row, 1.005-1.035x at 4; docs/BENCHMARKS.md session 24)
  // (and at every row count where the scales are held as fp16 only: no fp32 array to read; there 0.94x
  // the fp32 arrays' time at 4 and 8 rows, 0.86-0.89x at one row: Zen 4, docs/BENCHMARKS.md session 26)
  if (a.group == 32)
    return a.scales_h && (a.M == 1 || !a.scales) ? rows<D, Kind::q4h, Groups::k32>(a, n0, n1)
                                                 : rows<D, Kind::q4, Groups::k32>(a, n0, n1);
  if (a.group % 64 == 0) return rows<D, Kind::q4, Groups::k64n>(a, n0, n1);
  rows<D, Kind::q4, Groups::kOther>(a, n0, n1);
}

}  // namespace

namespace LF_I8_NS {
void q4_rows(const I8Args& a, int64_t n0, int64_t n1) { q4_any<LF_I8_DOT>(a, n0, n1); }
void q8_rows(const I8Args& a, int64_t n0, int64_t n1) { q8_any<LF_I8_DOT>(a, n0, n1); }
void q5_rows(const I8Args& a, int64_t n0, int64_t n1) {  // scales null: held as fp16 (scales_h)
  a.scales ? rows<LF_I8_DOT, Kind::q5>(a, n0, n1) : rows<LF_I8_DOT, Kind::q5h>(a, n0, n1);
}
}  // namespace LF_I8_NS

}  // namespace leanformer
