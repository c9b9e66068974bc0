"""A model's weights moved into one block of memory backed by 2 MB pages (Linux transparent huge pages).

Why: batch-1 decode streams every weight once per token, and with 4 KB pages one core's stream ran at
~18 GB/s where the same loop over 2 MB pages ran at ~29 (a plain C++ sum, Zen 4): the hardware
prefetchers stop at each 4 KB page boundary and every page costs a TLB walk. On a kernel whose THP mode
is `madvise` (the default of many distributions) memory only gets huge pages when asked, which torch's
allocator does not do. So the fused decode step, before it captures a model's tensors, moves every CPU
tensor of at least MIN_BYTES into one private anonymous mapping advised MADV_HUGEPAGE, in the model's
own order (layer by layer, as decode reads it). Values, dtypes, shapes, strides and sharing (tied
embeddings, views of one storage) are unchanged; Parameters stay the same objects (their .data moves).
Elsewhere (THP off, not Linux) nothing moves.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
from pathlib import Path

import torch
from torch import nn

MIN_BYTES = 64 << 10  # norms and biases stay where they are: a few KB each, no stream to speak of
HUGE = 2 << 20
TRIM_EVERY = 8 << 20  # bytes moved between two trims: the move's peak memory stays ~this over the model's
ALIGN = 64  # each storage's start in the block: a cache line, as torch's allocator gives


def thp_mode() -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), None where there is none (not Linux)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def huge_empty(nbytes: int) -> torch.Tensor | None:
    """uint8 [nbytes], 2 MB aligned, in a private anonymous mapping advised MADV_HUGEPAGE (the pages
    arrive at first touch); None where huge pages cannot be asked for. The mapping lives as long as the
    tensor's storage (torch.frombuffer holds it)."""
    if thp_mode() not in ("always", "madvise") or not hasattr(mmap, "MADV_HUGEPAGE") or nbytes <= 0:
        return None
    try:  # private: a shared anonymous mapping is shmem, which THP leaves alone
        mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # no address space for it (ulimit -v, overcommit off) or no THP after all: stay put
        return None
    block = torch.frombuffer(mm, dtype=torch.uint8)
    start = -block.data_ptr() % HUGE
    return block[start : start + nbytes]


def huge_zeros(
    count: int, shape: tuple[int, ...], dtype: torch.dtype, min_bytes: int = 4 << 20
) -> list[torch.Tensor] | None:
    """`count` zero tensors of `shape` one after another in one huge-page block (a KV cache's layers,
    which decode streams every token); None when THP is unavailable or they total under `min_bytes`
    (a 2 MB page zeroed at first touch costs more than a small cache gains)."""
    n = torch.Size(shape).numel()
    each = -(-n * dtype.itemsize // ALIGN) * ALIGN
    if count * each < min_bytes or (block := huge_empty(count * each)) is None:
        return None  # anonymous memory is zero already: nothing to fill
    return [block[i * each : i * each + n * dtype.itemsize].view(dtype).view(shape) for i in range(count)]


def _trim() -> int:
    """Give freed heap memory back to the OS (glibc's malloc_trim): the moved tensors' old memory is free
    but glibc keeps freed chunks of a few hundred KB in its heap, so without this the process would hold
    the weights twice (SmolLM2: +74 MB of RSS). Returns 0 (bytes moved since the last trim)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)
    return 0


def _storages(model: nn.Module) -> dict[int, tuple[torch.UntypedStorage, list]]:
    """Storage data pointer -> (the storage, [(container, name, tensor) of every tensor in it])."""
    out: dict[int, tuple[torch.UntypedStorage, list]] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                # strided CPU tensors only (not oneDNN-packed weights, whose memory torch does not expose)
                if t is None or not t.is_cpu or t.layout != torch.strided or t.is_mkldnn or t.is_quantized:
                    continue
                s = t.untyped_storage()
                out.setdefault(s.data_ptr(), (s, []))[1].append((store, name, t))
    return out


@torch.no_grad()
def _move(block: torch.Tensor, off: int, s: torch.UntypedStorage, users: list) -> int:
    """Storage s's bytes to block[off:], every tensor in it rebound there; returns its bytes."""
    new = block[off : off + s.nbytes()]
    new.copy_(torch.empty(0, dtype=torch.uint8).set_(s))  # the storage's bytes, whatever its dtype
    mapping = new.untyped_storage()  # the whole mapping's: offsets count from its start
    at = new.data_ptr() - mapping.data_ptr()  # bytes; a multiple of 64 (the block is page aligned)
    # each tensor object once (a tied Parameter is listed by both modules), its place read before any
    # is rebound; a normal or an inference tensor as the one it replaces, whatever mode this runs in (a
    # normal tensor turned inference one by a plan built under inference_mode, e.g. in generate, could not
    # be loaded into, trained or written in place outside inference_mode afterwards)
    views = {}
    for _, _, t in users:
        with torch.inference_mode(t.is_inference()):
            views[id(t)] = torch.empty(0, dtype=t.dtype).set_(
                mapping, at // t.element_size() + t.storage_offset(), t.size(), t.stride()
            )
    for store, name, t in users:
        if not isinstance(t, nn.Parameter):
            store[name] = views[id(t)]
    for t in {id(t): t for _, _, t in users if isinstance(t, nn.Parameter)}.values():
        t.data = views[id(t)]  # the same Parameter object (optimizers, tied modules keep it)
    return s.nbytes()


def to_huge_pages(model: nn.Module) -> int:
    """Move the model's large CPU tensors into one huge-page block (see the module's docstring); returns
    the bytes moved (0: THP unavailable, or everything already there)."""
    blocks = getattr(model, "_huge_pages", [])  # (start, end) of the mappings moved into before
    todo = [
        (s, users)
        for ptr, (s, users) in _storages(model).items()
        if s.nbytes() >= MIN_BYTES and not any(a <= ptr < b for a, b in blocks)
    ]
    if not todo:
        return 0
    sizes = [-(-s.nbytes() // ALIGN) * ALIGN for s, _ in todo]
    offsets, total = [0, *itertools.accumulate(sizes)][:-1], sum(sizes)
    block = huge_empty(total)
    if block is None:
        return 0
    since_trim = 0
    for i, off in enumerate(offsets):  # each old storage's last reference goes as it moves
        if since_trim >= TRIM_EVERY:  # hand the moved tensors' old memory back as we go
            since_trim = _trim()
        since_trim += _move(block, off, *todo[i])
        todo[i] = None
    _trim()
    # where the mapping lies (plain ints: a deep copy's tensors are elsewhere and move again), so a later
    # call moves only what is new
    mapping = block.untyped_storage()
    model._huge_pages = [*blocks, (mapping.data_ptr(), mapping.data_ptr() + mapping.nbytes())]
    return total
