// int4 / int8 weights x int8 activations for small batches (decode): y = x @ W^T (+ bias), with x
// quantized to int8 per block of 32 columns once per call and the dot products done in integers.
//
// Why: the fp32-activation kernels (gemv.cpp, gemv_q4.cpp) turn every weight into a float and spend
// one FMA per weight and activation row, so at batch 1 int4/int8 decode is bound by that arithmetic,
// not by memory. Here 32 weights meet 32 activations in one or two integer instructions
// (AVX2 maddubs + madd, or one VNNI vpdpbusd), then one convert and one FMA per 32.
//
// Activations: x[m, k] ~ xq * d, d = max|x| over the block of 32 / 127, xq = round-half-even(x * (1/d))
// in [-127, 127] (d = 0 for an all-zero block). Results equal, up to fp32 summation order, the float
// product of those dequantized activations with the dequantized weights (kernels/int8_act.py holds that
// reference). int4's zero points and the -8 of its codes only need each group's activation sum, which
// is computed once per call.
//
// Instruction sets, chosen at run time (CPUID; set_act_isa for tests): "avx512_vnni" (vpdpbusd on
// 256-bit vectors, gemv_avx512vnni.cpp), "avx_vnni" (gemv_avxvnni.cpp), "avx2" (this file).
#include <torch/csrc/utils/pybind.h>

#include <ATen/ops/constant_pad_nd.h>

#include <atomic>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "act_quant.h"  // quantize_row / quantize_row_q4, NibActs, to_wide_layout
#include "int8_act.h"
#include "q4_codes.h"
#include "row_split.h"  // for_row_blocks_balanced

