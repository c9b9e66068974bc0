// The int8-activation GEMV loops (gemv_i8_impl.h) with AVX-VNNI's 256-bit vpdpbusd (VEX encoding:
// Alder Lake and later, Sapphire Rapids, Zen 5), chosen at run time by gemv_i8.cpp from CPUID. Only
// this file is compiled for AVX-VNNI (gemv_vnni.h holds the body it shares with gemv_avx512vnni.cpp).
#define LF_VNNI_TARGET "avx2,fma,avxvnni"
#define LF_VNNI_DPBUSD _mm256_dpbusd_avx_epi32
#define LF_I8_NS i8avxvnni
#include "gemv_vnni.h"
