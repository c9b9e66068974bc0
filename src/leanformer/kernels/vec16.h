// 16-wide (AVX-512) float helpers shared by the AVX-512 translation units (attention_avx512.cpp,
// gemm_h16_avx512fp16.cpp, attention_h16_avx512fp16.cpp). Include it after the file's `#pragma GCC target` and never from an AVX2 file:
// its functions have internal linkage, so each AVX-512 file gets its own copy (see avx512.h for why a
// copy shared with AVX2 code would be unsafe).
#pragma once

#include <immintrin.h>

namespace leanformer {
namespace {

// e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r (~1 ulp), then
// vscalefps multiplies by 2^n, which also handles the underflow (x < -104, incl. -inf, gives 0).
inline __m512 exp16_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-110.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// 2^t for t <= 0, within 3e-6 relative: t = n + f, |f| <= 1/2, a degree-4 minimax polynomial for 2^f, then
// vscalefps by 2^n (0 below -150, -inf included). Half the operations of exp16_nonpos, for results that are
// rounded to fp16 or feed a GELU (gemm_h16_avx512fp16.cpp, attention_h16_avx512fp16.cpp).
inline __m512 exp2_poly4_nonpos(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-160.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.009570095810834726f), f, _mm512_set1_ps(0.05591786713958698f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.2402474504196054f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931218139407027f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.9999992613614618f));
  return _mm512_scalef_ps(y, n);
}

// The float traits attention_impl.h is written over, 16 lanes.
struct V16 {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg fmsub(reg a, reg b, reg c) { return _mm512_fmsub_ps(a, b, c); }
  static float hmax(reg x) { return _mm512_reduce_max_ps(x); }
  static float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static reg exp(reg x) { return exp16_nonpos(x); }  // x <= 0 (vec16.h)
};

}  // namespace
}  // namespace leanformer