namespace leanformer {
namespace {
struct DotAvx2 {
  static __m256i dot(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
  static __m256i dot2(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
};
}  // namespace
}  // namespace leanformer

#define LF_I8_NS i8avx2
#define LF_I8_DOT DotAvx2
#include "gemv_i8_impl.h"
#include "gemm_q4_i8.h"

namespace leanformer {

// Activation rows per kernel call: up to 16 in one pass over W (gemv_i8_impl.h rows: 8 rows and the
// rest, tile by tile), so a 9..16-row verify or batch streams W from memory once.
constexpr int64_t kI8Rows = 16;

// ------------------------------------------------------------------------------------------ ISA

bool cpu_has_act_isa(int isa) {
  __builtin_cpu_init();
  if (isa == kAvx512Vnni)
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f");
  if (isa == kAvxVnni) return __builtin_cpu_supports("avxvnni");
  return true;
}

int best_act_isa() {
  for (int i : {kAvx512Vnni, kAvxVnni})
    if (cpu_has_act_isa(i)) return i;
  return kAvx2;
}

std::atomic<int> g_act_isa{best_act_isa()};
const char* const kActIsaNames[] = {"avx2", "avx_vnni", "avx512_vnni"};

int act_isa_id() { return g_act_isa.load(std::memory_order_relaxed); }

std::string act_isa() { return kActIsaNames[g_act_isa.load(std::memory_order_relaxed)]; }

std::vector<std::string> act_isas() {
  std::vector<std::string> out;
  for (int i : {kAvx2, kAvxVnni, kAvx512Vnni})
    if (cpu_has_act_isa(i)) out.push_back(kActIsaNames[i]);
  return out;
}

void set_act_isa(const std::string& name) {
  for (int i : {kAvx2, kAvxVnni, kAvx512Vnni})
    if (name == kActIsaNames[i]) {
      TORCH_CHECK(cpu_has_act_isa(i), "this CPU lacks ", name);
      g_act_isa.store(i);
      return;
    }
  TORCH_CHECK(false, "act isa must be 'avx2', 'avx_vnni' or 'avx512_vnni', got '", name, "'");
}

namespace {

void rows_isa(int isa, const I8Args& a, bool q4, int64_t n0, int64_t n1) {
  if (isa == kAvx512Vnni)
    q4 ? i8avx512vnni::q4_rows(a, n0, n1) : i8avx512vnni::q8_rows(a, n0, n1);
  else if (isa == kAvxVnni)
    q4 ? i8avxvnni::q4_rows(a, n0, n1) : i8avxvnni::q8_rows(a, n0, n1);
  else
    q4 ? i8avx2::q4_rows(a, n0, n1) : i8avx2::q8_rows(a, n0, n1);
}

// 8-bit scale codes of rows with at least this many groups are looked up inside the row loops
// (gemv_i8_impl.h, a.lut set); fewer: decoded per chunk of rows by `qs` (q4_codes.h). Measured per call,
// one thread, Zen 3 (scripts/dq8_gemv_ratio.py): in-loop lookups take 0.87-0.93x the decode pass's time
// at K = 1024-8192 (group 32), but 1.08-1.10x at K = 576 (18 groups: the zero-point loop is then mostly
// its scalar tail).
constexpr int64_t kLookupMinGroups = 32;

// Rows per block of for_row_blocks_balanced: a multiple of every loop's weight rows per pass.
constexpr int64_t kBlockAlign = 16;

// q4 with `qs`: a.w / scales / zeros / bias / y are taken from it chunk by chunk (8-bit scale codes or
// fp16 arrays decoded per chunk of rows, q4_codes.h), the row functions seeing rows [0, c1 - c0) of a shifted view.
// isa: the instruction set the operands were laid out for (-1: the current one).
// zeros: whether the decoded chunks' zero points are read (false: all zero, skipped).
void run_rows(const I8Args& a, bool q4, int64_t row_bytes, const Q4Scales* qs = nullptr, int isa = -1,
              bool zeros = true) {
  if (isa < 0) isa = g_act_isa.load(std::memory_order_relaxed);
  // Balanced blocks where a block costs nothing to start: not where each call of the row loops first
  // packs the activations (int4 from kPackRows rows: 1.10x the time of the 120 SmolLM2 block GEMVs at 4
  // and 8 rows, one pack per block) or decodes 8-bit scale codes per chunk of rows (qs).
  if (!qs && !(q4 && a.M >= kPackRows)) {
    const auto block = [&](int64_t n0, int64_t n1, int64_t first, bool last, bool warm) {
      I8Args b = a;
      b.warm = warm;
      if (last) b.next.from = first; else b.next = I8Next{};
      rows_isa(isa, b, q4, n0, n1);
    };
    for_row_blocks_balanced(a.N, row_bytes, kBlockAlign, block);
    return;
  }
  for_row_blocks(a.N, row_bytes, [&](int64_t n0, int64_t n1) {
    if (!qs) return rows_isa(isa, a, q4, n0, n1);
    qs->chunks(n0, n1, [&](int64_t c0, int64_t c1, const float* s, const float* z) {
      I8Args b = a;
      b.w = static_cast<const uint8_t*>(a.w) + c0 * (a.K / 2);
      b.scales = s, b.zeros = zeros ? z : nullptr, b.y = a.y + c0, b.bias = a.bias ? a.bias + c0 : nullptr;
      rows_isa(isa, b, true, 0, c1 - c0);
    });
  });
}

}  // namespace

// x [M, K] fp32 -> (codes int8 [M, Kq], d fp32 [M, Kq / 32]) with Kq = K rounded up to 32: the
// activation quantization of these kernels, exposed for tests and for the reference.
std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x_) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = (K + 31) / 32;
  at::Tensor q = at::empty({M, 32 * blocks}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, blocks}, x.options());
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, blocks, q.data_ptr<int8_t>() + m * 32 * blocks,
                 d.data_ptr<float>() + m * blocks);
  return {q, d};
}

Q4I8 q4_i8_operands(const at::Tensor& w_, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                    int64_t group_size, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lut) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kByte, "Wq must be uint8 [N, Kp/2]");
  const int64_t N = w_.size(0), Kp = 2 * w_.size(1);
  TORCH_CHECK(group_size % 32 == 0 && group_size > 0 && Kp % group_size == 0,
              "int8-activation int4 needs group_size a multiple of 32 dividing the codes' columns (", Kp,
              "), got group ", group_size);
  const int64_t G = Kp / group_size;
  Q4I8 op{Q4Scales(scales, zeros, lut, N, G, /*zeros_optional=*/true), w_.contiguous(), at::Tensor(), nullptr,
          nullptr, N, Kp, G, group_size};
  op.w = op.w_hold.data_ptr<uint8_t>();
  op.bias = bias_ptr(bias, N, op.bias_hold);
  return op;
}

