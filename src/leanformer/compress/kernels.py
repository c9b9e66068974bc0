"""Integer weight formats and the packed low-bit matmul kernels that consume them.

Conventions (verified numerically against torch 2.13's kernels in tests/compress/test_kernels.py):
- int8: symmetric per output channel, ``w ≈ q * scale[n]``, q in [-qmax, qmax].
- int4: asymmetric per (output channel, group of ``group_size`` input columns), codes in [0, 15] and
  ``w ≈ (q - 8) * scale + zero`` with ``zero`` a float (not an integer zero point): this is what
  ``_weight_int4pack_mm*`` compute, so we quantize against exactly that formula.
- Scales/zeros are rounded to bf16 *before* the integer codes are chosen: saves stay compact (bf16
  scales, as in every older save) and torch's CUDA int4 kernel, which reads bf16, computes exactly the
  weights the codes were chosen against. leanformer's CPU kernels read them as fp32 (exact for any
  values, which GGUF's fp16 block scales need).
"""

from __future__ import annotations

import functools

import torch

from leanformer.errors import LeanformerError

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the CPU int4 kernel accepts only these
INT4_N_MULTIPLE = 16  # the CPU packer wants out_features % 16 == 0; we pad rows otherwise
CUDA_INNER_K_TILES = 8


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether this torch build registers ``op`` (e.g. "aten::_weight_int8pack_mm") for the device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def require_kernel(op: str, device: torch.device, what: str) -> None:
    if not has_kernel(op, device):
        raise LeanformerError(f"{what} is not available on {device.type} in torch {torch.__version__} ({op})")


def cpu_has_vnni() -> bool:
    """oneDNN's int8 GEMM without VNNI sums pairs of u8*s8 products in int16 and saturates unless the
    weights fit in 7 bits; with VNNI/AMX the full int8 range is exact."""
    try:
        return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers moved: stay safe (7-bit weights are exact everywhere)
        return False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether prefill-sized quantized matmuls should run in bf16: where bf16 GEMMs beat fp32
    (kernels.cpu.bf16_pays: AMX, or AVX-512 BF16 on AMD). Without AVX-512-BF16/AMX the packed kernels
    convert bf16 in software (measured 2x slower than fp32 GEMM at 128 rows); Intel's AVX-512 BF16
    without AMX runs bf16 at 0.55-0.7x fp32."""
    from leanformer.kernels.cpu import bf16_pays

    return bf16_pays()


# ----------------------------------------------------------------------------------------- int8 math


def int8_symmetric(
    w: torch.Tensor, qmax: int = 127, bf16_scales: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scales fp32 [N]) with w ≈ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    if bf16_scales:  # the weight-only kernel reads bf16 scales
        scales = scales.to(torch.bfloat16).float()
    q = torch.round(w / scales[:, None]).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q, scales


# ----------------------------------------------------------------------------------------- int4 math


def n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size], zero-padding the last group when K % group_size != 0."""
    n, k = w.shape
    pad = n_groups(k, group_size) * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, group_size)


