"""Shared plumbing of the weight-only quantized Linears (int8.py, int4.py): which path runs a call.

One runtime layout per module, the same bytes the state dict holds (int8 rows, or int4 nibbles two
per byte, low nibble first), plus fp32 scales/zeros. Every path reads that layout:

- decode (CPU, at most DECODE_MAX_ROWS input rows, leanformer's AVX2 GEMV kernels built, no autograd):
  the kernel on fp32 activations straight from the codes; fp32 math, exact up to summation order.
- prefill and everything else on CPU: dequantize the weight in chunks of rows (≤ CHUNK_ELEMS values,
  so even a 49152-row LM head never exists whole in float) into the compute dtype and call F.linear
  (oneDNN); kernels/dequant.cpp writes a chunk in one pass. Compute dtype: bf16 where the CPU has
  native bf16 (AVX512-BF16 / AMX), fp32 elsewhere. Measured at 128 rows on an AVX512-BF16 CPU, 2
  threads, ms for SmolLM2's gate_up 576->3072 | lm_head 576->49152: fp32 dense 2.6 | 49; torch's
  packed bf16 kernels int8 1.5 | 28, int4 1.3 | 22 (int4 needs its own second copy of the weights);
  ours in bf16 int8 1.0 | 17.5, int4 1.0 | 18; ours in fp32 3.3 | 47 (int8 and int4 alike). Without
  native bf16, bf16 GEMMs and torch's bf16 kernels convert in software (the latter measured ~2x slower
  than fp32 GEMM at 128 rows), so fp32 it is there. `PREFILL_BF16` overrides the choice (False: fp32
  prefill everywhere, exact to fp32 rounding).
- int4 / int8 prefill on CPU (more than DECODE_MAX_ROWS rows, groups of 32 columns or more; int8 weights
  on AVX-VNNI / AVX-512 VNNI only, per-row scales too): with int8 activations
  (`prefill_activations`, below) the codes go straight into kernels/gemm_q4_i8.cpp, each input row
  quantized per block of 32 columns as the fused decode step quantizes it, integer dot products
  (AVX-512 VNNI / AVX-VNNI / AVX2): no dequantized copy at all, 1.7-2.3x the bf16 path above on an EPYC
  Zen 5 at 17-256 rows (docs/BENCHMARKS.md).
- other devices: dequantize at the input dtype (int4 on CUDA uses torch's packed kernel, see int4.py).

Activations of that prefill: `set_prefill_activations(model, mode)` sets each module's
`prefill_activations`: "auto" (the default: int8 where kernels.cpu.AUTO_INT8 has this CPU's int8
instruction set, as the fused decode step chooses), "int8" or "fp32" (the dequantized-weight path, the
weights' own math: what `eval` compares when it isolates weight quantization error).

Scales/zeros keep their dtype whatever dtype the model is cast to (`EXACT`: never rounded by a cast):
fp32, or fp16 at group 32 where fp16 holds every value (`HALF_SCALES`, compact_scales: GGUF blocks, int4
round-to-nearest's bf16 values; the kernels read fp16); loads widen them to fp32 first. Saved in the
smallest float dtype that holds them exactly (`COMPACT`): bf16 for the round-to-nearest / GPTQ / AWQ
quantizers (whose scales are bf16 values, the format of older saves), fp16 or fp32 for GGUF blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanformer import kernels as lk
from leanformer.compress import kernels as K
from leanformer.errors import LeanformerError
from leanformer.kernels.cpu import ACTIVATIONS
from leanformer.kernels.modules import MAX_ROWS

DECODE_MAX_ROWS = MAX_ROWS  # rows up to which the GEMV kernel beats dequantize + GEMM (kernels/modules.py)
CHUNK_ELEMS = 1 << 20  # weight values dequantized per F.linear call (4 MB of fp32: stays in cache)
PREFILL_BF16: bool | None = None  # None: bf16 prefill where the CPU has native bf16


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the dequantized weight and activations for a non-kernel call."""
    if x.device.type != "cpu":
        return x.dtype
    bf16 = K.cpu_has_native_bf16() if PREFILL_BF16 is None else PREFILL_BF16
    return torch.bfloat16 if bf16 else torch.float32


