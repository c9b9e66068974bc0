"""What this CPU has and which kernel path each op takes on it, chosen at run time (for `bench` and
bug reports), plus the instruction-set switch of the int8-activation kernels and the thread count.

`cpu_info()` reads /proc/cpuinfo (model, ISA flags); `describe()` adds the path of every op: the
fp32-activation GEMVs and attention ("avx512" / "avx2", see kernels.isa()), the int8-activation GEMVs
("avx512_vnni" / "avx_vnni" / "avx2", gemv_i8.cpp) and torch's threads. `summary()` is one line.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from leanformer import kernels

# /proc/cpuinfo flag -> the name we report
FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}


# Instruction sets of the int8-activation kernels (act_isa()) on which "auto" takes them, for the fused
# decode step (models/fused.py) and the int4 prefill GEMM (compress/int4.py): only where measured faster
# than fp32 activations at a KLD far inside the int4 variant's own (docs/BENCHMARKS.md): AVX2 (EPYC Zen 3:
# 1.31x batch 1, 1.65x batch 8), AVX-512 VNNI (EPYC Zen 5, 512-bit int4 loops: batch 1 level with the
# AVX-512 fp32-activation GEMVs, batch 8 1.21x; prefill 1.7-2.3x the bf16 GEMM on dequantized weights) and
# AVX-VNNI (the AVX2 loops with vpdpbusd, for 256-bit-only CPUs such as Alder Lake; measured on Zen 5 with
# the fp32 GEMVs held to AVX2 as there: 1.45x batch 1, 1.85x batch 8, level with AVX2's int8 loops).
AUTO_INT8 = frozenset({"avx2", "avx_vnni", "avx512_vnni"})
ACTIVATIONS = ("auto", "int8", "fp32")


def int8_activations(mode: str) -> bool:
    """Whether activations `mode` ("auto", "int8" or "fp32") means int8 on this CPU now: "auto" where
    AUTO_INT8 has the int8-activation kernels' instruction set (act_isa())."""
    if mode == "auto":
        return act_isa() in AUTO_INT8
    return mode == "int8" and kernels.available()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores(text: str | None = None) -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (SMT siblings share a
    core's vector units, so the GEMVs gain nothing from them); the usable CPU count if unknown."""
    text = _cpuinfo() if text is None else text
    usable = _usable_cpus()
    cores, cpu, pkg = set(), None, "0"
    for line in text.splitlines() + [""]:
        key, _, value = (p.strip() for p in line.partition(":"))
        if key == "processor":
            cpu, pkg = int(value), "0"
        elif key == "physical id":
            pkg = value
        elif key == "core id" and cpu in usable:
            cores.add((pkg, value))
    return len(cores) or len(usable)


def recommended_threads() -> int:
    """Threads for decode / prefill on this machine: one per physical core this process may use."""
    return max(1, physical_cores())


def cpu_info() -> dict:
    """{"model", "arch", "flags": {name: bool}, "logical_cpus", "physical_cores"} of this machine."""
    text = _cpuinfo()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[1].split()) if line else set()
    return {
        "model": model or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "flags": {name: flag in have for flag, name in FLAGS.items()},
        "logical_cpus": len(_usable_cpus()),
        "physical_cores": physical_cores(text),
    }


def act_isas() -> list[str]:
    """Instruction sets the int8-activation kernels can use here ([] without the extension)."""
    return list(kernels.ext().act_isas()) if kernels.available() else []


def act_isa() -> str | None:
    """The instruction set the int8-activation kernels use now, None without the extension."""
    return kernels.ext().act_isa() if kernels.available() else None


def set_act_isa(name: str | None) -> None:
    """Make the int8-activation kernels use `name` ("avx2", "avx_vnni", "avx512_vnni"; None: the best
    this CPU has) for the whole process. Raises ValueError if unavailable here."""
    have = act_isas()
    name = name or (have[-1] if have else None)
    if name not in have:
        raise ValueError(f"int8-activation instruction set {name!r} unavailable here (have: {have})")
    kernels.ext().set_act_isa(name)


def describe() -> dict:
    """cpu_info() plus the path each op takes now: {"cpu": ..., "paths": {op: path}, "threads": n,
    "recommended_threads": n}."""
    fp = kernels.isa() or "torch"
    paths = {
        "linear f32 / bf16 / f16 / int8 / int4, fp32 activations": fp,
        "linear int8 / int4, int8 activations (decode)": act_isa() or "unavailable",
        "encoder attention": fp,
        "quantized prefill GEMM": "oneDNN bf16" if bf16_pays() else "oneDNN fp32",
        "int4 prefill GEMM (auto activations)": (
            f"int8 activations ({act_isa()})" if int8_activations("auto") else "as above"
        ),
    }
    return {
        "cpu": cpu_info(),
        "paths": paths,
        "threads": torch.get_num_threads(),
        "recommended_threads": recommended_threads(),
    }


def native_bf16() -> bool:
    """bf16 arithmetic in hardware: AVX-512 BF16 or AMX (whether it is faster than fp32: bf16_pays)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def bf16_pays(text: str | None = None) -> bool:
    """Whether bf16 GEMMs beat fp32 here: AMX tiles, or AVX-512 BF16 on AMD (Zen 4 / 5 run vdpbf16ps at
    twice fp32's FMA rate: oneDNN's bf16 GEMM 1.5-2x its fp32). Intel's AVX-512 BF16 without AMX runs it
    on one port: oneDNN's bf16 GEMM measured 0.55-0.7x its fp32 on a Xeon whose VM hides AMX
    (docs/BENCHMARKS.md, session 28), so bf16 prefill / autocast / encoder matmuls would be slower there."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return True
        avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False
    return avx512_bf16 and "AuthenticAMD" in (_cpuinfo() if text is None else text)


def summary() -> str:
    """One line: CPU model, its vector ISA flags, the kernel paths, threads."""
    d = describe()
    flags = ",".join(name for name, on in d["cpu"]["flags"].items() if on) or "none"
    return (
        f"{d['cpu']['model']} [{flags}]; GEMV {d['paths']['linear f32 / bf16 / f16 / int8 / int4, fp32 activations']}, "
        f"int8-activation GEMV {d['paths']['linear int8 / int4, int8 activations (decode)']}; "
        f"{d['threads']} threads ({d['recommended_threads']} physical cores)"
    )
