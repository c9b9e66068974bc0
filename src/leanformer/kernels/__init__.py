"""Small-batch CPU GEMV kernels (AVX2/FMA, AVX-512 where the CPU has it), int8/int4 dequantizers, the
fused decode step, encoder attention and int8 row passes, JIT-built into one extension on first use from
gemv.cpp (bindings), gemv_q4.cpp, gemv_avx512.cpp, dequant.cpp, norm.cpp, decode.cpp, attention.cpp,
attention_avx512.cpp, int8_rows.cpp and layer_norm.cpp.

Why: decoding a token reads every weight once, so batch-1 decode is memory-bandwidth bound. torch's
CPU paths for x [M<=8, K] @ W[N, K]^T either run on one thread (MKL GEMV) or pay ~40 µs per call
(oneDNN); these kernels stream W once across torch's threads (see docs/BENCHMARKS-kernels.md).

Ops (x may have leading dims; all math is fp32 with fp32 accumulation):
- ``linear_f32(x, w, bias)``: w float32 [N, K]. The compiled ``ext().linear_bf16(x, w, bias)`` /
  ``linear_f16`` take w bfloat16 / float16 [N, K] (each weight widened in registers: bit for bit
  ``linear_f32`` on ``w.float()``).
- ``linear_q8(x, wq, scales, bias, group_size=None)``: wq int8 [N, K], scales [N]: w = wq *
  scales[:, None]; or with ``group_size`` G, scales [N, ceil(K/G)]: w = wq * scales[n, k // G] (GGUF
  Q8_0's 32-column blocks).
- ``linear_q4(x, wq, scales, zeros, group_size, bias)``: wq uint8 [N, ceil(K/2)] holding two 4-bit codes
  per byte (low nibble = even column k, high nibble = odd column k+1; see ``pack_int4``), scales/zeros
  [N, ceil(K/group_size)]; w = (code - 8) * scale + zero, leanformer's int4 convention
  (compress/kernels.py). group_size must be even; K need not be a multiple of it. Group sizes 32 and
  multiples of 64 take the fast decoder, others a slower generic one. The compiled ``ext().linear_q4``,
  ``linear_q4_i8`` and ``dequant_q4`` (and ``DecodeLinear``) also take 8-bit scale/zero codes: scales /
  zeros uint8 [N, G] plus ``lut`` fp32 [512] (compress/double_quant.py ``lut``), decoded per chunk of
  rows (q4_codes.h), bit-identical to passing the decoded fp32 arrays.

- ``dequant_q8(wq, scales, group_size=0, bf16=False)`` / ``dequant_q4(wq, scales, zeros, group_size, k,
  bf16=False)`` (compiled only, ``ext()``): rows of codes -> fp32 or bf16 [R, K] in one pass, what the
  quantized Linears feed to oneDNN's GEMM for prefill-sized inputs (compress/qbase.py).
- ``rms_norm(x, w, eps)`` (compiled only): x [M, K] fp32 -> x * rsqrt(mean(x^2) + eps) * w (norm.cpp).
- ``DecodeLinear`` / ``DecodeStack`` (compiled only, decode.cpp): a Llama-family layer stack's whole
  decode step (norms, GEMVs, RoPE, KV-cache write, attention, SiLU, residuals) in one call;
  models/fused.py builds the stack from the modules (one ``DecodeLinear`` per f32/bf16/f16/q8/q4/q5 Linear).
- ``attention(q, k, v, key_mask=None, scale=None)`` (compiled only, attention*.cpp): non-causal
  softmax attention, q/k/v fp32 [B, H, T, D] -> [B, T, H, D], key_mask bool [B, T] (True = attend);
  what models/bert.py's encoders use for CPU fp32 inference at every length. ``attention_h16(qkv, batch,
  heads, key_mask, qkv_absmax, fp16_out)`` (AVX512-FP16 only, attention_h16*.cpp): the same on the fp16
  output of a float16 encoder's fused q/k/v matmul [B*T, 3*H*D] -> (fp16 [B*T, H*D], max |out|), scores
  and softmax in fp16 arithmetic, P V in fp16 chains added in fp32; None where a chain could overflow.
- ``quantize_rows_u8(x)`` / ``int8_epilogue_(y, s, bias, gelu, residual)`` (compiled only,
  int8_rows.cpp): per-token uint8 quantization (bit for bit compress.kernels.quantize_rows_int8, shift
  128) and the in-place rescale + bias (+ GELU, + residual) pass around Int8DynamicLinear's oneDNN GEMM.
- ``layer_norm_(x, w=None, b=None, eps=1e-5, residual=None)`` (compiled only, layer_norm.cpp): in place
  over x fp32 [M, K]: x = LayerNorm(x + residual) * w + b; the encoders' norms (models/bert.py).
- ``linear_q4_i8`` / ``linear_q8_i8`` / ``quantize_act`` (compiled only, gemv_i8.cpp + the VNNI files):
  the same products on int8 activations (per block of 32) with integer dot products (``zeros=None``:
  symmetric int4, w = (code - 8) * scale, as GGUF Q4_0, with no zero point read); references in
  int8_act.py, instruction set (avx2 / avx_vnni / avx512_vnni) in cpu.py. ``gemm_q4_i8`` (compiled
  only, gemm_q4_i8.cpp + gemm_q4_i8.h in the same three files): the int4 product for many rows
  (prefill), activation rows in the vector lanes; a row's result does not depend on the row count.
  ``cpu_info()`` /
  ``describe()`` (cpu.py): the CPU and the path each op takes.

Instruction set: the ``linear_*`` ops and ``attention`` run AVX-512 loops (gemv_avx512.cpp,
attention_avx512.cpp) on CPUs with AVX-512 F/BW/VL/DQ and the AVX2 ones elsewhere, chosen at run time in
one build. ``isa()`` says which is in use, ``set_isa("avx2")`` forces the AVX2 path (tests,
benchmarks), ``set_isa(None)`` restores the best.

Each wrapper uses the compiled op when ``available()`` (and no gradient is needed) and the pure-torch
``ref_*`` otherwise, so callers never need to branch. The compiled ops (``ext().linear_*``, 2-D inputs,
fp32 scales/zeros/bias) are inference-only: no autograd.

Build: ``torch.utils.cpp_extension.load`` with ninja into ``$XDG_CACHE_HOME/leanformer/kernels/<hash>``
(``~/.cache`` by default), once per machine and source version, under an flock so concurrent first
uses build once. ``disable()`` makes this process use the torch fallbacks (for comparisons).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = [
    _DIR / "gemv.cpp",
    _DIR / "gemv_q4.cpp",
    _DIR / "gemv_avx512.cpp",
    _DIR / "dequant.cpp",
    _DIR / "norm.cpp",
    _DIR / "decode.cpp",
    _DIR / "attention.cpp",
    _DIR / "attention_avx512.cpp",
    _DIR / "int8_rows.cpp",
    _DIR / "layer_norm.cpp",
    _DIR / "gemv_i8.cpp",
    _DIR / "gemm_q4_i8.cpp",
    _DIR / "gemv_avxvnni.cpp",
    _DIR / "gemv_avx512vnni.cpp",
    _DIR / "decode_attn_avx512.cpp",
    _DIR / "argmax.cpp",
    _DIR / "identity.cpp",
    _DIR / "gemm_h16.cpp",
    _DIR / "gemm_h16_avx512fp16.cpp",
    _DIR / "attention_h16.cpp",
    _DIR / "attention_h16_avx512fp16.cpp",
]
_HEADERS = [
    _DIR / "common.h",
    _DIR / "act_quant.h",
    _DIR / "avx512.h",
    _DIR / "vec8.h",
    _DIR / "attention.h",
    _DIR / "attention_impl.h",
    _DIR / "decode_attend.h",
    _DIR / "decode_kv.h",
    _DIR / "decode_linear.h",
    _DIR / "team.h",
    _DIR / "decode_attn_avx512.h",
    _DIR / "int8_act.h",
    _DIR / "gemv_i8_impl.h",
    _DIR / "gemv_i8_nib.h",
    _DIR / "gemv_i8_wide.h",
    _DIR / "gemm_q4_i8.h",
    _DIR / "gemv_vnni.h",
    _DIR / "q4_codes.h",
    _DIR / "row_split.h",
    _DIR / "gemm_h16.h",
    _DIR / "vec16.h",
    _DIR / "attention_h16.h",
    _DIR / "tasks.h",
    _DIR / "layer_norm_row.h",
    _DIR / "vec16h.h",
]
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_NEEDED_FLAGS = ("avx2", "fma", "f16c")  # what the compiled code may execute

_ext: ModuleType | None = None
_tried = False
_init_lock = threading.Lock()


class _Unavailable(Exception):
    """This machine cannot build the kernels (reason in the message)."""


# ------------------------------------------------------------------------------------ build & load


def _cpu_problem() -> str | None:
    """Why this machine cannot run the kernels, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"only built on Linux (this is {sys.platform})"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU (this is {platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    if line is not None:
        flags = set(line.split(":", 1)[1].split())
        missing = [f for f in _NEEDED_FLAGS if f not in flags]
        return f"CPU lacks {', '.join(missing)}" if missing else None
    cap = torch.backends.cpu.get_cpu_capability()  # no cpuinfo (containers): trust torch's probe
    return None if cap in ("AVX2", "AVX512") else f"needs AVX2 (torch reports {cap})"


def _toolchain_problem() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _tag() -> str:
    """Content hash of everything that makes a build incompatible: source, flags, torch, Python ABI."""
    h = hashlib.sha256()
    for f in (*_SOURCES, *_HEADERS):
        h.update(f.read_bytes())
    for part in (
        *_CFLAGS,
        *_LDFLAGS,
        torch.__version__,
        sys.version,
        sysconfig.get_config_var("SOABI") or "",
    ):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _build_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # the XDG standard location
    return Path(cache) / "leanformer" / "kernels"


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive flock: released by the kernel even if the holder dies (torch's own baton is a plain
    file that a killed build leaves behind, blocking every later build)."""
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _import_so(name: str, so: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, so, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build() -> ModuleType:
    tag = _tag()
    name = f"leanformer_gemv_{tag}"
    root = _build_root()
    build_dir = root / tag
    so = build_dir / f"{name}.so"  # the name cpp_extension.load gives the library
    done = build_dir / "BUILD_OK"  # written last: a half-built .so is never imported
    if done.exists() and so.exists():
        return _import_so(name, so)
    problem = _toolchain_problem()  # only needed to build: a cached library loads without them
    if problem:
        raise _Unavailable(problem)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{tag}.lock"):
        if done.exists() and so.exists():  # another process built it while we waited
            return _import_so(name, so)
        (build_dir / "lock").unlink(missing_ok=True)  # stale torch baton: we hold the real lock
        from torch.utils import cpp_extension

        torch_log = logging.getLogger(cpp_extension.__name__)
        level = torch_log.level
        torch_log.setLevel(logging.ERROR)  # keep "Compiling objects..." etc. off the user's console
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = cpp_extension.load(
                    name=name,
                    sources=[str(f) for f in _SOURCES],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    build_directory=str(build_dir),
                    verbose=False,
                )
        finally:
            torch_log.setLevel(level)
        done.write_text(f"{torch.__version__}\n")
    return module


def _first_error(text: str) -> str:
    """The compiler's first error line (ninja's own last line, "build stopped", says nothing)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")


def available() -> bool:
    """Build/load the extension once per process; False (with one warning) if it cannot run here."""
    global _ext, _tried
    if _tried:
        return _ext is not None
    with _init_lock:  # threads arriving during the first build wait for it instead of falling back
        if _tried:
            return _ext is not None
        problem = _cpu_problem()
        if problem is None:
            try:
                _ext = _build()
            except _Unavailable as e:
                problem = str(e)
            except Exception as e:  # any build failure means "use the torch fallback"
                problem = f"build failed: {_first_error(str(e)) or type(e).__name__}"
        if problem is not None:
            log.warning("leanformer GEMV kernels unavailable, using torch fallbacks: %s", problem)
        _tried = True
    return _ext is not None


def disable() -> None:
    """Use the pure-torch paths in this process from now on (e.g. to compare against the kernels).
    Models loaded before keep their FastLinear modules, which then take the torch path too."""
    global _ext, _tried
    with _init_lock:
        _ext, _tried = None, True


def _onnx_export_check():
    """torch.onnx.is_in_onnx_export without its two imports per call (2 of tracing()'s 3 µs; an fp16
    encoder asks ~50 times a forward): the same two flags read directly, or the public call where this
    torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        if isinstance(getattr(_flags, "_is_onnx_exporting", None), bool) and hasattr(
            GLOBALS, "in_onnx_export"
        ):
            return lambda: bool(GLOBALS.in_onnx_export or _flags._is_onnx_exporting)
    except ImportError:
        pass
    return torch.onnx.is_in_onnx_export


_in_onnx_export = _onnx_export_check()


def tracing() -> bool:
    """True while torch.jit / torch.compile / the ONNX exporter trace a model: compiled ops and oneDNN
    calls must step aside then, so the graph records ordinary torch ops."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or _in_onnx_export()


def hooked(module: torch.nn.Module) -> bool:
    """Whether forward hooks watch `module`: a fused C++ path must not bypass its call then (the hooks
    would not run), so it takes the module path."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def ext() -> ModuleType:
    """The compiled module (raises if unavailable); for callers that already checked available()."""
    if not available():
        raise RuntimeError("leanformer GEMV kernels are not available on this machine")
    return _ext


def isas() -> list[str]:
    """Instruction sets the linear_* kernels can use on this machine ([] without the extension)."""
    if not available():
        return []
    return ["avx2", "avx512"] if _ext.has_avx512() else ["avx2"]


def isa() -> str | None:
    """The instruction set the linear_* kernels use now ("avx2" or "avx512"), None without them."""
    return _ext.isa() if available() else None


def set_isa(name: str | None) -> None:
    """Make the linear_* kernels use `name` ("avx2" or "avx512"; None: the best this CPU has), for
    the whole process. Raises ValueError if the kernels or that instruction set are unavailable."""
    have = isas()
    name = name or (have[-1] if have else None)
    if name not in have:
        raise ValueError(f"instruction set {name!r} unavailable here (have: {have})")
    _ext.set_isa(name)


# ------------------------------------------------------------------------------ pure-torch references


def unpack_int4(wq: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> codes uint8 [N, K] (low nibble first)."""
    codes = torch.stack([wq & 0xF, wq >> 4], dim=-1).reshape(wq.shape[0], -1)
    return codes[:, :k]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in [0, 15] -> uint8 [N, ceil(K/2)]; an odd K is padded with code 8 (its input
    column does not exist, so the value never matters). Same bytes as compress.kernels.pack_nibbles."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1), value=8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()


def dequant_int4(
    wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int
) -> torch.Tensor:
    """-> float32 [N, K] with w = (code - 8) * scale + zero per (row, group of group_size columns);
    zeros None: symmetric codes (all zero)."""
    codes = unpack_int4(wq, k).float()
    s = scales.float().repeat_interleave(group_size, 1)[:, :k]
    if zeros is None:
        return (codes - 8) * s
    z = zeros.float().repeat_interleave(group_size, 1)[:, :k]
    return (codes - 8) * s + z


def ref_linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


def dequant_int8(wq: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """-> float32 [N, K]: wq * scales[:, None], or per group of `group_size` columns with scales [N, G]."""
    if not group_size:
        return wq.float() * scales.float()[:, None]
    k = wq.shape[1]
    return wq.float() * scales.float().repeat_interleave(group_size, 1)[:, :k]


def ref_linear_q8(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    return F.linear(x.float(), dequant_int8(wq, scales, group_size), bias).to(x.dtype)


def ref_linear_q4(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequant_int4(wq, scales, zeros, group_size, x.shape[-1])
    return F.linear(x.float(), w, bias).to(x.dtype)


# ----------------------------------------------------------------------------------------- wrappers


def _use_ext(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if x.device.type != "cpu" or not available():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T + bias -> [..., N] (dtype of x)."""
    if w.dtype != torch.float32 or not _use_ext(x, w, *([bias] if bias is not None else [])):
        return ref_linear_f32(x, w, bias)
    y = _ext.linear_f32(_f32(x.reshape(-1, x.shape[-1])), w, _f32(bias))
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def linear_q8(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant_int8(wq int8 [N, K], scales, group_size)^T + bias -> [..., N]. Pass fp32
    scales/bias to avoid a per-call conversion."""
    if not _use_ext(x, scales, *([bias] if bias is not None else [])):
        return ref_linear_q8(x, wq, scales, bias, group_size)
    y = _ext.linear_q8(_f32(x.reshape(-1, x.shape[-1])), wq, _f32(scales), _f32(bias), group_size or 0)
    return y.to(x.dtype).reshape(*x.shape[:-1], wq.shape[0])


def linear_q4(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant_int4(wq, scales, zeros)^T + bias -> [..., N] (zeros None: symmetric codes).
    Pass fp32 scales/zeros (as the int4 modules keep them) to avoid a per-call conversion."""
    extra = [t for t in (zeros, bias) if t is not None]
    if not _use_ext(x, scales, *extra):
        return ref_linear_q4(x, wq, scales, zeros, group_size, bias)
    y = _ext.linear_q4(
        _f32(x.reshape(-1, x.shape[-1])), wq, _f32(scales), _f32(zeros), group_size, _f32(bias)
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], wq.shape[0])


# cpu.py reads this module's isa() / ext(): imported last
from leanformer.kernels.cpu import cpu_info as cpu_info  # noqa: E402
from leanformer.kernels.cpu import describe as describe  # noqa: E402
