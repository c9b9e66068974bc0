"""What machine a benchmark ran on: CPU model, the vector extensions it has, the ISA our kernels chose.

Printed above every `bench` table and stored in its JSON: speed figures mean little without the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

# the flags that decide which kernels can run, in the order a reader wants them
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
FLAGS += ("amx_int8", "amx_bf16")


def cpu_info(text: str | None = None) -> dict:
    """{"model", "flags": the FLAGS present, "cores"} from /proc/cpuinfo (or `text` in its format)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's fields
    have = set(fields.get("flags", "").split())
    model = fields.get("model name") or fields.get("Model") or "unknown CPU"
    return {"model": model, "flags": [f for f in FLAGS if f in have], "cores": os.cpu_count()}


def kernel_isa() -> str:
    """The ISA leanformer's C++ kernels use in this process ('torch fallback' when they are off)."""
    from leanformer import kernels

    return kernels.isa() or "torch fallback"


def describe(info: dict | None = None, isa: str | None = None) -> str:
    """One line: 'AMD EPYC, 2 cores; fma f16c avx2; leanformer kernels: avx2'."""
    info = info or cpu_info()
    flags = " ".join(info["flags"]) or "no AVX2"
    return f"{info['model']}, {info['cores']} cores; {flags}; leanformer kernels: {isa or kernel_isa()}"
