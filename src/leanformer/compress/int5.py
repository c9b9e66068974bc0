"""Int5Linear: 5-bit weights, symmetric, one scale per 32 columns: GGUF Q5_0 kept at 5 bits.

llama.cpp falls back to Q5_0 for the matrices of a K-quant file whose rows are not a multiple of 256
(every 576-column matrix of SmolLM2 in a Q4_K_M file). Stored as int8 those take 36 bytes per 32
weights in memory; here 24 (16 of nibbles, 4 of 5th bits, a 4-byte scale), against the file's 22.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from leanformer import kernels as lk
from leanformer.compress import kernels as K
from leanformer.compress.qbase import QuantLinear
from leanformer.errors import LeanformerError

GROUP = 32  # columns per scale: Q5_0's block


def _chunk_bit_columns() -> np.ndarray:
    """[64]: the column of a 64-column chunk whose 5th bit is bit b of the chunk's 64 (its two int32
    words, low first): the order kernels/gemv_i8_impl.h (i8_high16) expands with two shifts. Bit
    8p + 4 + Q holds even column 2 (8Q + p), bit 8p + Q odd column 2 (8Q + p) + 1 (p < 8, Q < 4)."""
    p, r = np.divmod(np.arange(64), 8)
    return np.where(r >= 4, 2 * (8 * (r - 4) + p), 2 * (8 * r + p) + 1)


CHUNK_BIT_COLUMNS = _chunk_bit_columns()


def pack_high_bits(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, Kp] in 0..31 (Kp a multiple of 32) -> their 5th bits as int32 [N, Kp/32]: per
    64-column chunk two words in CHUNK_BIT_COLUMNS' order; a last 32-column block, one word with
    column j at bit j. Temporaries are uint8 [N, Kp] (numpy's packbits): int64 ones, freed in a loop
    over a model's matrices, measured +360 MB of fragmented heap in RSS after loading SmolLM2."""
    n, kp = codes.shape
    if kp % GROUP:
        raise LeanformerError(f"int5 codes need a multiple of {GROUP} columns, got {kp}")
    full = kp // 64 * 64
    bits = (codes.cpu() >> 4).numpy()  # [N, Kp] 0/1
    parts = [bits[:, :full].reshape(n, -1, 64)[:, :, CHUNK_BIT_COLUMNS].reshape(n, -1)]  # bit order
    if kp > full:
        parts.append(bits[:, full:])
    packed = np.packbits(np.concatenate(parts, 1), axis=-1, bitorder="little")  # [N, Kp/8] bytes
    return torch.from_numpy(np.ascontiguousarray(packed).view("<i4")).to(codes.device)


