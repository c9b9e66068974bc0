// Encoder self-attention on fp16 q/k/v for CPUs with AVX512-FP16 (attention_h16.h): what a float16 encoder
// (kernels/h16.py, models/bert.py) runs between its fused q/k/v matmul and the output projection, both
// fp16 there, so nothing is converted on the way. This file (AVX2) checks, threads over (batch, head)
// pairs (one at a time, tasks.h) and binds; the loops are in attention_h16_avx512fp16.cpp.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_h16.h"
#include "gemm_h16.h"  // has_avx512fp16, kH16Chain
#include "tasks.h"     // parallel_tasks

namespace leanformer {

at::Tensor checked_key_mask(const std::optional<at::Tensor>& key_mask, int64_t B, int64_t T);  // attention.cpp

// qkv fp16 [B * T, 3 * H * D] (rows: [q heads | k heads | v heads], the fused q/k/v matmul's output) ->
// (softmax(q k^T / sqrt(D), keys where key_mask) v as [B * T, H * D], fp16 or fp32, max |out|), or None
// when an fp16 chain could overflow: a score's (D * max|qkv|^2 > 30000) or P V's (kH16Chain * max|qkv| >
// 30000); the caller then widens qkv and runs the fp32 kernel. qkv_absmax: max |qkv| (the matmul reports
// it; all-MiniLM-L6-v2's is ~13, far inside both bounds).
std::optional<std::tuple<at::Tensor, double>> attention_h16(const at::Tensor& qkv, int64_t batch, int64_t heads,
                                                            const std::optional<at::Tensor>& key_mask,
                                                            double qkv_absmax, bool fp16_out) {
  TORCH_CHECK(has_avx512fp16(), "attention_h16 needs a CPU with AVX512-FP16");
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kHalf && qkv.dim() == 2 && qkv.stride(1) == 1,
              "qkv must be a float16 CPU tensor [B * T, 3 * H * D] with contiguous rows, got ", qkv.sizes(), " ",
              qkv.scalar_type());
  TORCH_CHECK(batch > 0 && heads > 0 && qkv.size(0) % batch == 0 && qkv.size(1) % (3 * heads) == 0 &&
                  (qkv.size(1) / (3 * heads)) % 16 == 0,
              "qkv [", qkv.size(0), ", ", qkv.size(1), "] is not [B * T, 3 * H * D] for B = ", batch, ", H = ", heads,
              " and a head size that is a multiple of 16");
  const int64_t B = batch, H = heads, T = qkv.size(0) / batch, D = qkv.size(1) / (3 * heads);
  const at::Tensor mask = checked_key_mask(key_mask, B, T);
  // p <= 1 and |v| <= qkv_absmax; |q . k| <= D qkv_absmax^2, the bound on every partial sum of its chain
  if (!(kH16Chain * qkv_absmax <= 30000.0 && D * qkv_absmax * qkv_absmax <= 30000.0)) return std::nullopt;
  at::Tensor out = at::empty({B * T, H * D}, qkv.options().dtype(fp16_out ? at::kHalf : at::kFloat));
  if (out.numel() == 0) return std::make_tuple(out, 0.0);
  H16AttnArgs a{};
  a.qkv = reinterpret_cast<const uint16_t*>(qkv.data_ptr<at::Half>());
  a.ld = qkv.stride(0);
  a.mask = mask.defined() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  a.B = B, a.H = H, a.T = T, a.D = D;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  a.out16 = fp16_out ? reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>()) : nullptr;
  a.out32 = fp16_out ? nullptr : out.data_ptr<float>();
  a.ldo = H * D;
  const int64_t bytes = h16_attn_scratch_bytes(T, D);
  std::vector<float> amax(static_cast<size_t>(at::get_num_threads()), 0.f);
  std::vector<std::unique_ptr<char[]>> scratch(amax.size());  // one per thread, made on its first head
  parallel_tasks(B * H, [&](int64_t bh) {
    const auto slot = static_cast<size_t>(at::get_thread_num());
    if (!scratch[slot]) scratch[slot].reset(new char[static_cast<size_t>(bytes)]);
    amax[slot] = std::max(amax[slot], h16_attention_heads(a, bh, bh + 1, scratch[slot].get()));
  });
  return std::make_tuple(out, static_cast<double>(*std::max_element(amax.begin(), amax.end())));
}

void bind_attention_h16(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_h16", &attention_h16,
        "qkv float16 [B*T, 3*H*D] -> (softmax(q k^T / sqrt(D), keys where key_mask) v [B*T, H*D] float16 or "
        "float32, max |out|): scores and softmax in fp16, p v in fp16 chains added in fp32; None when a chain "
        "could overflow",
        py::arg("qkv"), py::arg("batch"), py::arg("heads"), py::arg("key_mask") = py::none(),
        py::arg("qkv_absmax") = 0.0, py::arg("fp16_out") = true, py::call_guard<py::gil_scoped_release>());
}

}  // namespace leanformer