void q4_i8(const Q4I8& op, const float* x, int64_t M, int64_t K, float* y, const I8Next* next, bool zeros,
           bool half_scales, bool half_zeros) {
  const Q4Scales& qs = op.qs;
  const int64_t N = op.N, Kp = op.Kp, G = op.G, group_size = op.group;
  TORCH_CHECK(K <= Kp, "int8-activation int4 needs x with at most the codes' columns (", Kp, ", group_size ",
              group_size, "), got K ", K);
  zeros = zeros && qs.has_zeros();
  // the fp16 scales (zero points) the loops read at group 32: held so (no fp32 array: always), or the
  // exact copy while the fp32 arrays are unchanged since it was made
  const bool use_h = group_size == 32 && qs.h && (half_scales || !qs.s);
  const bool use_hz = use_h && zeros && qs.hz && (half_zeros || !qs.z);
  // read once: the activations' layout and the loops that read it must agree even if set_act_isa runs now
  const int isa = g_act_isa.load(std::memory_order_relaxed);
  const bool lookup = qs.coded() && G >= kLookupMinGroups;
  // 8-bit codes not looked up in the loops, or fp16 arrays the loops cannot read (other groups, zero
  // points as fp16 beside fp32 scales): decoded to fp32 per chunk of rows by qs (q4_codes.h)
  const bool decoded = qs.coded() ? !lookup : (!qs.s && !use_h) || (zeros && !qs.z && !use_hz);
  const int64_t chunks = (Kp + 63) / 64, Kx = 64 * chunks;
  const bool wide = isa == kAvx512Vnni && (group_size == 32 || group_size % 64 == 0);  // gemv_i8_wide.h
  // whole 512-column spans in span_rows (gemv_i8_wide.h): group 32 (zero points: nib_finish)
  const int64_t spans = wide && group_size == 32 ? Kp / 512 : 0;
  const NibActs acts(M, chunks, G, spans);
  float *dv = acts.dv, *xs = acts.xs;
  for (int64_t m = 0; m < M; ++m) {
    int8_t* row = acts.xq + m * Kx;
    quantize_row_q4(x + m * K, K, Kp, group_size, row, dv + m * 8 * chunks, xs + m * G, -8, acts.xc + m * 8 * chunks);
    if (spans)
      to_span_layout(row, dv + m * 8 * chunks, acts.xc + m * 8 * chunks, xs + m * G, spans, acts.so + m * 16 * spans,
                     acts.sd + m * 16 * spans, acts.sx + m * 16 * spans);
    if (wide) to_wide_layout(row + 512 * spans, Kp / 64 - 8 * spans);  // whole 64-column chunks (a last 32 stay)
  }
  for (int64_t m0 = 0; m0 < M; m0 += kI8Rows) {
    I8Args a{acts.xq + m0 * Kx, dv + m0 * 8 * chunks, xs + m0 * G, op.w, qs.s, zeros ? qs.z : nullptr, op.bias,
             y + m0 * N, std::min<int64_t>(kI8Rows, M - m0), N, Kp, Kx, group_size};
    if (lookup) a.sc = qs.sc, a.zc = qs.zc, a.lut = qs.lut;
    if (use_h && !decoded) a.scales_h = qs.h, a.zeros_h = use_hz ? qs.hz : nullptr;  // every ISA's loops
    a.wide = wide;
    a.xc = acts.xc + m0 * 8 * chunks;
    a.spans = spans, a.so = acts.so + m0 * 16 * spans, a.sd = acts.sd + m0 * 16 * spans, a.sx = acts.sx + m0 * 16 * spans;
    if (next && m0 + kI8Rows >= M && !decoded) a.next = *next;  // the call's last part
    const int64_t group_bytes = qs.coded() ? 2 : (a.scales_h ? 2 : 4) + (!zeros ? 0 : a.zeros_h ? 2 : 4);
    run_rows(a, true, Kp / 2 + group_bytes * G, decoded ? &qs : nullptr, isa, zeros);
  }
}

at::Tensor linear_q4_i8(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t group_size,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lut,
                        const I8Next* next, const at::Tensor* out, bool half_scales) {
  check_x(x_);
  Q4I8 op = q4_i8_operands(w, scales, zeros, group_size, bias, lut);
  TORCH_CHECK(!half_scales || op.qs.add_half(), "half_scales needs float32 scales that float16 holds exactly");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = output(out, M, op.N, x.options());
  q4_i8(op, x.data_ptr<float>(), M, K, y.data_ptr<float>(), next, true);
  return y;
}

