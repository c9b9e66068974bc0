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


# Byte j = 8Q + p of a 64-column chunk's 32 code bytes reads E >> SHIFT[j] (kernels/gemv_i8_impl.h
# i8_q5_codes: qword lane Q of the broadcast E shifted right by 2Q, byte p of it).
SHIFT = (8 * (np.arange(32) % 8) + 2 * (np.arange(32) // 8)).astype(np.uint64)
_ROWS = 256  # rows packed per step: keeps the uint64 temporaries at [256, Kp] (~1 MB for 576 columns)
PACKING = 2  # the `packing` buffer's value: this XOR layout (1, implied when it is absent: 5th bits apart)


def _pack_block(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8 [R, Kp] in 0..31 -> (bytes uint8 [R, Kp/2], words uint32 [R, Kp/32]). In uint8 /
    uint16 only: uint64 temporaries measured +10 MB of heap left resident after loading SmolLM2."""
    r, kp = codes.shape
    full = kp // 64 * 64
    lo, hi = codes[:, :full:2].reshape(r, -1, 32), codes[:, 1:full:2].reshape(r, -1, 32)  # [R, C, 32]
    # E: bits SHIFT[j], +1 hold code(2j+1)'s bits 0-1 XOR code(2j)'s bits 3-4 (A_j's bits 3-4, which the
    # kernel's A_j >> 3 brings there); A_j's top 3 bits then fix hi's bits 2-4 against S_j's.
    e2 = (hi & 3) ^ ((lo >> 3) & 3)  # [R, C, 32], byte j = 8Q + p
    eb = e2[..., 0:8] | (e2[..., 8:16] << 2) | (e2[..., 16:24] << 4) | (e2[..., 24:32] << 6)  # E's byte p
    nxt = np.concatenate([eb[..., 1:], np.zeros_like(eb[..., :1])], -1)  # byte p + 1 (0 past E)
    e16 = eb.astype(np.uint16) | (nxt.astype(np.uint16) << 8)  # bits 8p .. 8p + 15 of E
    s = np.concatenate([(e16 >> (2 * q)) & 31 for q in range(4)], -1).astype(np.uint8)  # S_j
    a = lo | ((((hi >> 2) ^ (s >> 2)) & 7) << 5)
    e = np.ascontiguousarray(eb).reshape(r, -1).view("<u4")  # [R, 2C]: word 2c = E's bytes 0-3
    parts_a, parts_w = [a.reshape(r, -1)], [e]
    if kp > full:  # a last 32 columns: A_k = code 2k | (code 2k+1 >> 2) << 5, word bits 2k, 2k+1
        t_lo, t_hi = codes[:, full::2], codes[:, full + 1 :: 2]  # [R, 16]
        parts_a.append(t_lo | ((t_hi >> 2) << 5))
        w = np.bitwise_or.reduce(
            (t_hi & 3).astype(np.uint32) << (2 * np.arange(16, dtype=np.uint32)), axis=-1
        )
        parts_w.append(w[:, None])
    return np.concatenate(parts_a, 1), np.concatenate(parts_w, 1)


def pack_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, Kp] in 0..31 (Kp a multiple of 32) -> (qweight uint8 [N, Kp/2], qhigh int32
    [N, Kp/32]) in the kernels' layout (i8_q5_codes): per 64-column chunk 32 bytes A and 64 bits E,
    code 2j = A_j & 31, code 2j+1 = ((A_j >> 3) ^ (E >> SHIFT[j])) & 31; a last 32 columns as
    _pack_block says. Packed _ROWS rows at a time (uint64 temporaries of a whole matrix, freed in a
    loop over a model's matrices, fragment the heap: RSS after load counts them)."""
    n, kp = codes.shape
    if kp % GROUP:
        raise LeanformerError(f"int5 codes need a multiple of {GROUP} columns, got {kp}")
    c = codes.cpu().numpy()
    # torch's allocator (64-byte aligned: QuantLinear._tidy would copy numpy's 16-byte aligned arrays)
    qweight, qhigh = torch.empty(n, kp // 2, dtype=torch.uint8), torch.empty(n, kp // 32, dtype=torch.int32)
    qw, words = qweight.numpy(), qhigh.numpy().view(np.uint32)
    for r0 in range(0, n, _ROWS):
        qw[r0 : r0 + _ROWS], words[r0 : r0 + _ROWS] = _pack_block(c[r0 : r0 + _ROWS])
    return qweight.to(codes.device), qhigh.to(codes.device)


def unpack_codes(qweight: torch.Tensor, qhigh: torch.Tensor, kp: int) -> torch.Tensor:
    """pack_codes' inverse (torch, any device): -> codes uint8 [N, Kp] in 0..31."""
    n, full = qweight.shape[0], kp // 64 * 64
    a = qweight[:, : full // 2].reshape(n, -1, 32).to(torch.int64)  # [N, C, 32]
    w = qhigh.to(torch.int64) & 0xFFFFFFFF
    e = w[:, 0 : full // 32 : 2] | (w[:, 1 : full // 32 : 2] << 32)  # [N, C] E (int64: >> sign-fills,
    shift = torch.from_numpy(SHIFT.astype(np.int64)).to(qweight.device)  # see `keep`)
    keep = (1 << (64 - shift).clamp(max=5)) - 1  # a logical shift's 0s past bit 63 (int64 >> fills sign)
    s = (e[..., None] >> shift) & keep
    lo, hi = a & 31, ((a >> 3) ^ s) & 31
    out = [torch.stack((lo, hi), -1).reshape(n, full)]
    if kp > full:
        t = qweight[:, full // 2 :].to(torch.int64)  # [N, 16]
        bits = (w[:, -1:] >> (2 * torch.arange(16, device=qweight.device))) & 3
        out.append(torch.stack((t & 31, ((t >> 5) << 2) | bits), -1).reshape(n, 32))
    return torch.cat(out, 1).to(torch.uint8)


def _old_codes(qweight: torch.Tensor, qhigh: torch.Tensor, kp: int) -> torch.Tensor:
    """Codes uint8 [N, Kp] of the first packing (saves made before PACKING 2): qweight as Int4Linear's
    nibbles, qhigh the 5th bits, per 64-column chunk bit 8p + 4 + Q for even column 2 (8Q + p) and bit
    8p + Q for odd column 2 (8Q + p) + 1; a last 32 columns bit j for column j."""
    n, full = qweight.shape[0], kp // 64 * 64
    p, r = np.divmod(np.arange(64), 8)
    cols = torch.from_numpy(np.where(r >= 4, 2 * (8 * (r - 4) + p), 2 * (8 * r + p) + 1))
    bits = (((qhigh.to(torch.int64) & 0xFFFFFFFF)[..., None] >> torch.arange(32)) & 1).to(torch.uint8)
    head = torch.empty(n, full // 64, 64, dtype=torch.uint8)
    head[:, :, cols] = bits[:, : full // 32].reshape(n, -1, 64)
    high = torch.cat([head.reshape(n, full), bits[:, full // 32 :].reshape(n, -1)], 1)
    return K.unpack_nibbles(qweight) | (high << 4)


class Int5Linear(QuantLinear):
    """y = x @ dequant(W).T + b, w = (q - 16) * scale with q in 0..31 and one scale per [row, 32
    columns] (GGUF Q5_0, bit for bit: the product of a 5-bit integer and an fp16 scale is exact).

    Buffers (state dict and runtime alike): `qweight` uint8 [N, Kp/2] and `qhigh` int32 [N, Kp/32], the
    codes in pack_codes' layout (Kp = in_features rounded up to 32, padded columns hold code 16, weight
    0); `scales` [N, Kp/32], fp32 or fp16 where exact (GGUF Q5_0: QuantLinear.compact_scales, the
    kernels read fp16), saved in the smallest exact float dtype (fp16 for GGUF); `packing`
    uint8 [1] = PACKING. A state dict without `packing` (saved before it) holds the first layout and is
    repacked on load.

    Paths: decode in the fused step (models/fused.py) on int8 activations (kernels/gemv_i8.cpp
    linear_q5_i8); everything else, the fused step's fp32 activations included, multiplies by the
    dequantized weight (kernels' dequant_q5, or the torch formula where the kernels are absent)."""

    EXACT = ("scales", "input_scale")
    COMPACT = ("scales",)
    HALF_SCALES = ("scales",)  # GGUF Q5_0's fp16 block scales, held as such (QuantLinear.compact_scales)
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
        # codes 0 with scales 0: weight 0. All zeros, so the pages stay untouched (not resident) until
        # a load replaces them (a written pattern here measured +7 MB RSS after loading SmolLM2)
        self.register_buffer(
            "qweight", torch.zeros(out_features, self.k_padded // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("qhigh", torch.zeros(out_features, g, dtype=torch.int32, device=device))
        self.register_buffer("packing", torch.tensor([PACKING], dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=torch.float32, device=device))

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
        qweight, qhigh = pack_codes(codes)
        self.qweight, self.qhigh = qweight.contiguous(), qhigh.contiguous()

    def codes(self) -> torch.Tensor:
        """Codes uint8 [N, Kp] in 0..31."""
        return unpack_codes(self.qweight, self.qhigh, self.k_padded)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A save from before `packing` existed: the first layout (_old_codes), repacked here.
        if prefix + "packing" not in state_dict and prefix + "qhigh" in state_dict:
            qw, qh = state_dict[prefix + "qweight"], state_dict[prefix + "qhigh"]
            qw2, qh2 = pack_codes(_old_codes(qw.cpu(), qh.cpu(), 2 * qw.shape[1]))
            state_dict[prefix + "qweight"], state_dict[prefix + "qhigh"] = (
                qw2.to(qw.device),
                qh2.to(qh.device),
            )
            state_dict[prefix + "packing"] = torch.tensor([PACKING], dtype=torch.uint8)
        if prefix + "packing" in state_dict and int(state_dict[prefix + "packing"][0]) != PACKING:
            raise LeanformerError(
                f"{prefix}packing: int5 layout {int(state_dict[prefix + 'packing'][0])} is not this version's"
                f" ({PACKING}); upgrade leanformer or re-create the model from its GGUF file"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -------------------------------------------------------------------------------- compute

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.k_padded != self.in_features:  # the kernels' K is the codes' Kp
            x = F.pad(x, (0, self.k_padded - self.in_features))
        ext = lk.ext()
        if self.int8_activations:
            return ext.linear_q5_i8(x, self.qweight, self.qhigh, self.scales, bias)
        return ext.linear_f32(x, ext.dequant_q5(self.qweight, self.qhigh, self.scales), bias)

    def _reads_half_scales(self) -> bool:
        return True  # group 32 always: the int8-activation loops read fp16 (kernels/gemv_i8.cpp linear_q5_i8)

    def decode_operands(self) -> tuple:
        # the fused step's "q5" kind takes the high bits in the zeros slot
        return ("q5", self.qweight, self.scales, self.qhigh, GROUP, self.k_padded)

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """fp32 [R, K]; rows a slice or an index tensor. The torch reference of dequant_q5."""
        c = unpack_codes(self.qweight[rows], self.qhigh[rows], self.k_padded)  # [R, Kp]
        n = c.shape[0]
        w = (
            c.view(n, -1, GROUP)
            .float()
            .sub_(16)
            .mul_(self.scales[rows].float()[:, :, None])
            .view(n, self.k_padded)
        )
        return w if self.k_padded == self.in_features else w[:, : self.in_features]

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        w = lk.ext().dequant_q5(self.qweight[rows], self.qhigh[rows], self.scales[rows])
        w = w if self.k_padded == self.in_features else w[:, : self.in_features]
        return w.to(torch.bfloat16) if bf16 else w  # round to nearest even, as dequant_q4's bf16

    def extra_repr(self) -> str:
        pad = ", padded_in" if self.k_padded != self.in_features else ""
        return super().extra_repr() + f", bits=5, group_size={GROUP}{pad}"
