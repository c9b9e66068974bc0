// Interface of the int8-activation GEMV kernels (gemv_i8.cpp: AVX2 maddubs + quantization + threading;
// gemv_avxvnni.cpp / gemv_avx512vnni.cpp, through gemv_vnni.h: the same loops with AVX-VNNI / AVX-512
// VNNI dot products, compiled for those ISAs).
//
// Like avx512.h this header holds only a plain struct and declarations: the VNNI translation units are
// compiled for instruction sets the AVX2 files must never execute, so they share no inline code with
// them (every helper lives in gemv_i8_impl.h inside an anonymous namespace: one private copy per file).
#pragma once

#include <cstdint>

namespace leanformer {

// The instruction set the int8-activation kernels use (gemv_i8.cpp: CPUID, or set_act_isa).
enum ActIsa : int { kAvx2 = 0, kAvxVnni = 1, kAvx512Vnni = 2 };
int act_isa_id();

// The weights of the GEMV that runs after this one (the fused step's order: qkv, o, gate_up, down, the next
// layer's qkv or the head): each thread, done with its rows, requests the first bytes of its share of
// them, so the next call starts on lines already on their way instead of a cold stream.
struct I8Next {
  const char* w = nullptr;  // null: none
  int64_t N = 0, row_bytes = 0;
  const char* s = nullptr;  // a second stream beside it (scales), or null
  int64_t s_row_bytes = 0;
  int64_t from = -1;  // the first row of this thread's part of this call (its share of the next starts at
                      // the same fraction); -1: the rows' own first
};

// One call's operands, at most 16 activation rows (more than 8: gemv_i8_impl.h rows splits them). Activations are int8 per block of 32 columns:
// x[m, k] ~ xq[m, k] * d[m, k / 32], d = max|x over the block| / 127, xq in [-127, 127].
struct I8Args {
  const int8_t* xq;  // [M, Kx] codes. q4: per 64-column chunk the 32 even columns then the 32 odd ones
                     // (the nibble order of 32 weight bytes); a last 32-column chunk in natural order.
                     // q8: natural order, zero past K.
  const float* dv;   // q4: [M, 8 * n_chunks], chunk c: d of block 2c in lanes 0-3, of block 2c+1 in 4-7
                     // (a last half chunk: its d in all 8); q8: [M, n_blocks] d per block.
  const float* xs;   // q4 / q5: [M, n_groups] sum of the dequantized activations over each weight group
                     // (read for zero points only)
  const void* w;     // q4: uint8 [N, K/2] nibbles (low = even column); q8: int8 [N, K]
  const float* scales;  // q4: [N, n_groups]; q8: [N] (group 0) or [N, n_groups]
  const float* zeros;   // q4: [N, n_groups]
  const float* bias;    // [N] or null
  float* y;             // [M, N]
  int64_t M, N;
  int64_t K;      // q4: code columns (a multiple of 32 and of group); q8: columns
  int64_t Kx;     // row stride of xq (and 8 * n_chunks / n_blocks for dv)
  int64_t group;  // q4: columns per scale (32..256); q8: 0 (per row) or a multiple of 32
  const uint32_t* high = nullptr;  // q5: [N, K/32] 5th bits of the codes (layout: gemv_i8_impl.h q5_row)
  // q4 with 8-bit scale codes (q4_codes.h), read in place of scales / zeros (then null): scale =
  // lut[sc], zero = lut[256 + zc] * scale; [N, n_groups] codes, lut [512]. Null: fp32 scales / zeros.
  const uint8_t* sc = nullptr;
  const uint8_t* zc = nullptr;
  const float* lut = nullptr;
  // q4 / q8 group 32: the same scales as fp16 [N, n_groups] (Q4Scales::h, Q8I8::h), read by the 512-bit
  // loops and the 256-bit int4 loop at one row instead (half the scale bytes streamed; fp16 -> fp32 is
  // exact, so the same results); null: none
  const uint16_t* scales_h = nullptr;
  // with scales_h: the zero points as fp16 [N, n_groups] (Q4Scales::hz, a GGUF Q4_1's mins), read by the
  // span loop and the odd chunk after it instead of `zeros` (4 of a 20-byte block's 22 bytes: 2 saved)
  const uint16_t* zeros_h = nullptr;
  // q4, AVX-512 VNNI only: xq in the wide layout (per 128 columns the 64 even then the 64 odd ones,
  // gemv_i8_wide.h), read by 512-bit loops; groups of 32 or a multiple of 64, fp32 scales
  bool wide = false;
  // q4 / q5: [M, 8 * n_chunks] int32, per 64-column chunk lane l = off * (sum of the codes at bytes
  // 4l..4l+3 of its 32 even and of its 32 odd columns), off = -8 (int4) / -16 (int5): the codes' offset
  // as the integer sums' starting value, so sum_k (q_k + off) xq_k is exact and needs no float pass per
  // group (a last 32 columns: not used)
  const int32_t* xc = nullptr;
  // q4 wide, group 32: the first `spans` 512-column spans of xq in the span
  // layout (act_quant.h to_span_layout, gemv_i8_wide.h span_rows), with per span 16 lanes of offset sums
  // so and block scales sd ([M, 16 * spans] each); 0: none.
  // q8, AVX-512 VNNI, group 32, K a multiple of 32: xq is [M, Kx = 256 * spans] codes + 128 in the q8
  // span layout (act_quant.h to_q8_span_layout, gemv_i8_wide.h q8_span_rows), sd its lane scales, dv null
  int64_t spans = 0;
  const int32_t* so = nullptr;
  const float* sd = nullptr;
  const float* sx = nullptr;  // q4 spans: lane L's group sum (xs) per span [M, 16 * spans], for zero points
  I8Next next;
  // whether the thread's previous rows ended at this call's first row: their loop has requested the
  // first bytes already (row_split.h blocks), so the stream is not started again
  bool warm = false;
};

// A prefill-sized int4 GEMM's operands (gemm_q4_i8.h): activations in tiles of L rows (L = 16 for
// AVX-512 VNNI, else 8; rows past M zero), per tile and 32-column block b: the codes as 8 quads x L lanes
// x 4 bytes (lane l = row 16t + l's columns 32b + 4q..+3), their d and the offset start -8 * sum(codes).
// Groups of fp16 scales a weight row may have widened to fp32 up front (gemm_q4_i8.h i8_widen_half, the
// GEMM's rows): K <= 16384 at group 32 (2 KB of stack per row).
constexpr int64_t kHalfWiden = 512;

struct GemmQ4Args {
  const int8_t* xt;    // [T, B, 8, L, 4]
  const float* dx;     // [T, B, L]
  const int32_t* xo;   // [T, B, L]
  const uint8_t* w;    // [N, K / 2] nibbles, low = even column; q8: int8 [N, K]
  const float* scales; // [N, K / group]
  float* yt;           // [N, T * L]: the output transposed
  int64_t M, N, K, T;  // M activation rows in T tiles; K: code columns, a multiple of 32
  int64_t group;       // columns per scale, a multiple of 32 (q8 per row: K)
  bool q8 = false;     // int8 weights (xo then holds -128 * the code sums)
  // group 32, K / 32 <= kHalfWiden: the scales as fp16 [N, K / 32] (GGUF blocks held so), each row's
  // widened to fp32 before its tiles (scales then null)
  const uint16_t* scales_h = nullptr;
};

// y[:, n] for weight rows n in [n0, n1), per instruction set. Call the VNNI ones only where the CPU has
// them (gemv_i8.cpp checks CPUID).
namespace i8avx2 {
void q4_rows(const I8Args& a, int64_t n0, int64_t n1);
void q4_gemm(const GemmQ4Args& a, int64_t n0, int64_t n1, uint8_t* codes);  // codes: 8 * K bytes scratch
void q8_rows(const I8Args& a, int64_t n0, int64_t n1);
void q5_rows(const I8Args& a, int64_t n0, int64_t n1);
}  // namespace i8avx2
namespace i8avxvnni {
void q4_rows(const I8Args& a, int64_t n0, int64_t n1);
void q4_gemm(const GemmQ4Args& a, int64_t n0, int64_t n1, uint8_t* codes);  // codes: 8 * K bytes scratch
void q8_rows(const I8Args& a, int64_t n0, int64_t n1);
void q5_rows(const I8Args& a, int64_t n0, int64_t n1);
}  // namespace i8avxvnni
namespace i8avx512vnni {
void q4_rows(const I8Args& a, int64_t n0, int64_t n1);
void q4_gemm(const GemmQ4Args& a, int64_t n0, int64_t n1, uint8_t* codes);  // codes: 8 * K bytes scratch
void q8_rows(const I8Args& a, int64_t n0, int64_t n1);
void q5_rows(const I8Args& a, int64_t n0, int64_t n1);
}  // namespace i8avx512vnni

}  // namespace leanformer