Q8I8 q8_i8_operands(const at::Tensor& w_, const at::Tensor& scales_, const std::optional<at::Tensor>& bias,
                    int64_t group_size) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kChar, "Wq must be int8 [N, K]");
  const int64_t N = w_.size(0), K = w_.size(1);
  TORCH_CHECK(group_size >= 0 && (group_size % 32 == 0 || group_size == 16),
              "int8-activation int8 needs one scale per row (group_size 0) or groups of 16 or a multiple of 32 columns");
  const bool half = scales_.scalar_type() == at::kHalf;
  TORCH_CHECK(!half || (group_size == 32 && K % 32 == 0),
              "float16 int8 scales need groups of 32 columns dividing K (GGUF Q8_0), got group ", group_size, ", K ",
              K);
  if (group_size == 0) {
    TORCH_CHECK(scales_.scalar_type() == at::kFloat && scales_.numel() == N, "scales must be float32 [N]");
  } else {
    TORCH_CHECK((half || scales_.scalar_type() == at::kFloat) && scales_.dim() == 2 && scales_.size(0) == N &&
                    scales_.size(1) == (K + group_size - 1) / group_size,
                "group-wise scales must be float32 (or float16 at group 32) [N, ceil(K/group_size)]");
  }
  Q8I8 op{w_.contiguous(), scales_.contiguous(), at::Tensor(), nullptr, nullptr, nullptr, N, K, group_size};
  op.w = op.w_hold.data_ptr<int8_t>();
  if (half) op.h = static_cast<const uint16_t*>(op.s_hold.data_ptr());  // and s null: no fp32 array
  else op.s = op.s_hold.data_ptr<float>();
  op.bias = bias_ptr(bias, N, op.bias_hold);
  return op;
}

bool Q8I8::add_half() {
  if (h) return true;
  if (group != 32) return false;
  h = exact_half_copy(s_hold, h_hold);
  return h != nullptr;
}

void q8_i8(const Q8I8& op, const float* x, int64_t M, float* y, const I8Next* next, bool half_scales) {
  const int64_t N = op.N, K = op.K, blocks = (K + 31) / 32;
  // read once: the activations' layout and the loops that read it must agree even if set_act_isa runs now
  const int isa = g_act_isa.load(std::memory_order_relaxed);
  // AVX-512 VNNI, group 32, whole blocks: 256-column spans (gemv_i8_wide.h q8_span_rows)
  const int64_t spans = isa == kAvx512Vnni && op.group == 32 && K % 32 == 0 ? (K + 255) / 256 : 0;
  // the codes [M, 32 blocks], d [M, blocks], then (spans) the span layout [M, 256 spans] and its lane
  // scales [M, 16 spans], in the thread's activation_scratch, each part on a 64-byte boundary (the
  // loops' 512-bit loads then never straddle two lines)
  const auto up = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t at_d = up(M * 32 * blocks), at_span = at_d + up(4 * M * blocks), at_sd = at_span + up(M * 256 * spans);
  int8_t* codes = activation_scratch(at_sd + 4 * M * 16 * spans);
  float* d = reinterpret_cast<float*>(codes + at_d);
  uint8_t* span_codes = reinterpret_cast<uint8_t*>(codes + at_span);
  float* sd = reinterpret_cast<float*>(codes + at_sd);
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, blocks, codes + m * 32 * blocks, d + m * blocks);
  const int8_t* xq = codes;
  int64_t Kx = 32 * blocks;
  if (spans) {
    for (int64_t m = 0; m < M; ++m)
      to_q8_span_layout(codes + m * Kx, d + m * blocks, K, spans, span_codes + m * 256 * spans, sd + m * 16 * spans);
    xq = reinterpret_cast<const int8_t*>(span_codes), Kx = 256 * spans;
  }
  // the fp16 scales: held so (no fp32 array: always; the 256-bit loops too), or the exact copy while the
  // fp32 array is unchanged since it was made (the span loop)
  const uint16_t* h = half_scales || !op.s ? op.h : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += kI8Rows) {
    I8Args a{xq + m0 * Kx, spans ? nullptr : d + m0 * blocks, nullptr, op.w, op.s, nullptr, op.bias, y + m0 * N,
             std::min<int64_t>(kI8Rows, M - m0), N, K, Kx, op.group};
    if (spans) a.spans = spans, a.sd = sd + m0 * 16 * spans;
    if (spans || !op.s) a.scales_h = h;
    if (next && m0 + kI8Rows >= M) a.next = *next;
    run_rows(a, false, K, nullptr, isa);
  }
}

