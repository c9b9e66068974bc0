// The int8-activation GEMV loops (gemv_i8_impl.h) with AVX-512 VNNI's vpdpbusd on 256-bit vectors (EVEX,
// needs AVX-512 VL: Cascade Lake and later Xeons, Zen 4), chosen at run time by gemv_i8.cpp from CPUID.
// Only this file is compiled for AVX-512 VNNI (gemv_vnni.h holds the body it shares with
// gemv_avxvnni.cpp).
#define LF_VNNI_TARGET "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"
#define LF_VNNI_DPBUSD _mm256_dpbusd_epi32
#define LF_I8_NS i8avx512vnni
#define LF_I8_WIDE  // int4 on 512-bit vectors as well (gemv_i8_wide.h)
#include "gemv_vnni.h"
