"""Which KV block holds what: allocation, reservations, and the prefix cache (vLLM's design, kept small).

Blocks have a reference count: the sequences whose block table names them. A block nobody references
sits in the free list, oldest-freed first (LRU); if it holds a full block of known tokens it stays
findable in the prefix cache until the free list hands it out again, so a prompt that comes back soon
(a system prompt, few-shot examples, the earlier turns of a chat) finds its KV still there.

Prefix-cache keys are exact: (key id of the previous block, the block's token ids). The previous block's
key id is a number given once per registered block and never reused, so a block's key names its whole
prefix, a lookup walks the prompt block by block, and no hash collision can hand one request another
prompt's KV (vLLM hashes the same chain; equality on the token tuple makes it exact).

Admission by blocks: a request reserves, when admitted, the blocks its prompt and first generated
token need (less the blocks it finds cached); it waits in the queue, first come first served, while they
are not free. Later tokens take free blocks as they are written (`grow`); when none is left the
scheduler preempts a request (engine/paged.py) to make room. Blocks are taken lazily (as positions are
written), so reserved blocks keep serving prefix hits until used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from leanformer.errors import LeanformerError


@dataclass
class BlockTable:
    """One sequence's blocks, in position order, and what it may still take."""

    blocks: list[int] = field(default_factory=list)
    reserved: int = 0  # blocks it may still take without asking
    registered: int = 0  # leading blocks already in the prefix cache (computed and full)
    key: int = 0  # key id of the last registered block (0: the empty prefix)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise LeanformerError("the block manager needs at least one block of at least one token")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.reserved = 0  # promised to admitted sequences, not yet taken
        self._cached: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # key → (block, key id)
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block → its key, while cached
        self._next_id = 1
        # counters for /metrics, in tokens (as vLLM's prefix_cache_queries / _hits)
        self.query_tokens = 0
        self.hit_tokens = 0

    # ---- figures ----
    @property
    def n_free(self) -> int:
        """Blocks no sequence holds (some still cached for prefix hits)."""
        return len(self.free)

    @property
    def n_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def spare(self) -> int:
        """Free blocks nobody has been promised."""
        return len(self.free) - self.reserved

    @property
    def n_cached(self) -> int:
        return len(self._key_of)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- admission ----
    def _lookup(self, tokens: list[int]) -> list[tuple[int, int]]:
        """[(block, key id)] of the cached full blocks that start `tokens`, at most up to the block
        before the last token: the last token is always computed, its logits start the reply."""
        if not self.prefix_caching:
            return []
        bs, key, out = self.block_size, 0, []
        for i in range((len(tokens) - 1) // bs):
            hit = self._cached.get((key, tuple(tokens[i * bs : (i + 1) * bs])))
            if hit is None:
                break
            out.append(hit)
            key = hit[1]
        return out

    def admit(self, tokens: list[int], total_tokens: int) -> BlockTable | None:
        """Blocks for a sequence that starts with `tokens` and may reach `total_tokens`: its cached prefix
        blocks taken and the rest reserved, or None (nothing changed) when they are not free now."""
        hits = self._lookup(tokens)
        from_free = sum(1 for b, _ in hits if self.refs[b] == 0)
        need = self.blocks_for(total_tokens) - len(hits)
        if self.n_free - from_free - self.reserved < need:
            return None
        for b, _ in hits:
            self._ref(b)
        self.reserved += need
        self.query_tokens += len(tokens)
        self.hit_tokens += len(hits) * self.block_size
        table = BlockTable([b for b, _ in hits], need, len(hits), hits[-1][1] if hits else 0)
        return table

    def fits_ever(self, total_tokens: int) -> bool:
        return self.blocks_for(total_tokens) <= self.num_blocks

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    # ---- running ----
    def grow(self, table: BlockTable, n_tokens: int) -> list[tuple[int, int]]:
        """Give `table` blocks for its first n_tokens positions → [(index in table, block)] added."""
        added = []
        while len(table.blocks) * self.block_size < n_tokens:
            if table.reserved > 0:
                table.reserved -= 1
                self.reserved -= 1
            elif self.spare < 1:
                raise LeanformerError("no free KV block left (a scheduler bug: it should have preempted)")
            block, _ = self.free.popitem(last=False)  # the least recently freed
            self._uncache(block)
            self.refs[block] = 1
            added.append((len(table.blocks), block))
            table.blocks.append(block)
        return added

    def register(self, table: BlockTable, tokens: list[int], n_computed: int) -> None:
        """Offer the sequence's full, computed blocks (tokens = its ids so far, n_computed of them in the
        cache) to the prefix cache."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (table.registered + 1) * bs <= n_computed:
            i = table.registered
            key = (table.key, tuple(tokens[i * bs : (i + 1) * bs]))
            block = table.blocks[i]
            known = self._cached.get(key)
            if known is not None:  # the same prefix computed twice (two requests admitted together)
                table.key = known[1]
            elif block in self._key_of:  # already cached under its key (a hit): keep going along the chain
                table.key = self._cached[self._key_of[block]][1]
            else:
                self._cached[key] = (block, self._next_id)
                self._key_of[block] = key
                table.key = self._next_id
                self._next_id += 1
            table.registered += 1

    def release(self, table: BlockTable) -> None:
        """The sequence ended: drop its references (tail blocks first, so they are reused before the
        prefix blocks others are more likely to share) and its unused reservation."""
        for block in reversed(table.blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if block not in self._key_of:
                    self.free.move_to_end(block, last=False)  # nothing cached in it: hand it out first
        self.reserved -= table.reserved
        table.blocks, table.reserved = [], 0

    def _uncache(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key]
