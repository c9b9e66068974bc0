"""Calibration hidden states kept in an unlinked temporary file instead of memory (streaming GPTQ / AWQ).

The sequential walk (calibrate.iter_scopes) holds the hidden state entering the current block for
every calibration batch: 128 sequences × 512 tokens × 896 fp32 is 235 MB for Qwen2.5-0.5B (805 MB for
a 3072-wide Llama-3.2-3B), the largest item of a streamed compression once the weights are read one
layer at a time. Only one batch is needed at a time, so the batches live in a file and are read back
exactly (the same bytes: results do not change). Plain reads and writes, not a memory map, so the
file's pages are page cache, never this process's resident set.
"""

from __future__ import annotations

import os
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
