"""Pure-torch references of the int8-activation kernels (gemv_i8.cpp): the same quantized math in
float64, for tests and for reading.

Activations are quantized per row and block of 32 columns: d = max|x| / 127 over the block,
q = round-half-even(x * (1 / d)) in [-127, 127] (fp32 arithmetic, as the kernel does it; d = 0 and
q = 0 for an all-zero block). The kernels then compute exactly sum_k (q_k d_b) * w_k with integer
dot products per block, so they match these references up to fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanformer.kernels import dequant_int4, dequant_int8


def ref_quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes int8 [M, Kq], scales fp32 [M, Kq / 32]), Kq = K rounded up to 32 (zeros)."""
    m, k = x.shape
    kq = -(-k // 32) * 32
    xb = F.pad(x.float(), (0, kq - k)).view(m, -1, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).to(torch.int8)
    return q.view(m, kq), d


def ref_dequantize_act(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> float64 [M, K]: the activations the int8 kernels effectively multiply."""
    q, d = ref_quantize_act(x)
    m, k = x.shape
    return (q.double().view(m, -1, 32) * d.double()[..., None]).view(m, -1)[:, :k]


def ref_linear_q4_i8(x, wq, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """float64 [M, N]: int8(x) @ dequant_int4(wq, scales, zeros)^T (+ bias); x may be narrower than the
    codes (zero-padded, as the fused step's k_padded)."""
    kp = 2 * wq.shape[1]
    xd = F.pad(ref_dequantize_act(x), (0, kp - x.shape[1]))
    y = xd @ dequant_int4(wq, scales, zeros, group_size, kp).double().T
    return y if bias is None else y + bias.double()


def ref_linear_q8_i8(x, wq, scales, bias=None, group_size: int = 0) -> torch.Tensor:
    """float64 [M, N]: int8(x) @ (wq * scales)^T (+ bias); scales [N] or [N, ceil(K / group_size)]."""
    y = ref_dequantize_act(x) @ dequant_int8(wq, scales, group_size or None).double().T
    return y if bias is None else y + bias.double()
