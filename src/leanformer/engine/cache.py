"""KV-cache policy: how many slots of what length a memory budget holds (the data structure is models/kv_cache.py)."""

from __future__ import annotations

from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache


def plan_cache(model, max_batch: int, max_seq: int, kv_budget_mb: float | None) -> tuple[int, int]:
    """→ (n_slots, max_seq): as many slots (≤ max_batch) of max_seq tokens as the KV budget holds."""
    if max_batch < 1:
        raise LeanformerError(f"--max-batch must be ≥ 1, got {max_batch}")
    a = model.args
    max_seq = min(max_seq, a.max_position_embeddings)
    # one slot's bytes, from a cache of that shape on the meta device (follows int8 KV storage etc.)
    param = next(p for p in model.parameters() if p.is_floating_point())
    storage = getattr(model, "kv_cache_dtype", None)
    one = KVCache(
        a.num_hidden_layers, 1, max_seq, a.num_key_value_heads, a.head_dim, param.dtype, "meta", storage
    )
    per_slot = one.nbytes()
    n_slots = max_batch
    if kv_budget_mb is not None:
        n_slots = min(max_batch, int(kv_budget_mb * 2**20 // per_slot))
        if n_slots < 1:
            raise LeanformerError(
                f"a KV budget of {kv_budget_mb:g} MB holds no sequence of {max_seq} tokens "
                f"(one needs {per_slot / 2**20:.1f} MB): raise --kv-budget-mb or lower --max-seq"
            )
    return n_slots, max_seq
