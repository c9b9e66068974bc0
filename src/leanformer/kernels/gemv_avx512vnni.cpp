// The int8-activation GEMV loops (gemv_i8_impl.h) with AVX-512 VNNI's vpdpbusd on 256-bit vectors (EVEX, needs
// AVX-512 VL: Cascade Lake and later Xeons, Zen 4), chosen at run time by gemv_i8.cpp from CPUID. Only
// this file is compiled for AVX-512 VNNI and it includes no header with inline code the AVX2 files share.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

#include <immintrin.h>

#include <cstdint>

#include "avx512.h"  // LF_UNROLL, LF_PREFETCH
#include "int8_act.h"

namespace leanformer {
namespace {
struct DotAvx512Vnni {
  static __m256i dot(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
  static __m256i dot2(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u1, s1), u2, s2);
  }
};
}  // namespace
}  // namespace leanformer

#define LF_I8_NS i8avx512vnni
#define LF_I8_DOT DotAvx512Vnni
#include "gemv_i8_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
