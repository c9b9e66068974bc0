// The int8-activation GEMVs' activation quantization (gemv_i8.cpp includes this once): fp32 rows to
// int8 codes per block of 32 columns with their scales, in the natural order (int8 weights) or in the
// nibble loops' chunk / wide layouts with the group sums and offset lanes the int4 / int5 loops read
// (int8_act.h I8Args).
#pragma once

#include <cstring>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace leanformer {
namespace {

// 32 activations -> 32 int8 codes (natural order), d = max|x| / 127 (0 for an all-zero block) and the
// codes' sum. round-half-even(x * (1 / d)) as the reference: cvtps_epi32 rounds to nearest even.
inline __m256i quantize_block(const float* x, float* d, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
  const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float amax = _mm_cvtss_f32(m), s = amax / 127.f, inv = amax > 0.f ? 1.f / s : 0.f;
  *d = s;
  const __m256 vi = _mm256_set1_ps(inv);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vi));
  const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
  *sum = _mm_cvtsi128_si32(h);
  // packs work per 128-bit lane: int8 lanes come out as 8-column runs in the order 0 2 4 6 1 3 5 7
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Block b of row x [K] (zero past K): a partial last block goes through a zero-padded copy.
inline __m256i quantize_block_at(const float* x, int64_t K, int64_t b, float* d, int32_t* sum) {
  const int64_t k0 = 32 * b;
  if (k0 + 32 <= K) return quantize_block(x + k0, d, sum);
  alignas(32) float tmp[32] = {};
  if (k0 < K) std::copy(x + k0, x + K, tmp);
  return quantize_block(tmp, d, sum);
}

// One row x [K] (zero past K, up to Kq = 32 * blocks) -> codes q [Kq] natural order, d [blocks].
void quantize_row(const float* x, int64_t K, int64_t blocks, int8_t* q, float* d) {
  int32_t sum;
  for (int64_t b = 0; b < blocks; ++b)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), quantize_block_at(x, K, b, d + b, &sum));
}

// One row x [K] (zero past K, up to Kp codes) -> the int4 kernel's operands (int8_act.h I8Args): codes
// out [Kx] per 64-column chunk evens then odds, dv [8 * chunks], xs [Kp / group] group sums of the
// dequantized activations, xc [8 * chunks] the codes' offset `off` (-8 int4, -16 int5) times lane sums.
void quantize_row_q4(const float* x, int64_t K, int64_t Kp, int64_t group, int8_t* out, float* dv, float* xs,
                     int off, int32_t* xc) {
  const __m256i ones = _mm256_set1_epi8(1), offs = _mm256_set1_epi16(static_cast<int16_t>(off));
  const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const int64_t blocks = Kp / 32, bpg = group / 32;
  float dsum = 0.f;  // sum over the current group of d_b * (sum of block b's codes)
  auto add_sum = [&](int64_t b, float d, int32_t sum) {
    dsum += d * static_cast<float>(sum);
    if ((b + 1) % bpg == 0) xs[b / bpg] = dsum, dsum = 0.f;
  };
  for (int64_t b = 0; b < blocks; b += 2) {
    float da, db;
    int32_t sa, sb;
    const __m256i A = quantize_block_at(x, K, b, &da, &sa);
    add_sum(b, da, sa);
    float* dvc = dv + 4 * b;
    if (b + 1 == blocks) {  // a last 32 columns: natural order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * b), A);
      _mm256_storeu_ps(dvc, _mm256_set1_ps(da));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xc + 4 * b), _mm256_setzero_si256());  // not read
      break;
    }
    const __m256i B = quantize_block_at(x, K, b + 1, &db, &sb);
    add_sum(b + 1, db, sb);
    // per lane [8 evens | 8 odds], then the qwords as [evens 0-31 | odds 0-31] of each block
    const __m256i a2 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(A, evens_odds), _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i b2 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(B, evens_odds), _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i evens = _mm256_permute2x128_si256(a2, b2, 0x20), odds = _mm256_permute2x128_si256(a2, b2, 0x31);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * b), evens);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * b + 32), odds);
    _mm256_storeu_ps(dvc, _mm256_set_m128(_mm_set1_ps(db), _mm_set1_ps(da)));
    // lane l: off * (evens 4l..4l+3 + odds 4l..4l+3), what the loops' lane l sums (|int16| <= 4 * 127)
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(ones, evens), _mm256_maddubs_epi16(ones, odds));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xc + 4 * b), _mm256_madd_epi16(pairs, offs));
  }
}

// One call's activations as the int4 / int5 loops read them, in one allocation (one per GEMV instead of
// three: the fused step makes ~120 calls a token): codes xq [M, Kx] (Kx = 64 chunks, past Kp never read),
// chunk scales dv [M, 8 chunks], group sums xs [M, G], offset lanes xc [M, 8 chunks] (I8Args).
// and, for the span loop (spans > 0), offset sums so, block scales sd and group sums sx [M, 16 spans] each.
// `bytes` of the calling thread's scratch for one call's quantized activations, 64-byte aligned, grown
// as needed and kept: a decode step quantizes ~120 inputs, and a tensor per call cost ~0.3 us through
// the dispatcher. Valid until the thread's next call (NibActs, gemv_i8.cpp q8_i8).
inline int8_t* activation_scratch(int64_t bytes) {
  thread_local std::vector<int8_t> buf;
  if (static_cast<int64_t>(buf.size()) < bytes + 64) buf.resize(bytes + 64);
  return reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
}

