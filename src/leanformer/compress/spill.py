"""Calibration hidden states, and decoder layers between walks, kept in an unlinked temporary file instead of memory (streaming compression).

The sequential walk (calibrate.iter_scopes) holds the hidden state entering the current block for
every calibration batch: 128 sequences × 512 tokens × 896 fp32 is 235 MB for Qwen2.5-0.5B (805 MB for
a 3072-wide Llama-3.2-3B), the largest item of a streamed compression once the weights are read one
layer at a time. Only one batch is needed at a time, so the batches live in a file and are read back
exactly (the same bytes: results do not change). Plain reads and writes, not a memory map, so the
file's pages are page cache, never this process's resident set.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import torch

from leanformer.errors import LeanformerError


class SpilledStates:
    """A list-like store of CPU tensors: `append(t)`, `store[b]` (a fresh tensor read back),
    `store[b] = t` (same shape and dtype: written over the old bytes), `len(store)`."""

    def __init__(self) -> None:
        # unlinked at once: gone on close or exit; closed by close() (a context manager cannot span the walk)
        self._file = tempfile.TemporaryFile(prefix="leanformer-calib-")  # noqa: SIM115
        self._where: list[tuple[int, torch.Size, torch.dtype]] = []  # offset, shape, dtype per item
        self._end = 0

    def __len__(self) -> int:
        return len(self._where)

    def append(self, t: torch.Tensor) -> None:
        self._where.append((self._end, t.shape, t.dtype))
        self._end += t.numel() * t.element_size()
        self[len(self._where) - 1] = t

    def __getitem__(self, b: int) -> torch.Tensor:
        offset, shape, dtype = self._where[b]
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            if os.preadv(self._file.fileno(), [buf], offset) != len(buf):
                raise LeanformerError("calibration states: short read from the temporary file")
        return t

    def __setitem__(self, b: int, t: torch.Tensor) -> None:
        offset, shape, dtype = self._where[b]
        if t.shape != shape or t.dtype != dtype:
            raise LeanformerError(f"calibration states: batch {b} changed shape or dtype")
        t = t.detach().cpu().contiguous()
        if t.numel():
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            try:
                written = os.pwrite(self._file.fileno(), buf, offset)
            except OSError as e:
                raise LeanformerError(
                    f"calibration states: cannot write the temporary file in {tempfile.gettempdir()} "
                    f"({e.strerror}); free some disk space there"
                ) from None
            if written != len(buf):
                raise LeanformerError("calibration states: short write to the temporary file (disk full?)")

    def close(self) -> None:
        self._file.close()


def check_space(nbytes: int, what: str) -> None:
    """One line before any work when the temporary directory cannot hold `nbytes` (what goes there)."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if nbytes > free:
        raise LeanformerError(
            f"streaming parks {what} ({nbytes / 2**30:.1f} GB) in {tempfile.gettempdir()}, which has "
            f"{free / 2**30:.1f} GB free: free some space there, set TMPDIR to a larger disk, or "
            "compress in memory (--in-memory)"
        )


class SpilledLayers:
    """Decoder layers parked in an unlinked temporary file between two streaming walks (a recipe with
    several calibrated stages walks once per stage, as in memory: stage 2 calibrates on the outputs of
    layers that stage 1 already changed). `put(key, layer)` pickles the layer's children and leaves
    them on the meta device (shapes and types kept, for the next stage's plan checks); `restore(key,
    layer)` puts them back into the same layer object (the walk holds a list of the layer objects).
    oneDNN-packed copies (`packed_weight`, opaque tensors that do not pickle) are dropped and packed
    again from the same weight on restore: the same bytes, so results do not change."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="leanformer-layers-")  # noqa: SIM115 (see SpilledStates)
        self._where: dict[int, tuple[int, int]] = {}  # key -> (offset, length)
        self._end = 0

    def put(self, key: int, layer: torch.nn.Module) -> None:
        packed = [n for n, m in layer.named_modules() if m._buffers.get("packed_weight") is not None]
        for n in packed:
            del layer.get_submodule(n)._buffers["packed_weight"]
        buf = io.BytesIO()
        torch.save({"children": dict(layer.named_children()), "packed": packed}, buf)
        data = buf.getbuffer()
        try:
            written = os.pwrite(self._file.fileno(), data, self._end)
        except OSError as e:
            raise LeanformerError(
                f"streaming: cannot park a layer in {tempfile.gettempdir()} ({e.strerror}); free some disk "
                "space there (about the model's size in the load dtype) or set TMPDIR to a larger disk"
            ) from None
        if written != len(data):
            raise LeanformerError("streaming: short write of a parked layer (disk full?)")
        self._where[key] = (self._end, len(data))
        self._end += len(data)
        del data, buf
        layer.to("meta")  # frees the weights; the structure stays for the next stage's checks

    def restore(self, key: int, layer: torch.nn.Module) -> None:
        offset, length = self._where.pop(key)
        data = bytearray(length)
        if os.preadv(self._file.fileno(), [data], offset) != length:
            raise LeanformerError("streaming: short read of a parked layer from the temporary file")
        saved = torch.load(io.BytesIO(data), weights_only=False)  # our own file, written just above
        del data
        for name, child in saved["children"].items():
            setattr(layer, name, child)
        for n in saved["packed"]:
            m = layer.get_submodule(n)
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1)
            m.register_buffer("packed_weight", packed, persistent=False)

    def renumber(self, kept: list[int]) -> None:
        """Keys after dropping layers: kept[i] (an old index) becomes i; the dropped are forgotten."""
        self._where = {i: self._where[k] for i, k in enumerate(kept)}

    def close(self) -> None:
        self._file.close()
