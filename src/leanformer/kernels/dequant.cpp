// Dequantize int8 / int4 weight rows to fp32 or bf16 in one pass (AVX2), for prefill-sized matmuls:
// the quantized Linears dequantize a chunk of rows and hand it to oneDNN's GEMM, so this replaces
// ~8 torch passes (nibble split, stack, convert, subtract, scale, shift, cast) with one.
//
// Same arithmetic as the pure-torch formulas (compress/int8.py, int4.py): int8 q * s; int4
// (code - 8) * s + z, multiply then add (with bf16/fp16 scales the product is exact, so even a
// contracted FMA rounds identically). bf16 output rounds to nearest even, like torch's .to(bfloat16).
#include "common.h"
#include "q4_codes.h"

#include <ATen/ops/empty.h>

#include <cstring>

namespace leanformer {
namespace {

// 8 floats -> 8 bf16 (round to nearest even; weights are finite, so no NaN handling)
inline void store8(uint16_t* dst, __m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}
inline void store1(uint16_t* dst, float v) { *dst = to_bf16(v); }
inline void store1(float* dst, float v) { *dst = v; }

// Rows in parallel, each task at least ~64K weights (below that threading costs more than it saves).
template <class Fn>
void rows_parallel(int64_t R, int64_t K, const Fn& fn) {
  at::parallel_for(0, R, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

template <class T>
void q4_dequant(const uint8_t* w, const Q4Scales& qs, T* out, int64_t R, int64_t K, int64_t row_bytes, int64_t G,
                int64_t group_size) {
  // rows in parallel, each task at least ~64K weights; 8-bit scale codes decoded per chunk of rows
  at::parallel_for(0, R, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
    qs.chunks(r0, r1, [&](int64_t c0, int64_t c1, const float* sc, const float* zc) {
      for (int64_t r = c0; r < c1; ++r) {
        const uint8_t* wr = w + r * row_bytes;
        const float *scales = sc + (r - c0) * G, *zeros = zc ? zc + (r - c0) * G : nullptr;
        T* o = out + r * K;
        const __m128i mask = _mm_set1_epi8(0x0F);
        for (int64_t g = 0; g < G; ++g) {
          const float s = scales[g], z = zeros ? zeros[g] : 0.f;
          const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), v8 = _mm256_set1_ps(8.f);
          int64_t k = g * group_size;  // even (group_size is): a byte boundary
          const int64_t k1 = std::min(K, k + group_size);
          for (; k + 16 <= k1; k += 16) {
            const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k / 2));
            // bytes j: low nibble = column 2j, high = 2j + 1 -> interleave into column order
            const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
            const __m256 c0v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
            const __m256 c1v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
            store8(o + k, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(c0v, v8), vs), vz));
            store8(o + k + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(c1v, v8), vs), vz));
          }
          for (; k < k1; ++k) {
            const int code = (k % 2 == 0) ? (wr[k / 2] & 15) : (wr[k / 2] >> 4);
            store1(o + k, static_cast<float>(code - 8) * s + z);
          }
        }
      }
    });
  });
}

template <class T>
void q8_dequant(const int8_t* w, const float* scales, T* out, int64_t R, int64_t K, int64_t group_size) {
  const int64_t gs = group_size > 0 ? group_size : K, G = (K + gs - 1) / gs;
  rows_parallel(R, K, [&](int64_t r) {
    const int8_t* wr = w + r * K;
    T* o = out + r * K;
    for (int64_t g = 0; g < G; ++g) {
      const float s = scales[r * G + g];
      const __m256 vs = _mm256_set1_ps(s);
      int64_t k = g * gs;
      const int64_t k1 = std::min(K, k + gs);
      for (; k + 8 <= k1; k += 8) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k));
        store8(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), vs));
      }
      for (; k < k1; ++k) store1(o + k, static_cast<float>(wr[k]) * s);
    }
  });
}

at::Tensor output(int64_t R, int64_t K, bool bf16) {
  return at::empty({R, K}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
}

}  // namespace

at::Tensor dequant_q4(const at::Tensor& w_, const at::Tensor& scales_, const std::optional<at::Tensor>& zeros_,
                      int64_t group_size, int64_t K, bool bf16, const std::optional<at::Tensor>& lut) {
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "group_size must be positive and even");
  const int64_t G = (K + group_size - 1) / group_size;
  // rows may be longer than ceil(K/2) bytes: Int4Linear's rows span K rounded up to a group multiple
  TORCH_CHECK(w_.device().is_cpu() && w_.dim() == 2 && w_.scalar_type() == at::kByte && w_.size(1) * 2 >= K,
              "Wq must be uint8 [R, >= ceil(K/2)] (two 4-bit codes per byte)");
  const int64_t R = w_.size(0), row_bytes = w_.size(1);
  const Q4Scales qs(scales_, zeros_, lut, R, G, /*zeros_optional=*/true);  // none: symmetric (Q4_0)
  const at::Tensor w = w_.contiguous();
  at::Tensor out = output(R, K, bf16);
  if (bf16)
    q4_dequant(w.data_ptr<uint8_t>(), qs, reinterpret_cast<uint16_t*>(out.data_ptr()), R, K, row_bytes, G,
               group_size);
  else
    q4_dequant(w.data_ptr<uint8_t>(), qs, out.data_ptr<float>(), R, K, row_bytes, G, group_size);
  return out;
}

at::Tensor dequant_q8(const at::Tensor& w_, const at::Tensor& scales_, int64_t group_size, bool bf16) {
  TORCH_CHECK(w_.device().is_cpu() && w_.dim() == 2 && w_.scalar_type() == at::kChar, "Wq must be int8 [R, K]");
  const int64_t R = w_.size(0), K = w_.size(1);
  TORCH_CHECK(group_size >= 0, "group_size must be >= 0 (0: one scale per row)");
  const int64_t G = group_size > 0 ? (K + group_size - 1) / group_size : 1;
  TORCH_CHECK((scales_.scalar_type() == at::kFloat || scales_.scalar_type() == at::kHalf) &&
                  scales_.numel() == R * G && scales_.size(0) == R,
              "scales must be float32 or float16 [R] or [R, ceil(K/group_size)]");
  // fp16 scales (GGUF Q8_0 blocks, an embedding's looked-up rows) widened for the call: [R, G] beside [R, K]
  const at::Tensor w = w_.contiguous(), scales = scales_.to(at::kFloat).contiguous();
  at::Tensor out = output(R, K, bf16);
  if (bf16)
    q8_dequant(w.data_ptr<int8_t>(), scales.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()), R, K,
               group_size);
  else
    q8_dequant(w.data_ptr<int8_t>(), scales.data_ptr<float>(), out.data_ptr<float>(), R, K, group_size);
  return out;
}

}  // namespace leanformer
