"""The LM head and a tied embedding of a streamed model, read from the file in row slices.

The [vocab, hidden] table is the largest single tensor of a small model (Qwen2.5-0.5B: 151936 × 896,
545 MB in fp32, more than a quarter of the model) and reading it whole set the streaming peak. Its
rows are independent under the per-row roundings (int8 per output channel, int4 with plain group
scales), so it is read, cast and rounded one slice of rows at a time into the final module: the same
values, bit for bit, as rounding the whole float table (compress/stream.py's contract). Until then, a
calibration capture that needs float embeddings looks the rows up in the file (`FileEmbedding`).
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.compress.config import Int4WeightOnly, Int8WeightOnly
from leanformer.compress.int4 import Int4Linear
from leanformer.compress.int8 import Int8Linear
from leanformer.compress.qbase import set_module

ROWS_ELEMS = 1 << 22  # weights per slice (16 MB of fp32), as Int8Linear.from_linear's own slices


def by_rows(cfg: object) -> bool:
    """Whether `cfg` rounds each output row on its own (then a slice of rows rounds like the whole)."""
    return isinstance(cfg, Int8WeightOnly) or isinstance(cfg, Int4WeightOnly) and cfg.scale_bits is None


def row_heads(
    model: nn.Module, stages: list, names: list[list[str]], shapes: dict, table: str | None
) -> dict[str, tuple[int, str]]:
    """Linears outside the decoder layers that a per-row stage rounds: name -> (stage index, the
    file tensor holding the weight: `table`, the embedding's, when tied). Only the LM head qualifies:
    other Linears outside the layers are small."""
    out: dict[str, tuple[int, str]] = {}
    for k, (cfg, targets) in enumerate(zip(stages, names)):
        if "lm_head" not in targets or not by_rows(cfg):
            continue
        file_name = table or "lm_head.weight"
        if len(shapes.get(file_name, ())) == 2 and getattr(model.lm_head, "bias", None) is None:
            out["lm_head"] = (k, file_name)
    return out


@torch.no_grad()
def rows_quantized(model: nn.Module, cfg, name: str, file_name: str, lazy, embedding: str | None) -> None:
    """Round the Linear `name` (on the meta device) slice by slice from the file tensor `file_name`
    into its quantized module; `embedding`: the tied embedding's name, which then reads that module's
    table (QuantEmbedding), as recipe._share_quantized_tables does in memory."""
    from leanformer.compress.layout import QuantEmbedding

    lin = model.get_submodule(name)
    n, k = lin.out_features, lin.in_features
    if isinstance(cfg, Int8WeightOnly):
        new = Int8Linear(k, n, False, lazy.device, lazy.dtype)
    else:
        new = Int4Linear(k, n, cfg.group_size, False, lazy.device, lazy.dtype)
    step = max(1, ROWS_ELEMS // max(k, 1))
    for r in range(0, n, step):
        w = lazy.cast(lazy.source.rows(file_name, slice(r, r + step)))  # [R, K] in the load dtype
        part = nn.Linear(k, w.shape[0], bias=False, device="meta")
        part.weight = nn.Parameter(w, requires_grad=False)
        if isinstance(cfg, Int8WeightOnly):
            q = Int8Linear.from_linear(part)
        else:
            q = Int4Linear.from_linear(part, cfg.group_size)
        for buf_name, buf in q.named_buffers():  # codes, scales (and zeros): [R, ...] each
            getattr(new, buf_name)[r : r + w.shape[0]].copy_(buf)
        del w, part, q
    new.compact_scales()  # as Int4Linear.from_linear does for a whole matrix
    set_module(model, name, new)
    if embedding is not None:
        set_module(model, embedding, QuantEmbedding(new, tied=True, dtype=lazy.dtype))
    lazy.source.release()


class FileEmbedding(nn.Module):
    """Embedding lookups served from the file's rows (the looked-up rows only, cast as a loaded table
    would be): the calibration capture of a streamed model whose tied table is rounded by rows later."""

    def __init__(self, lazy, file_name: str, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        object.__setattr__(self, "_lazy", lazy)  # not a submodule: the tensor source is no state
        self.file_name, self.num_embeddings, self.embedding_dim = file_name, num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(ids.reshape(-1).cpu(), sorted=True, return_inverse=True)
        rows = self._lazy.cast(self._lazy.source.rows(self.file_name, uniq))  # [U, hidden]
        return rows[inverse.to(rows.device)].reshape(*ids.shape, self.embedding_dim)