def unpack_high_bits(high: torch.Tensor, kp: int) -> torch.Tensor:
    """pack_high_bits' inverse: int32 [N, Kp/32] -> uint8 [N, Kp] 0/1 in column order."""
    n, full = high.shape[0], kp // 64 * 64
    shifts = torch.arange(32, dtype=torch.int64, device=high.device)
    bits = (((high.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 1).to(torch.uint8)  # [N, G, 32]
    head = torch.empty(n, full // 64, 64, dtype=torch.uint8, device=high.device)
    head[:, :, torch.from_numpy(CHUNK_BIT_COLUMNS)] = bits[:, : full // 32].reshape(n, -1, 64)
    return torch.cat([head.reshape(n, full), bits[:, full // 32 :].reshape(n, -1)], 1)


class Int5Linear(QuantLinear):
    """y = x @ dequant(W).T + b, w = (q - 16) * scale with q in 0..31 and one scale per [row, 32
    columns] (GGUF Q5_0, bit for bit: the product of a 5-bit integer and an fp16 scale is exact).

    Buffers (state dict and runtime alike): `qweight` uint8 [N, Kp/2], the codes' low 4 bits two per
    byte exactly as Int4Linear's (even column in the low nibble; Kp = in_features rounded up to 32,
    padded columns hold code 16, weight 0); `qhigh` int32 [N, Kp/32], the 5th bits (pack_high_bits'
    order); `scales` fp32 [N, Kp/32], saved in the smallest exact float dtype (fp16 for GGUF).

    Paths: decode in the fused step (models/fused.py) on int8 activations (kernels/gemv_i8.cpp
    linear_q5_i8); everything else, the fused step's fp32 activations included, multiplies by the
    dequantized weight (kernels' dequant_q5, or the torch formula where the kernels are absent)."""

    EXACT = ("scales", "input_scale")
    COMPACT = ("scales",)
    # As Int8Linear's: set by the fused decode step for an LM head (int8 activations per block of 32).
    int8_activations: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = GROUP,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        if group_size != GROUP:
            raise LeanformerError(f"int5 group_size must be {GROUP} (GGUF Q5_0's block), got {group_size}")
        self.group_size = GROUP
        g = K.n_groups(in_features, GROUP)
        self.k_padded = g * GROUP
        # code 16 everywhere (weight 0): low nibbles 0, every 5th bit set
        self.register_buffer(
            "qweight", torch.zeros(out_features, self.k_padded // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("qhigh", torch.full((out_features, g), -1, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float32, device=device))

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Int5Linear:
        """codes uint8 [N, K] in 0..31 and scales [N, ceil(K/32)]: w = (code - 16) * scale."""
        n, k = codes.shape
        m = cls(k, n, GROUP, bias is not None, codes.device)
        m.set_codes(codes)
        m.scales.copy_(scales)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def set_codes(self, codes: torch.Tensor) -> None:
        """codes uint8 [N, K or Kp] in 0..31 -> qweight / qhigh (columns past K get code 16)."""
        if codes.dtype != torch.uint8 or codes.shape[0] != self.out_features:
            raise LeanformerError(f"int5 codes must be uint8 [{self.out_features}, K], got {codes.dtype}")
        if int(codes.max()) > 31:
            raise LeanformerError("int5 codes must lie in 0..31")
        if codes.shape[1] != self.k_padded:
            codes = F.pad(codes, (0, self.k_padded - codes.shape[1]), value=16)
        self.qweight = K.pack_nibbles(codes & 15).contiguous()
        self.qhigh = pack_high_bits(codes).contiguous()

    def codes(self) -> torch.Tensor:
        """Codes uint8 [N, Kp] in 0..31."""
        return K.unpack_nibbles(self.qweight) | (unpack_high_bits(self.qhigh, self.k_padded) << 4)

    # -------------------------------------------------------------------------------- compute

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.k_padded != self.in_features:  # the kernels' K is the codes' Kp
            x = F.pad(x, (0, self.k_padded - self.in_features))
        ext = lk.ext()
        if self.int8_activations:
            return ext.linear_q5_i8(x, self.qweight, self.qhigh, self.scales, bias)
        return ext.linear_f32(x, ext.dequant_q5(self.qweight, self.qhigh, self.scales), bias)

    def decode_operands(self) -> tuple:
        # the fused step's "q5" kind takes the high bits in the zeros slot
        return ("q5", self.qweight, self.scales, self.qhigh, GROUP, self.k_padded)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """fp32 [R, K]; rows a slice or an index tensor. The torch reference of dequant_q5."""
        q = self.qweight[rows]  # [R, Kp/2]
        n = q.shape[0]
        lo = torch.stack((q & 0xF, q >> 4), dim=-1).view(n, self.k_padded)
        c = lo | (unpack_high_bits(self.qhigh[rows], self.k_padded) << 4)
        w = c.view(n, -1, GROUP).float().sub_(16).mul_(self.scales[rows][:, :, None]).view(n, self.k_padded)
        return w if self.k_padded == self.in_features else w[:, : self.in_features]

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        w = lk.ext().dequant_q5(self.qweight[rows], self.qhigh[rows], self.scales[rows])
        w = w if self.k_padded == self.in_features else w[:, : self.in_features]
        return w.to(torch.bfloat16) if bf16 else w  # round to nearest even, as dequant_q4's bf16

    def extra_repr(self) -> str:
        pad = ", padded_in" if self.k_padded != self.in_features else ""
        return super().extra_repr() + f", bits=5, group_size={GROUP}{pad}"
