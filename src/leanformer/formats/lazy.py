"""Tensor sources that read one weight at a time, for streaming compression (compress/stream.py).

A source lists a checkpoint's tensors (HF names, or our own names for a leanformer save) with their
shapes, and `get(name)` reads just that tensor into a fresh CPU tensor in the file's dtype: a bf16 /
fp16 weight stays 2 bytes until the layer that owns it is processed. Nothing else of the file is held.
- safetensors (one file or an HF index of shards): the header is parsed once (every entry checked
  before anything is allocated, as in safetensors_io), then each tensor is read with one readinto.
- GGUF: the file is memory-mapped by the gguf package; each tensor is dequantized on request and the
  pages read are dropped from the resident set (`release`).
- pytorch_model.bin (one file or an HF index of shards, the zip layout of torch.save): loaded with
  torch.load(mmap=True, weights_only=True), so every tensor is a view of a private memory map of the
  file and nothing is read until `get` copies one out; `release` drops the pages read from the resident
  set, as for GGUF. A pre-1.6 (non-zip) pickle cannot be mapped: refused in one line.
- llama2.c: a small flat checkpoint, read whole (these files are tiny), served from memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from leanformer.errors import LeanformerError
from leanformer.formats.hf_weights import shard_files, torch_weights
from leanformer.formats.safetensors_io import SafetensorsFormatError, _read_header, _spec


class TensorSource(Protocol):
    """Named tensors read on demand. `shapes` lists every tensor (file order)."""

    shapes: dict[str, tuple[int, ...]]

    def get(self, name: str) -> torch.Tensor: ...

    def rows(self, name: str, which: slice | torch.Tensor) -> torch.Tensor:
        """Rows `which` (a slice, or sorted unique int64 indices) of a tensor of two or more dims:
        a table or LM head is rounded / looked up in slices, never read whole."""
        ...

    def release(self) -> None: ...


@dataclass
class SafetensorsSource:
    """Tensors of one or more .safetensors files, each read on request (no memory map is kept)."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    _where: dict[str, tuple[Path, int, int]] = field(default_factory=dict)  # name -> (file, offset, bytes)

    def __post_init__(self) -> None:
        for fp in self.files:
            try:
                with open(fp, "rb", buffering=0) as f:
                    header, base, size = _read_header(f)
                    header.pop("__metadata__", None)
                    for name, spec in header.items():
                        dtype, shape, start, nbytes = _spec(name, spec, base, size)
                        self.shapes[name], self.dtypes[name] = tuple(shape), dtype
                        self._where[name] = (fp, base + start, nbytes)
            except (SafetensorsFormatError, OSError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise LeanformerError(f"corrupt or truncated weights file {fp}: {msg}") from None

    def get(self, name: str) -> torch.Tensor:
        fp, offset, nbytes = self._where[name]
        t = torch.empty(self.shapes[name], dtype=self.dtypes[name])
        if nbytes:
            with open(fp, "rb", buffering=0) as f:
                f.seek(offset)
                if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
                    raise LeanformerError(f"weights file {fp}: tensor {name}: short read (truncated?)")
        return t

    def rows(self, name: str, which: slice | torch.Tensor) -> torch.Tensor:
        fp, offset, nbytes = self._where[name]
        n, rest = self.shapes[name][0], self.shapes[name][1:]
        row = nbytes // max(n, 1)  # bytes per row
        if isinstance(which, slice):
            a, b, _ = which.indices(n)
            runs = [(a, max(b - a, 0))]
        else:  # runs of consecutive indices: one read each
            idx = which.tolist()
            runs = []
            for i in idx:
                if runs and runs[-1][0] + runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((i, 1))
        total = sum(c for _, c in runs)
        t = torch.empty((total, *rest), dtype=self.dtypes[name])
        buf = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        fd = os.open(fp, os.O_RDONLY)
        try:
            at = 0
            for start, count in runs:
                want = count * row
                if os.preadv(fd, [buf[at : at + want]], offset + start * row) != want:
                    raise LeanformerError(f"weights file {fp}: tensor {name}: short read (truncated?)")
                at += want
        finally:
            os.close(fd)
        return t

    def release(self) -> None:
        return None


@dataclass
class GGUFSource:
    """A GGUF file's tensors under HF names, dequantized to fp32 one at a time."""

    raw: dict[str, Any]  # HF name -> formats.gguf.GGUFTensor over the file's memory map
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shapes = {n: tuple(t.shape) for n, t in self.raw.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.raw[name].dequantize()

    def rows(self, name: str, which: slice | torch.Tensor) -> torch.Tensor:
        from leanformer.formats.gguf import GGUFTensor

        t = self.raw[name]  # data: float [rows, ...] or block-quantized uint8 [rows, bytes per row]
        part = t.data[which] if isinstance(which, slice) else t.data[which.numpy()]
        if part.shape[0] == 0:  # gguf's dequantizers cannot reshape zero blocks
            return torch.empty((0, *t.shape[1:]), dtype=torch.float32)
        return GGUFTensor(t.name, t.ggml_type, (part.shape[0], *t.shape[1:]), part).dequantize()

    def release(self) -> None:
        from leanformer.formats.gguf import drop_file_pages

        drop_file_pages(self.raw)


@dataclass
class MemorySource:
    """A state dict already in memory (llama2.c checkpoints); `get` hands each tensor over once."""

    tensors: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shapes = {n: tuple(t.shape) for n, t in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.tensors.pop(name)

    def rows(self, name: str, which: slice | torch.Tensor) -> torch.Tensor:
        return self.tensors[name][which].clone()

    def release(self) -> None:
        return None


@dataclass
class TorchBinSource:
    """Tensors of one or more pytorch_model.bin files, each a view of a private memory map of its file
    (torch.load(mmap=True, weights_only=True)): `get` / `rows` copy out and drop the pages they read."""

    files: list[Path]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fp in self.files:
            self._maps.update(torch_weights(fp, mmap=True))
        self.shapes = {n: tuple(t.shape) for n, t in self._maps.items()}

    def get(self, name: str) -> torch.Tensor:
        t = self._maps[name]
        out = t.clone(memory_format=torch.contiguous_format)
        _drop_pages(t)
        return out

    def rows(self, name: str, which: slice | torch.Tensor) -> torch.Tensor:
        t = self._maps[name]
        out = (t[which] if isinstance(which, slice) else t.index_select(0, which)).clone()
        _drop_pages(t)  # a table read in row slices never becomes resident whole
        return out

    def release(self) -> None:
        for t in self._maps.values():
            _drop_pages(t)


def _drop_pages(t: torch.Tensor) -> None:
    """MADV_DONTNEED over the mapped storage of `t`: the file pages read leave the resident set (a
    private map never written reads them from the file again if touched). Best effort."""
    import ctypes
    import mmap

    s = t.untyped_storage()
    if not s.nbytes() or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    lo, hi = s.data_ptr() // page * page, -(-(s.data_ptr() + s.nbytes()) // page) * page
    ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def _shards(folder: Path, index: str) -> list[Path]:
    files = [folder / f for f in shard_files(folder, index)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise LeanformerError(f"weight shard {missing[0]} listed in the index is missing")
    return files


def hf_source(folder: Path) -> SafetensorsSource | TorchBinSource:
    """The weights of an HF (or leanformer) folder, in the order `load` looks for them: safetensors,
    then pytorch_model.bin (each one file or an index of shards)."""
    if (folder / "model.safetensors").is_file():
        return SafetensorsSource([folder / "model.safetensors"])
    if (folder / "model.safetensors.index.json").is_file():
        return SafetensorsSource(_shards(folder, "model.safetensors.index.json"))
    if (folder / "pytorch_model.bin").is_file():
        return TorchBinSource([folder / "pytorch_model.bin"])
    if (folder / "pytorch_model.bin.index.json").is_file():
        return TorchBinSource(_shards(folder, "pytorch_model.bin.index.json"))
    raise LeanformerError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or an index of shards"
    )


def open_source(path: Path) -> tuple[dict | None, TensorSource, Any | None]:
    """(config or None when it is the folder's config.json, source, tokenizer or None) for a GGUF file,
    a llama2.c .bin or an HF / leanformer folder (whose config and tokenizer loading reads itself)."""
    gguf = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if path.is_dir() and (path / "config.json").exists():
        return None, hf_source(path), None
    if gguf:
        from leanformer.formats.gguf import load_gguf_tokenizer, read_gguf_raw

        config, raw = read_gguf_raw(gguf[0])
        return config, GGUFSource(raw), load_gguf_tokenizer(gguf[0])
    if path.suffix == ".bin" or path.is_dir() and list(path.glob("*.bin")):
        from leanformer.formats.llama2c import read_llama2c

        config, state, tok = read_llama2c(path)
        return config, MemorySource(state), tok
    raise LeanformerError(
        f"cannot stream {path}: expected an HF folder with config.json and safetensors or "
        "pytorch_model.bin, a .gguf file "
        "or a llama2.c .bin"
    )