def smallest_exact(t: torch.Tensor) -> torch.Tensor:
    """t as bf16 or fp16 when that holds every value exactly, else as fp32 (for compact saves)."""
    if t.is_meta:  # structure only: the shape is all that matters
        return t.to(torch.bfloat16)
    t = t.float()
    for dt in (torch.bfloat16, torch.float16):
        c = t.to(dt)
        if torch.equal(c.float(), t):
            return c
    return t


def exact_half(t: torch.Tensor) -> torch.Tensor | None:
    """t as fp16 when that holds every value exactly, else None."""
    if t.dtype == torch.float16:
        return t
    h = t.to(torch.float16)
    return h.contiguous() if torch.equal(h.float(), t.float()) else None


def set_prefill_activations(model: nn.Module, activations: str) -> None:
    """Make the model's int4 / int8 Linears prefill on "int8" or "fp32" activations, or "auto" (int8 where the
    fused decode step takes int8 activations on this CPU). Set it after quantizing: new modules start
    at "auto"."""
    if activations not in ACTIVATIONS:
        raise LeanformerError(
            f"prefill activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}"
        )
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prefill_activations = activations


def set_activations(model: nn.Module, activations: str) -> None:
    """Both at once: the fused decode step's activations (models/fused.py set_decode_activations) and
    the int4 prefill's (set_prefill_activations): "auto", "int8" or "fp32"."""
    from leanformer.models.fused import set_decode_activations

    set_prefill_activations(model, activations)  # validates the name first
    set_decode_activations(model, activations)