def int4_params(
    w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None, bf16: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric parameters per group. w [N, K]; clip [N, G] optional shrink factors
    (AWQ's clipping search) applied to the group's min/max. Returns (scales, zeros) fp32 [N, G] holding
    bf16-representable values. A partial last group uses only its real columns."""
    n, k = w.shape
    wg = _grouped(w.float(), group_size)
    if k % group_size:  # padded zeros must not widen the last group's range
        last = wg[:, -1, : k % group_size]
        mx = torch.cat([wg[:, :-1].amax(-1), last.amax(-1, keepdim=True)], 1)
        mn = torch.cat([wg[:, :-1].amin(-1), last.amin(-1, keepdim=True)], 1)
    else:
        mx, mn = wg.amax(-1), wg.amin(-1)
    if clip is not None:
        mx, mn = mx * clip, mn * clip
    scales = ((mx - mn) / 15).clamp_min(1e-6)
    if not bf16:  # fp32 parameters (coded afterwards, e.g. by double_quant)
        return scales, mn + 8 * scales
    scales = scales.to(torch.bfloat16).float()
    zeros = (mn + 8 * scales).to(torch.bfloat16).float()
    return scales, zeros


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K], scales/zeros [N, G] -> codes uint8 [N, K] in [0, 15] (nearest under (q-8)*s+z)."""
    k = w.shape[1]
    s = scales.repeat_interleave(group_size, 1)[:, :k]
    z = zeros.repeat_interleave(group_size, 1)[:, :k]
    return torch.round((w.float() - z) / s + 8).clamp_(0, 15).to(torch.uint8)


def int4_dequant(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """codes uint8 [N, K], scales/zeros [N, G] -> fp32 [N, K]."""
    k = codes.shape[1]
    s = scales.float().repeat_interleave(group_size, 1)[:, :k]
    z = zeros.float().repeat_interleave(group_size, 1)[:, :k]
    return (codes.float() - 8) * s + z


def int4_fake_quant(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Round-trip w [N, K] through int4 RTN (used by searches that score candidate weights)."""
    s, z = int4_params(w, group_size, clip)
    return int4_dequant(int4_codes(w, s, z, group_size), s, z, group_size)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Portable storage: uint8 [N, K] (K even) -> uint8 [N, K/2], even column in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K]."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return out.reshape(packed.shape[0], -1)


# -------------------------------------------------------------------------------------- int4 kernels


def int4_pack(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """codes uint8 [N, K] -> the machine/device-specific layout torch's int4 matmul consumes (Int4Linear
    uses it on CUDA only; on CPU it serves the tests that pin our convention to torch's)."""
    if device.type == "cpu":
        require_kernel("aten::_convert_weight_to_int4pack_for_cpu", device, "int4 weight packing")
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(device, torch.int32), 2)
    require_kernel("aten::_convert_weight_to_int4pack", device, "int4 weight packing")
    # CUDA packer takes two codes per byte with the even column in the high nibble (torchao's layout).
    c = codes.to(device)
    return torch.ops.aten._convert_weight_to_int4pack(
        ((c[:, ::2] << 4) | c[:, 1::2]).contiguous(), CUDA_INNER_K_TILES
    )


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, K] @ dequant(W).T -> bf16 [M, N]; sz bf16 [G, N, 2] holds (scale, zero) pairs."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)


# -------------------------------------------------------------------------------------- int8 kernels


def quantize_rows_int8(x: torch.Tensor, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x [M, K] float -> (q [M, K], scale fp32 [M, 1]), q = round(x / s) in
    [-127, 127], stored as int8, or with shift=128 as uint8 q + 128 (oneDNN's u8 path is faster and the
    constant zero point 128 is compensated inside the kernel). Per-token scales are what keep encoder
    embeddings faithful: a per-tensor scale is ruined by a few outlier tokens."""
    # abs().amax() is ~20x faster than vector_norm(inf) on CPU (measured [4096, 384]: 0.12 vs 2.3 ms)
    s = x.abs().amax(-1, keepdim=True).float().clamp_min_(1e-8).div_(127)
    if shift:  # x / s + 128.5 is ≥ 1.5, so truncating to uint8 rounds half up
        return (x * (1.0 / s)).add_(shift + 0.5).to(torch.uint8), s
    return torch.round(x * (1.0 / s)).to(torch.int8), s


def onednn_prepack(w_int8: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(w_int8, None)


def int8_dynamic_mm_cpu(
    xq: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor, zp: torch.Tensor
) -> torch.Tensor:
    """xq [M, K] (int8, or uint8 holding q + 128) @ int8 W.T through oneDNN, with the activation scale
    passed as 1 (the per-token scale is applied by the caller) and per-channel weight scales fp32 [N]
    fused (zp: int64 zeros [N] for the weights): -> fp32 [M, N]."""
    x_zp = 128 if xq.dtype == torch.uint8 else 0
    return torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, x_zp, packed, w_scales, zp, None, 1.0, 0, torch.float32, "none", [], ""
    )
