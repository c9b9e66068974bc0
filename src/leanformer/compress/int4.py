"""Int4Linear: int4 weights, asymmetric per (output channel, group of input columns)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanformer import kernels as lk
from leanformer.compress import double_quant as DQ
from leanformer.compress import kernels as K
from leanformer.compress.qbase import QuantLinear
from leanformer.errors import LeanformerError
from leanformer.kernels.cpu import int8_activations

ROWS_ELEMS = 1 << 22  # weights rounded per slice (16 MB of fp32 temporaries each)


class Int4Linear(QuantLinear):
    """y = x @ dequant(W).T + b, W int4 group-wise: w = (q - 8) * scale + zero per [row, group].

    Buffers (state dict and runtime alike): `qweight` uint8 [N, Kp/2], two codes per byte with the even
    column in the low nibble (Kp = in_features rounded up to a group multiple; padded columns hold code
    8 and meet zero-padded inputs), which is also the layout leanformer's GEMV kernel reads; `scales`
    and `zeros` [N, G] fp32, or fp16 where that holds every value (`compact_scales`, group 32: a GGUF's
    block scales; the kernels read fp16 themselves). Saved scales/zeros take the smallest exact float
    dtype: bf16 for our quantizers (the format of older saves), fp16 or fp32 for GGUF Q4_0 / Q4_1 (zero =
    min + 8 * scale). Write them through `set_params` (an in-place write into fp16 buffers rounds).

    With `scale_bits=8` the module holds `scale_codes` / `zero_codes` uint8 [N, G] and `scale_ranges`
    fp32 [4] instead (compress/double_quant.py: 4.5 bits per weight at group 32) and no fp32 [N, G]
    scales/zeros at all: the kernels read the codes through a 512-entry fp32 table (`lut()`, rebuilt
    from scale_ranges when needed), and the torch paths decode only the rows they work on
    (`group_params`), so the model takes its file size in RAM.

    With `symmetric=True` (GGUF Q4_0: w = (q - 8) * scale) there is no `zeros` buffer at all (None, and
    none in the state dict): every kernel takes no zero points as all zero, and the torch paths
    (`group_params`) hand out zeros made for the call. Q4_0's fp32 zeros were 4 bytes per 32 weights that
    no kernel read (SmolLM2 Q4_0: 13 MB of ~120 MB)."""

    EXACT = ("scales", "zeros", "input_scale", "scale_ranges")
    COMPACT = ("scales", "zeros")
    HALF_SCALES = ("scales", "zeros")  # fp16 where exact at group 32 (QuantLinear.compact_scales)
    symmetric: bool = (
        False  # no zeros buffer (set per instance; the class default for objects pickled before it)
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        bias: bool = False,
        device=None,
        dtype=None,
        scale_bits: int | None = None,
        symmetric: bool = False,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        if scale_bits not in (None, 8):
            raise LeanformerError(f"int4 scale_bits must be None or 8, got {scale_bits}")
        if symmetric and scale_bits is not None:
            raise LeanformerError("int4 symmetric=True has fp32 scales only (no scale_bits)")
        self.scale_bits, self.symmetric = scale_bits, symmetric
        if group_size not in K.INT4_GROUP_SIZES:
            raise LeanformerError(f"int4 group_size must be one of {K.INT4_GROUP_SIZES}, got {group_size}")
        self.group_size = group_size
        g = K.n_groups(in_features, group_size)
        self.k_padded = g * group_size
        self.register_buffer(
            "qweight", torch.full((out_features, self.k_padded // 2), 0x88, dtype=torch.uint8, device=device)
        )
        if scale_bits is None:
            self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float32, device=device))
            zeros = None if symmetric else torch.zeros(out_features, g, dtype=torch.float32, device=device)
            self.register_buffer("zeros", zeros)
        else:
            for name in ("scale_codes", "zero_codes"):
                self.register_buffer(name, torch.zeros(out_features, g, dtype=torch.uint8, device=device))
            self.register_buffer("scale_ranges", torch.zeros(4, dtype=torch.float32, device=device))
        self._cuda: tuple[torch.Tensor, torch.Tensor, int] | None = None  # torch's CUDA layout, lazily
        self._lut: torch.Tensor | None = None  # scale_bits=8: DQ.lut(scale_ranges), lazily

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        scale_bits: int | None = None,
    ) -> Int4Linear:
        """Round-to-nearest unless codes uint8 [N, K] with scales/zeros [N, G] are given (GPTQ, AWQ).
        scale_bits=8: scales/zeros coded in 8 bits first, weight codes chosen against the decoded ones."""
        w = linear.weight.detach()
        m = cls(
            linear.in_features,
            linear.out_features,
            group_size,
            linear.bias is not None,
            w.device,
            w.dtype,
            scale_bits,
        )
        # Round-to-nearest works on slices of ~4M weights (rows are independent): the fp32
        # temporaries of int4_params / int4_codes stay ~16 MB each instead of five copies of W.
        step = max(1, ROWS_ELEMS // max(linear.in_features, 1))
        parts = [slice(r, r + step) for r in range(0, w.shape[0], step)]
        if scale_bits is not None:
            if codes is not None:
                raise LeanformerError("int4 scale_bits=8 is for round-to-nearest (no given codes)")
            params = [K.int4_params(w[p], group_size, bf16=False) for p in parts]
            m.set_coded_scales(
                *DQ.encode(torch.cat([s for s, _ in params]), torch.cat([z for _, z in params]))
            )
            del params
            for p in parts:
                m.set_codes(K.int4_codes(w[p], *m.group_params(p), group_size), p)
        elif codes is None:
            for p in parts:
                m.scales[p], m.zeros[p] = K.int4_params(w[p], group_size)
                m.set_codes(K.int4_codes(w[p], m.scales[p], m.zeros[p], group_size), p)
        else:
            m.scales.copy_(scales)
            m.zeros.copy_(zeros)
            m.set_codes(codes)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        m.compact_scales()
        return m

    def _reads_half_scales(self) -> bool:
        # group 32: the int8-activation loops read fp16 (elsewhere a per-chunk decode would cost speed);
        # 8-bit codes are smaller still. SmolLM2's Q4_1 file: ~0.95x its size in RAM (docs/BENCHMARKS.md)
        return self.scale_bits is None and self.group_size == 32

    def set_params(self, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        """New scales (and zeros, none when symmetric) [N, G]: held fp32, then compacted as after a load."""
        shape = (self.out_features, self.k_padded // self.group_size)
        if self.scale_bits is not None:
            raise LeanformerError("set_params: this Int4Linear holds 8-bit scale codes (set_coded_scales)")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t is not None and tuple(t.shape) != shape:
                raise LeanformerError(
                    f"set_params: {name} must be [out_features, groups] = {list(shape)}, got {list(t.shape)}"
                )
        if (zeros is None) != self.symmetric:
            raise LeanformerError(
                "set_params: zeros are required unless the module is symmetric (and refused when it is)"
            )
        self.scales = scales.detach().float().contiguous().to(self.qweight.device)
        if zeros is not None:
            self.zeros = zeros.detach().float().contiguous().to(self.qweight.device)
        self.compact_scales()
        self._drop_caches()

    def set_codes(self, codes: torch.Tensor, rows: slice | None = None) -> None:
        """codes uint8 [N, K or Kp] in 0..15 -> qweight (columns past K padded with code 8); with
        `rows`, codes [R, ...] of those rows only, written into the existing qweight."""
        n, k = codes.shape
        if k != self.k_padded:
            codes = F.pad(codes, (0, self.k_padded - k), value=8)
        packed = K.pack_nibbles(codes.to(self.qweight.device))
        if rows is None:
            self.qweight = packed.contiguous()
        else:
            self.qweight[rows] = packed
        self._drop_caches()

    def set_coded_scales(
        self, scale_codes: torch.Tensor, zero_codes: torch.Tensor, ranges: torch.Tensor
    ) -> None:
        """8-bit scale/zero codes (double_quant.encode) -> buffers."""
        self.scale_codes.copy_(scale_codes)
        self.zero_codes.copy_(zero_codes)
        self.scale_ranges.copy_(ranges)
        self._drop_caches()

    def lut(self) -> torch.Tensor:
        """scale_bits=8: fp32 [512] decoding table of the codes (DQ.lut), built once per load / move."""
        if self._lut is None:
            self._lut = DQ.lut(self.scale_ranges.cpu())
        return self._lut

    def group_params(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (scales, zeros) [R, G] of `rows`: the buffers, or (scale_bits=8) the rows' codes decoded
        with lut(), the same values the kernels use."""
        if self.scale_bits is None:
            s = self.scales[rows].float()
            return s, torch.zeros_like(s) if self.zeros is None else self.zeros[rows].float()
        return DQ.decode(self.scale_codes[rows], self.zero_codes[rows], self.scale_ranges, self.lut())

    def _kernel_scales(self, rows: slice = slice(None)) -> tuple:
        """(scales, zeros, lut) as the C++ int4 kernels take them: fp32 / fp16 [R, G] twice (zeros None
        when symmetric) and None, or the uint8 codes [R, G] twice and their table (kernels/q4_codes.h)."""
        if self.scale_bits is None:
            return self.scales[rows], None if self.zeros is None else self.zeros[rows], None
        return self.scale_codes[rows], self.zero_codes[rows], self.lut()

    def codes(self) -> torch.Tensor:
        """Codes uint8 [N, Kp]."""
        return K.unpack_nibbles(self.qweight)

    def _drop_caches(self) -> None:
        self._cuda = None
        self._lut = None
        self._zeros_key: tuple | None = None  # _nonzero's memo
        self._zeros_any = True

    # -------------------------------------------------------------------------------- compute

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.k_padded != self.in_features:  # the kernel's K must match the codes' Kp
            x = F.pad(x, (0, self.k_padded - self.in_features))
        s, z, lut = self._kernel_scales()
        return lk.ext().linear_q4(x, self.qweight, s, z, self.group_size, bias, lut)

    def decode_operands(self) -> tuple:
        s, z, lut = self._kernel_scales()
        return ("q4", self.qweight, s, z, self.group_size, self.k_padded) + (
            (lut,) if lut is not None else ()
        )

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """fp32 [R, K]; rows a slice or an index tensor. Same arithmetic as K.int4_dequant."""
        q = self.qweight[rows]  # [R, Kp/2]
        n = q.shape[0]
        c = torch.stack((q & 0xF, q >> 4), dim=-1).view(n, -1, self.group_size).float()  # [R, G, g]
        s, z = self.group_params(rows)  # fp32 [R, G]
        w = c.sub_(8).mul_(s[:, :, None]).add_(z[:, :, None])
        w = w.view(n, self.k_padded)
        return w if self.k_padded == self.in_features else w[:, : self.in_features]

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        s, z, lut = self._kernel_scales(rows)
        return lk.ext().dequant_q4(self.qweight[rows], s, z, self.group_size, self.in_features, bf16, lut)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and not lk.tracing():
            return self._cuda_matmul(x)
        if self._int8_prefill(x):  # kernels/gemm_q4_i8.cpp: the codes as they are, int8 activations
            s, z = self.group_params() if self.scale_bits else self._kernel_scales()[:2]  # z None: symmetric
            return lk.ext().gemm_q4_i8(x.float(), self.qweight, s, self._nonzero(z), self.group_size)
        return super()._matmul(x)

    def _nonzero(self, zeros: torch.Tensor | None) -> torch.Tensor | None:
        """The zero points, or None when all are zero (or there are none: symmetric): the GEMM then skips
        them. Checked once per version of the buffer (an in-place write bumps it), not per call."""
        if zeros is None:
            return None
        if self.scale_bits is not None:
            return zeros if zeros.any() else None
        # an inference tensor (made under inference_mode, e.g. moved into huge pages by a decode plan built
        # there) has no version counter: it cannot be written outside inference_mode, taken as unchanged
        key = (zeros.data_ptr(), -1 if zeros.is_inference() else zeros._version)
        if self._zeros_key != key:
            self._zeros_key, self._zeros_any = key, bool(zeros.any())
        return zeros if self._zeros_any else None

    def _int8_prefill(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and not lk.tracing()
            and self.group_size % 32 == 0
            and not (torch.is_grad_enabled() and x.requires_grad)
            and lk.available()
            and int8_activations(self.prefill_activations)
        )

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """torch's int4 CUDA kernel (bf16 activations) on its own packed layout, built on first use:
        rows padded to a multiple of 16, (scale, zero) pairs bf16 [G, Np, 2]."""
        if self._cuda is None:
            K.require_kernel("aten::_weight_int4pack_mm", x.device, "int4 matmul")
            pad = -self.out_features % K.INT4_N_MULTIPLE
            codes = F.pad(self.codes(), (0, 0, 0, pad), value=8)
            scales, zeros = self.group_params()
            s = F.pad(scales, (0, 0, 0, pad), value=1.0).to(torch.bfloat16)
            z = F.pad(zeros, (0, 0, 0, pad)).to(torch.bfloat16)
            sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()
            self._cuda = (K.int4_pack(codes, x.device), sz, pad)
        packed, sz, _ = self._cuda
        xb = x.to(torch.bfloat16)
        if self.k_padded != self.in_features:
            xb = F.pad(xb, (0, self.k_padded - self.in_features))
        y = K.int4_mm(xb.contiguous(), packed, self.group_size, sz)
        return y[:, : self.out_features]

    def extra_repr(self) -> str:
        pad = ", padded_in" if self.k_padded != self.in_features else ""
        coded = ", scale_bits=8" if self.scale_bits else ""
        sym = ", symmetric" if self.symmetric else ""
        return super().extra_repr() + f", bits=4, group_size={self.group_size}{pad}{coded}{sym}"
