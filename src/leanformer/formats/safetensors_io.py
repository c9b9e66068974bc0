"""Read a .safetensors file into ordinary, 64-byte aligned CPU tensors (one copy, no memory map).

Why not `safetensors.torch.load_file`: it memory-maps the file and hands out tensors over that map at
the file's 8-byte data offsets. Quantized modules realign their integer codes (a clone), and any
tensor left on the map keeps all its pages resident, so a saved int4 model briefly held the file
twice (measured: 555 MB peak RSS loading SmolLM2 int4 vs 460 MB reading tensor by tensor here).
The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw bytes; each tensor is read straight into a fresh torch allocation.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFormatError(ValueError):
    """The file is not a complete, well-formed safetensors file (message says what is wrong)."""


def _read_header(f) -> tuple[dict, int, int]:
    """(header dict, offset of the data, file size); every malformation is a SafetensorsFormatError."""
    size = f.seek(0, 2)
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise SafetensorsFormatError("file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
        raise SafetensorsFormatError(f"header length {n} exceeds the file size {size}")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsFormatError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    return header, 8 + n, size


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The header's __metadata__ (e.g. {"producer": "leanformer"}) without reading any tensor."""
    with open(path, "rb", buffering=0) as f:
        header, _, _ = _read_header(f)
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _spec(name: str, spec: object, base: int, size: int) -> tuple[torch.dtype, list[int], int, int]:
    """Check one header entry *before* allocating anything: a hostile header cannot make us allocate
    more than the file holds (shape and offsets must agree with each other and with the file size)."""
    if not isinstance(spec, dict):
        raise SafetensorsFormatError(f"tensor {name}: header entry is not an object")
    dtype = DTYPES.get(spec.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise SafetensorsFormatError(f"tensor {name}: unsupported dtype {spec.get('dtype')!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsFormatError(f"tensor {name}: bad data_offsets {offsets!r}")
    start, end = offsets
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if end - start != nbytes:
        raise SafetensorsFormatError(
            f"tensor {name}: data_offsets span {end - start} bytes, shape needs {nbytes}"
        )
    if base + end > size:
        raise SafetensorsFormatError(f"tensor {name}: data ends past the end of the file (truncated?)")
    return dtype, shape, start, nbytes


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        header, base, size = _read_header(f)
        header.pop("__metadata__", None)
        specs = {name: _spec(name, spec, base, size) for name, spec in header.items()}
        for name, (dtype, shape, start, nbytes) in sorted(specs.items(), key=lambda kv: kv[1][2]):
            t = torch.empty(shape, dtype=dtype)
            if nbytes:
                f.seek(base + start)
                if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
                    raise SafetensorsFormatError(f"tensor {name}: short read (truncated?)")
            out[name] = t
    return out


_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a standard .safetensors file one tensor at a time (safetensors' own save_file first
    flattens every tensor into bytes: a second copy of the whole model at the end of a lean
    compression). Tensors are contiguous CPU tensors; the header is padded to 8 bytes with spaces."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