at::Tensor linear_q8_i8(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias, int64_t group_size, const I8Next* next,
                        const at::Tensor* out, bool half_scales) {
  check_x(x_);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x_.size(1), "Wq must be int8 [N, K] matching x [M, K]");
  Q8I8 op = q8_i8_operands(w, scales, bias, group_size);
  TORCH_CHECK(!half_scales || op.add_half(), "half_scales needs group-32 scales that float16 holds exactly");
  const at::Tensor x = x_.contiguous();
  at::Tensor y = output(out, x.size(0), op.N, x.options());
  q8_i8(op, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), next);
  return y;
}

// ------------------------------------------------------------------------------------ int5 (Q5_0)

namespace {

void run_rows_q5(const I8Args& a) {
  const int isa = g_act_isa.load(std::memory_order_relaxed);
  for_row_blocks(a.N, a.K / 2 + a.K / 4, [&](int64_t n0, int64_t n1) {  // nibbles + high bits + scales
    if (isa == kAvx512Vnni)
      i8avx512vnni::q5_rows(a, n0, n1);
    else if (isa == kAvxVnni)
      i8avxvnni::q5_rows(a, n0, n1);
    else
      i8avx2::q5_rows(a, n0, n1);
  });
}

// w uint8 [N, Kp/2], high int32 [N, Kp/32], scales fp32 / fp16 [N, Kp/32] (compress/int5.py's buffers)
void check_q5(const at::Tensor& w, const at::Tensor& high, const at::Tensor& scales) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) % 16 == 0,
              "int5 Wq must be uint8 [N, Kp/2] with Kp a multiple of 32");
  const int64_t N = w.size(0), G = w.size(1) / 16;
  TORCH_CHECK(high.scalar_type() == at::kInt && high.dim() == 2 && high.size(0) == N && high.size(1) == G,
              "int5 high bits must be int32 [N, Kp/32]");
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == G,
              "int5 scales must be float32 or float16 [N, Kp/32]");
}

}  // namespace

at::Tensor linear_q5_i8(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& high_,
                        const at::Tensor& scales_, const std::optional<at::Tensor>& bias) {
  check_x(x_);
  check_q5(w_, high_, scales_);
  const int64_t M = x_.size(0), K = x_.size(1), N = w_.size(0), Kp = 2 * w_.size(1), G = Kp / 32;
  TORCH_CHECK(K <= Kp, "x has more columns (", K, ") than the int5 codes (", Kp, ")");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous(), high = high_.contiguous(), scales = scales_.contiguous();
  at::Tensor bh;
  const float* b = bias_ptr(bias, N, bh);
  const int64_t chunks = (Kp + 63) / 64, Kx = 64 * chunks;
  const NibActs acts(M, chunks, G);  // the int4 kernel's activation layout
  float *dv = acts.dv, *xs = acts.xs;
  for (int64_t m = 0; m < M; ++m)
    quantize_row_q4(x.data_ptr<float>() + m * K, K, Kp, 32, acts.xq + m * Kx, dv + m * 8 * chunks, xs + m * G, -16,
                    acts.xc + m * 8 * chunks);
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += kI8Rows) {
    // fp16 scales (GGUF Q5_0's, as Int5Linear holds them): read by the loops themselves (I8Args::scales_h)
    const bool half = scales.scalar_type() == at::kHalf;
    I8Args a{acts.xq + m0 * Kx, dv + m0 * 8 * chunks, xs + m0 * G, w.data_ptr<uint8_t>(),
             half ? nullptr : scales.data_ptr<float>(), nullptr, b, y.data_ptr<float>() + m0 * N,
             std::min<int64_t>(kI8Rows, M - m0), N, Kp, Kx, 32};
    if (half) a.scales_h = static_cast<const uint16_t*>(scales.data_ptr());
    a.high = reinterpret_cast<const uint32_t*>(high.data_ptr<int32_t>());
    a.xc = acts.xc + m0 * 8 * chunks;
    run_rows_q5(a);
  }
  return y;
}

