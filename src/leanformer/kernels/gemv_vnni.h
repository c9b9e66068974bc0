// The body of the VNNI translation units (gemv_avxvnni.cpp, gemv_avx512vnni.cpp): compiles the
// int8-activation loops of gemv_i8_impl.h with a vpdpbusd dot-product policy, for an instruction set
// the AVX2 files must never execute. The including file defines, before including this:
//   LF_VNNI_TARGET  the target string, e.g. "avx2,fma,avxvnni"
//   LF_VNNI_DPBUSD  the 256-bit vpdpbusd intrinsic of that ISA
//   LF_I8_NS        the namespace whose q4_rows / q8_rows to emit (declared in int8_act.h)
// It includes no header with inline code the AVX2 files share (see int8_act.h), only this, <cstdint>,
// <immintrin.h>, avx512.h and int8_act.h.
#define LF_VNNI_STR_(...) #__VA_ARGS__
#define LF_VNNI_STR(...) LF_VNNI_STR_(__VA_ARGS__)
#if defined(__clang__)
_Pragma(LF_VNNI_STR(clang attribute push(__attribute__((target(LF_VNNI_TARGET))), apply_to = function)))
#else
#pragma GCC push_options
_Pragma(LF_VNNI_STR(GCC target(LF_VNNI_TARGET)))
#endif

#include <immintrin.h>

#include <cstdint>

#include "avx512.h"  // LF_UNROLL, LF_PREFETCH
#include "int8_act.h"

namespace leanformer {
namespace {
struct DotVnni {  // 8 int32 lanes of u8 x s8 sums in one instruction per pair
  static __m256i dot(__m256i u, __m256i s) { return LF_VNNI_DPBUSD(_mm256_setzero_si256(), u, s); }
  static __m256i dot2(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
    return LF_VNNI_DPBUSD(LF_VNNI_DPBUSD(_mm256_setzero_si256(), u1, s1), u2, s2);
  }
};
}  // namespace
}  // namespace leanformer

#define LF_I8_DOT DotVnni
#include "gemv_i8_impl.h"
#include "gemm_q4_i8.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
