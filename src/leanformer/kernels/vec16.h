// 16-wide (AVX-512) float helpers shared by the AVX-512 translation units (attention_avx512.cpp,
// gemm_h16_avx512fp16.cpp). Include it after the file's `#pragma GCC target` and never from an AVX2 file:
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

}  // namespace
}  // namespace leanformer
