"""8-bit codes for int4 group scales and zeros ("double quantization"), so small groups stay cheap.

An int4 group of 32 weights with a bf16 scale and a bf16 zero costs 4 + 32/32 = 5 bits per weight; with
8-bit codes for both it costs 4 + 16/32 = 4.5 bits, the budget of llama.cpp's Q4_0, while keeping the
asymmetric (scale + zero) grid that fits real weight groups much better than Q4_0's symmetric one.

- Scales are positive and spread over orders of magnitude across a tensor, so they are coded on a log
  scale between the tensor's smallest and largest scale: the relative error is the same for small and
  large groups (for a 100x spread, at most 0.9%).
- Zeros (w = (q - 8) * scale + zero) are coded as zero / scale, the group's offset measured in its own
  quantization steps, on a linear scale between the tensor's extremes (typically [-7, 8]: an error of
  at most ~0.03 steps).
- Four fp32 numbers per tensor (log-scale range, offset range) decode the codes.

The integer weight codes are chosen *after* rounding the scale and zero, against the values the kernel
will actually use.
"""

from __future__ import annotations

import torch

SCALE_LEVELS = 255  # uint8 codes 0..255
MIN_SCALE_RATIO = 2.0**-12  # smaller scales are raised to max/4096, so one degenerate group (all weights
# equal, scale ~0) cannot stretch the log range for the whole tensor


def encode(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scales, zeros fp32 [N, G] → (scale_codes uint8 [N, G], zero_codes uint8 [N, G], ranges fp32 [4])."""
    s = scales.float()
    s = s.clamp_min(float(s.max()) * MIN_SCALE_RATIO).clamp_min(1e-30)
    log_s = s.log()
    lo, hi = float(log_s.min()), float(log_s.max())
    span = max(hi - lo, 1e-12)
    scale_codes = torch.round((log_s - lo) / span * SCALE_LEVELS).clamp_(0, SCALE_LEVELS)
    ranges = torch.tensor([lo, span, 0.0, 1.0], dtype=torch.float32)
    s_q = lut(ranges)[scale_codes.long()]  # the decoded scales, as `decode` gives them
    offset = zeros.float() / s_q  # the zero in units of the (rounded) scale
    zlo, zhi = float(offset.min()), float(offset.max())
    zspan = max(zhi - zlo, 1e-12)
    zero_codes = torch.round((offset - zlo) / zspan * SCALE_LEVELS).clamp_(0, SCALE_LEVELS)
    ranges = torch.tensor([lo, span, zlo, zspan], dtype=torch.float32)
    return scale_codes.to(torch.uint8), zero_codes.to(torch.uint8), ranges


def lut(ranges: torch.Tensor) -> torch.Tensor:
    """fp32 [512]: the scale of each scale code (0..255), then the zero offset (in units of the scale)
    of each zero code: scale = lut[sc], zero = lut[256 + zc] * scale. The int4 kernels decode the codes
    with it (kernels/q4_codes.h), so `decode` below reads the same table: one set of fp32 values."""
    lo, span, zlo, zspan = (float(v) for v in ranges)
    c = torch.arange(SCALE_LEVELS + 1, dtype=torch.float32)
    return torch.cat([torch.exp(lo + c * (span / SCALE_LEVELS)), zlo + c * (zspan / SCALE_LEVELS)])


def decode(
    scale_codes: torch.Tensor,
    zero_codes: torch.Tensor,
    ranges: torch.Tensor,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (scales, zeros) fp32 [N, G], exactly the values `encode` chose the weight codes against
    (`table`: lut(ranges), if already built)."""
    t = lut(ranges) if table is None else table
    t = t.to(scale_codes.device)
    scales = t[scale_codes.long()]
    zeros = t[SCALE_LEVELS + 1 + zero_codes.long()] * scales
    return scales, zeros


def round_trip(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scales, zeros) a tensor ends up with after 8-bit coding (for choosing weight codes)."""
    return decode(*encode(scales, zeros))