class QuantLinear(nn.Module):
    """Base: shapes, bias, optional AWQ input scale, reshaping [..., K] -> [M, K], path choice.

    Subclasses implement `_kernel(x fp32 [M, K], bias fp32) -> fp32 [M, N]`, `dequantize_rows(rows)`
    (rows: a slice or an index tensor) -> fp32 [R, K], the codes' weight without the input scale, in
    torch (the reference), and `_dequant_native(rows, bf16)`, the same through kernels/dequant.cpp.
    A quantized embedding table (layout.py) looks rows up through `dequantize_as` too."""

    EXACT: tuple[str, ...] = ("input_scale",)  # fp32 buffers that .to(dtype) must not round
    prefill_activations: str = "auto"  # int4 / int8 prefill on int8 activations where "auto" says so (above)
    COMPACT: tuple[str, ...] = ()  # buffers saved in their smallest exact float dtype
    KEEP_DTYPE: dict[str, torch.dtype] = {}  # float buffers held in this dtype whatever .to(dtype) says
    # EXACT buffers held as fp16 where fp16 holds every value and the kernels read fp16 (compact_scales):
    # the first (the scales) decides, the others follow only with it
    HALF_SCALES: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), False) if bias else None
        )
        # AWQ's 1/s when it could not be folded upstream: x * input_scale before the matmul, fp32 [K].
        self.register_buffer("input_scale", None)

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        self.input_scale = None if scale is None else scale.detach().float().contiguous()

    # ---------------------------------------------------------------------------------- state

    def _buffer_device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fp32 buffers to load into (a copy into fp16 ones would round the file's values); _tidy compacts
        for name in self.HALF_SCALES:
            t = self._buffers.get(name)
            if t is not None and t.dtype == torch.float16:
                self._buffers[name] = t.float()
        # The buffer exists only for some AWQ layers: create it when the file has it (structure_only
        # models cannot know in advance which layers were folded).
        key = prefix + "input_scale"
        if self.input_scale is None and key in state_dict:
            self.input_scale = torch.empty_like(state_dict[key], device=self._buffer_device())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._tidy()

    def _tidy(self) -> None:
        """After loading (assign=True hands over the file's tensors as they are): contiguous scales, fp32
        or (HALF_SCALES, compact_scales) fp16, and contiguous, 64-byte aligned integer codes (safetensors
        maps tensors at 8-byte offsets; torch's AVX-512 int8 kernel crashes on those, ours do not care)."""
        for name, t in self._buffers.items():
            if t is None or t.is_meta:
                continue
            if name in self.EXACT:  # fp32, or fp16 held as such (compact_scales, below)
                keep = name in self.HALF_SCALES and t.dtype == torch.float16 and self._reads_half_scales()
                t = t if keep else t.float()
            elif name in self.KEEP_DTYPE:
                t = t.to(self.KEEP_DTYPE[name])
            elif not t.is_floating_point() and t.device.type == "cpu" and t.data_ptr() % 64:
                t = t.clone()
            self._buffers[name] = t.contiguous()
        self._drop_caches()
        self.compact_scales()

    def _reads_half_scales(self) -> bool:
        """Whether this module's kernels read HALF_SCALES as fp16 (its layout: group 32)."""
        return False

    def compact_scales(self) -> None:
        """Hold HALF_SCALES as fp16 when fp16 holds every value exactly and the kernels read fp16 (a GGUF's
        block scales: 2 bytes per 32 weights, as the file holds them, not 4; results unchanged, fp16 ->
        fp32 being exact). Called after quantizing and after every load; a buffer fp16 would round stays
        fp32 (and the ones after the scales stay with them)."""
        if not self.HALF_SCALES or not self._reads_half_scales():
            return
        for i, name in enumerate(self.HALF_SCALES):
            t = self._buffers.get(name)
            if t is None or t.is_meta:
                continue
            half = exact_half(t)
            if half is None:
                if i == 0:
                    return
                continue
            self._buffers[name] = half
        self._drop_caches()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.COMPACT:
            if prefix + name in destination:
                destination[prefix + name] = smallest_exact(destination[prefix + name].detach())

    def _apply(self, fn, recurse=True):
        # Keep EXACT buffers fp32 through model.to(bf16) / .half(): move them, never round them (and
        # KEEP_DTYPE ones in theirs).
        exact = {n: t for n in (*self.EXACT, *self.KEEP_DTYPE) if (t := self._buffers.get(n)) is not None}
        for n in exact:
            self._buffers[n] = None  # skipped by nn.Module._apply; key order kept
        try:
            super()._apply(fn, recurse)
        finally:
            if exact:
                probe = next(iter(exact.values()))
                device = fn(torch.empty(0, device=probe.device)).device
                for n, t in exact.items():
                    self._buffers[n] = t.to(device)
        self._drop_caches()
        return self

    def _drop_caches(self) -> None:
        """Hook: forget device-specific derived tensors (after a move or a load)."""

    # -------------------------------------------------------------------------------- forward

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return x

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and 0 < x.shape[0] <= DECODE_MAX_ROWS
            and not (torch.is_grad_enabled() and (x.requires_grad or self._needs_grad()))
            and lk.available()
        )

    def _needs_grad(self) -> bool:
        return self.bias is not None and self.bias.requires_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi = self._in(x)
        if not lk.tracing() and self._use_kernel(xi):
            bias = None if self.bias is None else self.bias.detach().float()
            y = self._kernel(xi.float(), bias)  # fp32 [M, N], bias included
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        y = self._matmul(xi)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W^T without bias, by dequantized chunks of rows: -> [M, N] in compute dtype."""
        dt = x.dtype if lk.tracing() else compute_dtype(x)
        xc = x.to(dt)
        rows = max(1, CHUNK_ELEMS // self.in_features)
        n = self.out_features
        parts = [F.linear(xc, self.dequantize_as(slice(a, a + rows), dt)) for a in range(0, n, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def dequantize_as(self, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dequantize_rows(rows) in `dtype`: on CPU one pass of the compiled dequantizer straight into
        fp32 / bf16 (same values: kernels/dequant.cpp), else the torch formula then a cast."""
        native = dtype in (torch.float32, torch.bfloat16) and self._buffer_device().type == "cpu"
        if native and not lk.tracing() and lk.available():
            return self._dequant_native(rows, dtype == torch.bfloat16)
        return self.dequantize_rows(rows).to(dtype)

    def _dequant_native(self, rows: slice | torch.Tensor, bf16: bool) -> torch.Tensor:
        raise NotImplementedError

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decode_operands(self) -> tuple | None:
        """(kind, codes, scales, zeros, group, k_padded) of the GEMV kernel `_kernel` calls, for the
        fused decode step (models/fused.py); None: this module cannot be fused."""
        return None

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: the weight the module effectively applies (AWQ input scale folded in)."""
        w = self.dequantize_rows(slice(None))
        return w if self.input_scale is None else w * self.input_scale

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return s + (", awq_input_scale=True" if self.input_scale is not None else "")
