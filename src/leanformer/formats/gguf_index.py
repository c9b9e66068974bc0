"""A GGUF file's metadata and tensor table in one pass over its memory map (formats/gguf.py reads it).

Why not gguf.GGUFReader: it builds a numpy view for every item of every metadata array when it opens a
file, ~840,000 of them for SmolLM2's 49,152-token vocabulary and 48,900 merges: 2.0-2.4 s of a 4.2 s
load (docs/BENCHMARKS.md session 13), where llama.cpp opens the file in 0.3 s. Here the header is read
with struct and strings decoded once (0.07 s for that file), and tensors are the same numpy views of the
same memory map that
GGUFReader gives (dtype and shape by its rules; the gguf package still supplies the type tables, the
dequantizers and the writer). Little-endian GGUF v2 / v3, as llama.cpp writes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = 0x46554747  # "GGUF" little-endian
VERSIONS = (2, 3)
_SCALARS = {  # value type -> (struct format, numpy dtype for arrays)
    GGUFValueType.UINT8: ("<B", np.uint8),
    GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16),
    GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32),
    GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32),
    GGUFValueType.UINT64: ("<Q", np.uint64),
    GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}
_PLAIN = {  # tensor types GGUFReader gives as typed arrays; every other type is raw bytes
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class TensorInfo:
    """One tensor of the file: what formats/gguf.py reads of gguf's ReaderTensor."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64 dims, fastest first (GGML order)
    data: np.ndarray  # a view of the file's memory map: typed for F16 / F32 / ints, uint8 bytes otherwise


class GGUFIndex:
    """fields: key -> value (int / float / bool / str, or a list of them for arrays), in file order;
    tensors: TensorInfo in file order. Raises ValueError / struct.error / KeyError on a malformed file."""

    def __init__(self, path: str | Path) -> None:
        self.data = np.memmap(path, mode="r")
        self._bytes = memoryview(self.data)  # struct and string reads: slicing a memmap costs ~3 us each
        self._off = 0
        if self._read("<I") != MAGIC:
            raise ValueError("GGUF magic invalid")
        version = self._read("<I")
        if version not in VERSIONS:
            raise ValueError(
                f"GGUF version {version} (readable: {', '.join(map(str, VERSIONS))}, little-endian)"
            )
        n_tensors, n_fields = self._read("<Q"), self._read("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            if key in self.fields:
                raise KeyError(f"duplicate metadata key {key}")
            self.fields[key] = self._value(GGUFValueType(self._read("<I")))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid general.alignment {alignment!r}: a power of two")
        start = -(-self._off // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicate tensor names")
        self._bytes.release()  # the tensors are views of self.data, not of this

    def _read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._bytes, self._off)
        self._off += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        end = self._off + n
        if end > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = str(self._bytes[self._off : end], "utf-8")
        self._off = end
        return text

    def _value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind in _SCALARS:
            return self._read(_SCALARS[kind][0])
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, n = GGUFValueType(self._read("<I")), self._read("<Q")
        if item in _SCALARS:  # one view for the whole array, not one per item
            dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
            end = self._off + n * dtype.itemsize
            if end > len(self.data):
                raise ValueError("an array runs past the end of the file")
            values = np.frombuffer(self.data, dtype, n, self._off).tolist()
            self._off = end
            return values
        return [self._value(item) for _ in range(n)]  # strings (or nested arrays, flattened by nobody)

    def _tensor_info(self) -> tuple[str, np.ndarray, GGMLQuantizationType, int]:
        name = self._string()
        n_dims = self._read("<I")
        dims = np.frombuffer(self.data, np.dtype("<u8"), n_dims, self._off).copy()
        self._off += 8 * n_dims
        kind = GGMLQuantizationType(self._read("<I"))
        return name, dims, kind, self._read("<Q")

    def _tensor(
        self, start: int, name: str, dims: np.ndarray, kind: GGMLQuantizationType, offset: int
    ) -> TensorInfo:
        n = int(np.prod(dims))
        shape = tuple(reversed(dims.tolist()))
        block, size = GGML_QUANT_SIZES[kind]
        begin = start + offset
        if kind in _PLAIN:
            dtype, count = np.dtype(_PLAIN[kind]), n
        else:
            dtype, count, shape = (
                np.dtype(np.uint8),
                n * size // block,
                quant_shape_to_byte_shape(shape, kind),
            )
        end = begin + count * dtype.itemsize
        if end > len(self.data):
            raise ValueError(f"tensor {name} runs past the end of the file")
        return TensorInfo(name, kind, dims, self.data[begin:end].view(dtype).reshape(shape))