struct NibActs {
  int8_t* xq;
  float* dv;
  float* xs;
  int32_t* xc;
  int32_t* so;
  float* sd;
  float* sx;
  // In the calling thread's scratch (activation_scratch): valid until its next use on this thread.
  NibActs(int64_t M, int64_t chunks, int64_t G, int64_t spans = 0) {
    xq = activation_scratch(M * 64 * chunks + 4 * M * (16 * chunks + G + 48 * spans));
    dv = reinterpret_cast<float*>(xq + M * 64 * chunks);  // 64-byte rows: dv stays aligned
    xs = dv + M * 8 * chunks;
    xc = reinterpret_cast<int32_t*>(xs + M * G);
    so = xc + M * 8 * chunks;
    sd = reinterpret_cast<float*>(so + M * 16 * spans);
    sx = sd + M * 16 * spans;
  }
};

// The chunk layout [E0 | O0 | E1 | O1] (32 bytes each: chunk 2s's even / odd columns, chunk 2s + 1's)
// of every 128 columns -> [E0 | E1 | O0 | O1], the wide layout (gemv_i8_wide.h); an odd last chunk stays.
void to_wide_layout(int8_t* row, int64_t chunks) {
  for (int64_t c = 0; c + 1 < chunks; c += 2) {
    __m256i* q = reinterpret_cast<__m256i*>(row + 64 * c);
    const __m256i o0 = _mm256_loadu_si256(q + 1), e1 = _mm256_loadu_si256(q + 2);
    _mm256_storeu_si256(q + 1, e1);
    _mm256_storeu_si256(q + 2, o0);
  }
}

// The first `spans` 512-column spans of a row in the chunk layout (quantize_row_q4, before
// to_wide_layout) -> the span layout of gemv_i8_wide.h's span_rows: per span the vectors X[j] lo, X[j] hi
// (j = 0..3, 64 bytes each, in that order), whose lane L = 4k + s holds block b = 4s + k of the span:
// its columns 8j, 8j+2, 8j+4, 8j+6 (lo) or 8j+1, 8j+3, 8j+5, 8j+7 (hi) — the nibbles the weights' 4 x 4
// dword transpose puts in that lane. so / sd / sx [16 spans]: lane L's offset sum (xc's four lanes of
// block b), block b's d / 16 (see span_rows) and its group sum (xs: the zero points' factor).
void to_span_layout(int8_t* row, const float* dv, const int32_t* xc, const float* xs, int64_t spans, int32_t* so,
                    float* sd, float* sx) {
  alignas(64) int8_t out[512];
  for (int64_t sp = 0; sp < spans; ++sp) {
    int8_t* src = row + 512 * sp;  // 8 chunks of [32 evens | 32 odds], block 2c then 2c + 1 in each half
    for (int L = 0; L < 16; ++L) {
      const int b = 4 * (L % 4) + L / 4, chunk = b / 2, half = b % 2;
      const int8_t* evens = src + 64 * chunk + 16 * half;
      for (int j = 0; j < 4; ++j) {
        std::memcpy(out + 128 * j + 4 * L, evens + 4 * j, 4);
        std::memcpy(out + 128 * j + 64 + 4 * L, evens + 32 + 4 * j, 4);
      }
      const int64_t c = 8 * sp + chunk;  // xc / dv: chunk c's lanes 0-3 are block 2c's, 4-7 block 2c + 1's
      const int32_t* lanes = xc + 8 * c + 4 * half;
      so[16 * sp + L] = lanes[0] + lanes[1] + lanes[2] + lanes[3];
      sd[16 * sp + L] = dv[8 * c + 4 * half] * 0.0625f;  // d / 16 (exact): span_rows' sums are 16 x theirs
      sx[16 * sp + L] = xs[16 * sp + b];
    }
    std::memcpy(src, out, 512);
  }
}

// An int8 GEMV's activation row (quantize_row: codes in natural order, d per 32-column block) -> the
// span layout of gemv_i8_wide.h's q8_span_rows: `spans` = ceil(K / 256) spans of 256 columns, per span
// the vectors X[j] (j = 0..3, 64 bytes each) whose lane L = 4k + s holds dword j (columns 4j..4j+3) of
// the span's 16-column group g = 4s + k, the same place the weights' 4 x 4 dword transpose puts them,
// each code + 128 (vpdpbusd's unsigned operand: the signed weights' 128 * sum is taken off in the loop);
// sd [16 spans]: lane L's block scale d (block g / 2). Columns past K (a multiple of 32): code 0, d 0.
// The same 4 x 4 dword transpose in each 128-bit lane as the weights', 256 bits at a time (a scalar
// loop here took ~1.5 us per 576-column row: as long as the one-row GEMV's own work on a small matrix).
void to_q8_span_layout(const int8_t* xq, const float* d, int64_t K, int64_t spans, uint8_t* out, float* sd) {
  alignas(32) int8_t pad[256];
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t sp = 0; sp < spans; ++sp) {
    const int8_t* src = xq + 256 * sp;
    if (K - 256 * sp < 256) {  // a last span: zeros past K
      std::memset(pad, 0, sizeof pad);
      std::memcpy(pad, src, K - 256 * sp);
      src = pad;
    }
    for (int half = 0; half < 2; ++half) {  // 128-bit lanes 2 half, 2 half + 1 of every 64-byte vector
      __m256i v[4];
      for (int s = 0; s < 4; ++s) v[s] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * s + 32 * half));
      const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
      const __m256i tr[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3),
                             _mm256_unpackhi_epi64(t1, t3)};
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 256 * sp + 64 * j + 32 * half), _mm256_xor_si256(tr[j], flip));
    }
    for (int L = 0; L < 16; ++L) {
      const int64_t col = 256 * sp + 16 * (4 * (L % 4) + L / 4);
      sd[16 * sp + L] = col < K ? d[col / 32] : 0.f;
    }
  }
}

}  // namespace
}  // namespace leanformer
