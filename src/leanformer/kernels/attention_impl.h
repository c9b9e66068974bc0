// The attention algorithm, written once over a vector-traits type V and included by attention.cpp
// (V = 8-wide AVX2) and attention_avx512.cpp (V = 16-wide AVX-512). Everything here is in an anonymous
// namespace, so each translation unit keeps its own copy, compiled for its own instruction set (no
// shared inline symbol the linker could pick from the wrong one; see avx512.h). Includes nothing but
// plain headers.
//
// Per (batch, head), with n = the number of keys up to the last unmasked one:
//   pack K^T in key tiles [n / KT][D][KT] and V as [n, Dp] (Dp = D rounded up to the vector width),
//   then for each block of MQ query rows:
//     S = Q K^T          register tiles of QR rows x KV vectors of keys (broadcast q, FMA over d)
//     P = exp(scale * (S - rowmax))   masked keys (and the padding up to a whole vector) add -inf
//     O = P V            register tiles of rows x up to 4 vectors of head_dim (broadcast p, FMA over keys)
//     out = O / rowsum(P)
// Rows are whole (n <= 512 for BERT-sized inputs: a [MQ, n] score block stays in L1/L2), so the softmax
// is exact in one pass per row: no running max and rescaling as in flash attention.
#pragma once

#include <cstdint>

#include "attention.h"
#include "avx512.h"  // LF_UNROLL

namespace leanformer {
namespace {

inline int64_t attn_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Keys up to the last unmasked one (what a row attends over; mask null: all T), and whether a masked key
// lies before it (*gap: those need a -inf bias).
inline int64_t attn_live_keys(const uint8_t* mask, int64_t T, bool* gap) {
  int64_t n = T;
  *gap = false;
  if (mask) {
    while (n > 0 && !mask[n - 1]) --n;
    for (int64_t j = 0; j < n; ++j) *gap |= !mask[j];
  }
  return n;
}

inline float* attn_align(float* p) {  // next 64-byte boundary
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// s[R, KV*W] (row stride lds) = q[R, D] (packed rows) . kt[D, KV*W] (one packed key tile).
template <class V, int R, int KV>
inline void attn_qk_tile(const float* __restrict q, int64_t D, const float* __restrict kt, float* __restrict s,
                         int64_t lds) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg acc[R][KV];
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int u = 0; u < KV; ++u) acc[r][u] = V::zero();
  for (int64_t d = 0; d < D; ++d) {
    reg kv[KV];
    LF_UNROLL
    for (int u = 0; u < KV; ++u) kv[u] = V::load(kt + d * (KV * W) + u * W);
    LF_UNROLL
    for (int r = 0; r < R; ++r) {
      const reg qb = V::set1(q[r * D + d]);
      LF_UNROLL
      for (int u = 0; u < KV; ++u) acc[r][u] = V::fmadd(qb, kv[u], acc[r][u]);
    }
  }
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int u = 0; u < KV; ++u) V::store(s + r * lds + u * W, acc[r][u]);
}

// o[R, CV*W] (row stride ldo) = p[R, :n] (row stride ldp) . v[:n, CV*W] (row stride ldv).
template <class V, int R, int CV>
inline void attn_pv_tile(const float* __restrict p, int64_t ldp, const float* __restrict v, int64_t ldv, int64_t n,
                         float* __restrict o, int64_t ldo) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg acc[R][CV];
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int c = 0; c < CV; ++c) acc[r][c] = V::zero();
  for (int64_t j = 0; j < n; ++j) {
    reg vv[CV];
    LF_UNROLL
    for (int c = 0; c < CV; ++c) vv[c] = V::load(v + j * ldv + c * W);
    LF_UNROLL
    for (int r = 0; r < R; ++r) {
      const reg pb = V::set1(p[r * ldp + j]);
      LF_UNROLL
      for (int c = 0; c < CV; ++c) acc[r][c] = V::fmadd(pb, vv[c], acc[r][c]);
    }
  }
  LF_UNROLL
  for (int r = 0; r < R; ++r)
    LF_UNROLL
    for (int c = 0; c < CV; ++c) V::store(o + r * ldo + c * W, acc[r][c]);
}

// Rows [0, rows) of o[:, c0 : c0 + CV*W] = p . v, in tiles of R = PACC / CV rows (PACC accumulators).
template <class V, int PACC, int CV>
inline void attn_pv_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n, float* o, int64_t ldo,
                         int64_t rows) {
  constexpr int R = PACC / CV;
  for (int64_t r0 = 0; r0 < rows; r0 += R) attn_pv_tile<V, R, CV>(p + r0 * ldp, ldp, v, ldv, n, o + r0 * ldo, ldo);
}

// One score row s[0, nw) (nw = n rounded up to W) -> unnormalized probabilities in place; returns their
// sum. With kBias, bias[j] (0 or -inf) is added first: masked keys and the lanes past n.
template <class V, bool kBias>
inline float attn_softmax_row(float* __restrict s, const float* __restrict bias, int64_t nw, float scale) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg mx = V::set1(-__builtin_inff());
  for (int64_t j = 0; j < nw; j += W) {
    reg x = V::load(s + j);
    if constexpr (kBias) {
      x = V::add(x, V::load(bias + j));
      V::store(s + j, x);
    }
    mx = V::max(mx, x);
  }
  const float m = V::hmax(mx);
  const reg ms = V::set1(m * scale), sc = V::set1(scale);
  reg sum = V::zero();
  for (int64_t j = 0; j < nw; j += W) {
    const reg p = V::exp(V::fmsub(V::load(s + j), sc, ms));  // exp(scale * (s - m)); -inf -> 0
    V::store(s + j, p);
    sum = V::add(sum, p);
  }
  return V::hsum(sum);
}