// The same codes -> fp32 [R, Kp], w = (q - 16) * s: the int5 module's prefill / fp32 path (the product
// of a small integer and an fp16 scale is exact, so this equals GGUF's dequantization bit for bit).
at::Tensor dequant_q5(const at::Tensor& w_, const at::Tensor& high_, const at::Tensor& scales_) {
  check_q5(w_, high_, scales_);
  // fp16 scales widened for the call (the rows dequantized: a prefill chunk's, or the fp32-activation path)
  const at::Tensor w = w_.contiguous(), high = high_.contiguous(), scales = scales_.to(at::kFloat).contiguous();
  const int64_t R = w.size(0), Kp = 2 * w.size(1), G = Kp / 32, chunks = Kp / 64;
  at::Tensor out = at::empty({R, Kp}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint32_t* hp = reinterpret_cast<const uint32_t*>(high.data_ptr<int32_t>());
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_for(0, R, std::max<int64_t>(1, (64 << 10) / Kp), [&](int64_t r0, int64_t r1) {
    const __m256 v16 = _mm256_set1_ps(16.f);
    alignas(32) uint8_t q[64];
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = wp + r * Kp / 2;
      const uint32_t* hr = hp + r * G;
      const float* sr = sp + r * G;
      float* o = op + r * Kp;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32 * c));
        __m256i lo, hi;
        i8_q5_codes(v, hr, c, lo, hi);
        // byte j of lo / hi is column 2j / 2j + 1: interleave (per 128-bit lane), then put the lanes in order
        const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 32), _mm256_permute2x128_si256(a, b, 0x31));
        for (int i = 0; i < 8; ++i) {
          const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
          const __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
          const __m256 s = _mm256_set1_ps(sr[2 * c + i / 4]);
          _mm256_storeu_ps(o + 64 * c + 8 * i, _mm256_mul_ps(_mm256_sub_ps(code, v16), s));
        }
      }
      if (Kp % 64) {  // a last 32 columns (nib_rows' half-chunk layout)
        const int64_t b0 = 64 * chunks;  // its first column
        for (int64_t k = 0; k < 16; ++k) {
          const int b = wr[b0 / 2 + k];
          const int odd = ((b >> 5) << 2) | static_cast<int>((hr[G - 1] >> (2 * k)) & 3);
          o[b0 + 2 * k] = static_cast<float>((b & 31) - 16) * sr[G - 1];
          o[b0 + 2 * k + 1] = static_cast<float>(odd - 16) * sr[G - 1];
        }
      }
    }
  });
  return out;
}

void bind_int8_act(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("act_isa", &act_isa, "the instruction set of the int8-activation kernels: avx2, avx_vnni or avx512_vnni");
  m.def("act_isas", &act_isas, "the int8-activation instruction sets this CPU can run");
  m.def("set_act_isa", &set_act_isa, "use avx2 / avx_vnni / avx512_vnni for the int8-activation kernels",
        py::arg("name"));
  m.def("quantize_act", &quantize_act, "x [M,K] f32 -> (int8 codes [M, Kq], scales [M, Kq/32]) per block of 32",
        py::arg("x"));
  m.def("linear_q4_i8",
        [](const at::Tensor& x_, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& z, int64_t g,
           const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& lut, bool half_scales) {
          return linear_q4_i8(x_, w, s, z, g, b, lut, nullptr, nullptr, half_scales);
        },
        "int8(x) [M,K] @ dequant_int4(Wq, scales, zeros, G)^T (+bias); half_scales: the 512-bit group-32 loops read "
        "an fp16 copy of the scales, as the fused decode step does with a GGUF's",
        py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("lut") = py::none(), py::arg("half_scales") = false);
  // scales/zeros uint8 [N, G] with lut fp32 [512]: 8-bit scale codes (q4_codes.h; see kLookupMinGroups)
  // zeros=None: symmetric codes, w = (code - 8) * scale (GGUF Q4_0), without reading a zero per group
  m.def("linear_q5_i8", &linear_q5_i8, "int8(x) [M,K] @ dequant_int5(Wq, high, scales)^T (+bias), GGUF Q5_0 codes",
        py::arg("x"), py::arg("wq"), py::arg("high"), py::arg("scales"), py::arg("bias") = py::none());
  m.def("dequant_q5", &dequant_q5, "int5 Wq, high bits, scales [R, Kp/32] -> [R, Kp] fp32: (q - 16) * scale",
        py::arg("wq"), py::arg("high"), py::arg("scales"));
  m.def("linear_q8_i8",
        [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& b,
           int64_t g, bool half_scales) { return linear_q8_i8(x, w, s, b, g, nullptr, nullptr, half_scales); },
        "int8(x) [M,K] @ (Wq int8 * scales)^T (+bias); half_scales: the 512-bit group-32 span loop reads an fp16 "
        "copy of the scales, as the fused decode step does with a GGUF's",
        py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("bias") = py::none(), py::arg("group_size") = 0,
        py::arg("half_scales") = false);
}

}  // namespace leanformer