// Attention of one (batch, head): MQ query rows per block, QK tiles of QR rows x KV vectors, PV tiles
// of PACC accumulators (MQ must be a multiple of QR and of PACC / CV for CV = 1..4).
template <class V, int MQ, int QR, int KV, int PACC>
void attn_head(const AttnArgs& a, int64_t bh, float* scratch) {
  constexpr int W = V::W, KT = KV * W;
  static_assert(MQ % QR == 0 && MQ % PACC == 0 && MQ % (PACC / 2) == 0 && MQ % (PACC / 3) == 0 &&
                    MQ % (PACC / 4) == 0,
                "query block must hold whole tiles");
  const int64_t T = a.T, D = a.D, H = a.H;
  const int64_t b = bh / H, h = bh % H;
  const float* q = a.q + b * a.q_stride[0] + h * a.q_stride[1];
  const float* k = a.k + b * a.k_stride[0] + h * a.k_stride[1];
  const float* v = a.v + b * a.v_stride[0] + h * a.v_stride[1];
  const int64_t sq = a.q_stride[2], sk = a.k_stride[2], sv = a.v_stride[2];
  float* out = a.out + (b * T * H + h) * D;  // query row t at out + t * H * D
  const int64_t so = H * D;

  // Keys past the last unmasked one are skipped; masked keys before it get -inf.
  const uint8_t* mask = a.mask ? a.mask + b * T : nullptr;
  bool gap = false;
  const int64_t n = attn_live_keys(mask, T, &gap);
  if (n == 0) {  // every key masked: zeros, as torch's SDPA returns
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) out[t * so + d] = 0.f;
    return;
  }
  const int64_t tp = attn_round_up(n, KT), nw = attn_round_up(n, W), dp = attn_round_up(D, W);

  float* kt = attn_align(scratch);         // [tp / KT][D][KT]
  float* vp = attn_align(kt + D * tp);     // [n][dp]
  float* qb = attn_align(vp + n * dp);     // [MQ][D]
  float* s = attn_align(qb + MQ * D);      // [MQ][tp]
  float* o = attn_align(s + MQ * tp);      // [MQ][dp]
  float* bias = attn_align(o + MQ * dp);   // [tp]

  for (int64_t j = 0; j < tp; ++j) {
    float* dst = kt + (j / KT) * D * KT + j % KT;
    if (j < n) {
      for (int64_t d = 0; d < D; ++d) dst[d * KT] = k[j * sk + d];
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * KT] = 0.f;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; ++d) vp[j * dp + d] = v[j * sv + d];
    for (int64_t d = D; d < dp; ++d) vp[j * dp + d] = 0.f;
  }
  const bool use_bias = gap || nw != n;
  if (use_bias)
    for (int64_t j = 0; j < nw; ++j) bias[j] = (j < n && (!mask || mask[j])) ? 0.f : -__builtin_inff();

  for (int64_t i0 = 0; i0 < T; i0 += MQ) {
    const int64_t rows = T - i0 < MQ ? T - i0 : MQ;
    for (int64_t r = 0; r < MQ; ++r)
      for (int64_t d = 0; d < D; ++d) qb[r * D + d] = r < rows ? q[(i0 + r) * sq + d] : 0.f;
    for (int64_t j0 = 0; j0 < tp; j0 += KT)
      for (int64_t r0 = 0; r0 < rows; r0 += QR)
        attn_qk_tile<V, QR, KV>(qb + r0 * D, D, kt + j0 * D, s + r0 * tp + j0, tp);
    float inv[MQ];
    for (int64_t r = 0; r < rows; ++r) {
      const float sum = use_bias ? attn_softmax_row<V, true>(s + r * tp, bias, nw, a.scale)
                                 : attn_softmax_row<V, false>(s + r * tp, bias, nw, a.scale);
      inv[r] = 1.f / sum;
    }
    for (int64_t c0 = 0; c0 < dp; c0 += 4 * W) {
      switch ((dp - c0) / W) {
        case 1: attn_pv_rows<V, PACC, 1>(s, tp, vp + c0, dp, n, o + c0, dp, rows); break;
        case 2: attn_pv_rows<V, PACC, 2>(s, tp, vp + c0, dp, n, o + c0, dp, rows); break;
        case 3: attn_pv_rows<V, PACC, 3>(s, tp, vp + c0, dp, n, o + c0, dp, rows); break;
        default: attn_pv_rows<V, PACC, 4>(s, tp, vp + c0, dp, n, o + c0, dp, rows); break;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = out + (i0 + r) * so;
      const float* src = o + r * dp;
      const typename V::reg iv = V::set1(inv[r]);
      int64_t d = 0;
      for (; d + W <= D; d += W) V::store(dst + d, V::mul(V::load(src + d), iv));
      for (; d < D; ++d) dst[d] = src[d] * inv[r];
    }
  }
}

}  // namespace
}  // namespace leanformer
