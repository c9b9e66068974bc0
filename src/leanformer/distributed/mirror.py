"""One engine, N ranks: rank 0 schedules, every rank runs each forward of a tensor-parallel model.

The server's scheduler (admission, batching, sampling, block tables) runs on rank 0 only. Its model
is a `Leader`: each call first broadcasts what the forward reads, then runs it; the other ranks sit in
`follow`, receive the same step and run the same forward on their shard, so the all-reduces inside
meet. What a forward reads besides its arguments is the cache's bookkeeping: the per-slot lengths
(KVCache) and the block tables too (PagedKVCache). Both are sent whole with every step, so whatever
rank 0's scheduler did between forwards (admit, reset, preempt, give out blocks) reaches the other
ranks as its result, never as a list of operations to replay. The K/V themselves are written by the
forwards, on every rank its own heads. Logits are used on rank 0 only.

One step on the wire: a header [7] (op, B, T, which of cache / slots / logits_at are given, slots in
the cache, blocks per table) and one int64 payload: ids [B*T] | slots [B] | logits_at [B] | lengths
[n_slots] | block tables [n_slots*max_blocks]. gloo's timeout (30 min by default) would end an idle
follower's wait, so the leader sends an empty step after `heartbeat_s` without one.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.distributed as dist

from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache
from leanformer.models.paged_cache import PagedKVCache

log = logging.getLogger("leanformer.distributed")

_STEP, _IDLE, _STOP = 0, 1, 2
_HAS_CACHE, _HAS_SLOTS, _HAS_AT = 1, 2, 4


def _root(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


class Leader:
    """Rank 0's stand-in for the model: calling it broadcasts the step, then runs the forward.

    Every other attribute is the model's (args, parameters(), family, ...), so the scheduler and the
    server use it as the model. Calls are serialized (one lock with the heartbeat thread).
    """

    def __init__(self, model, group=None, heartbeat_s: float = 60.0) -> None:
        self.model, self.group = model, group
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
        self._beat.start()

    def __getattr__(self, name: str):
        return getattr(self.model, name)  # only reached for names Leader itself lacks

    def __call__(self, input_ids, cache=None, slots=None, logits_at=None):
        if cache is not None and type(cache) not in (KVCache, PagedKVCache):
            # other caches (KV policies, chained speculative rows) keep state the followers lack
            raise LeanformerError(
                f"serve --tp mirrors the slot and paged KV caches, not a {type(cache).__name__}; "
                "serve this model without --tp for that feature"
            )
        with self._lock:
            if self._stopped.is_set():
                raise LeanformerError("the tensor-parallel ranks were stopped")
            self._send(_STEP, input_ids, cache, slots, logits_at)
            return self.model(input_ids, cache=cache, slots=slots, logits_at=logits_at)

    def _send(self, op: int, ids=None, cache=None, slots=None, logits_at=None) -> None:
        b, t = (0, 0) if ids is None else ids.shape
        flags = (cache is not None) * _HAS_CACHE | (slots is not None) * _HAS_SLOTS
        flags |= (logits_at is not None) * _HAS_AT
        tables = getattr(cache, "block_tables", None)
        n_slots = 0 if cache is None else len(cache.lengths)
        max_blocks = 0 if tables is None else tables.shape[1]
        header = torch.tensor([op, b, t, flags, n_slots, max_blocks, 0], dtype=torch.long)
        dist.broadcast(header, src=_root(self.group), group=self.group)
        self._last = time.monotonic()
        if op != _STEP:
            return
        parts = [ids.reshape(-1)]
        parts += [x.reshape(-1) for x in (slots, logits_at) if x is not None]
        if cache is not None:
            parts.append(cache.lengths)
            if tables is not None:
                parts.append(tables.reshape(-1))
        dist.broadcast(torch.cat([p.to(torch.long) for p in parts]), src=_root(self.group), group=self.group)

    def _heartbeat(self, every: float) -> None:
        while not self._stopped.wait(every / 4):
            if time.monotonic() - self._last > every and self._lock.acquire(blocking=False):
                try:
                    if not self._stopped.is_set():
                        self._send(_IDLE)
                except Exception:
                    log.exception("tensor-parallel heartbeat failed")
                finally:
                    self._lock.release()

    def stop(self) -> None:
        """Tell the followers to return (once; a rank already gone is logged, not raised)."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            try:
                self._send(_STOP)
            except Exception as e:
                log.warning("could not reach the other tensor-parallel ranks to stop them: %s", e)


@torch.inference_mode()
def follow(model, cache, group=None) -> int:
    """Run rank 0's forwards on this rank's shard until it says stop; → the number of steps run.

    A forward that raises here raised on rank 0 too (same inputs, same code): it is logged and the
    loop goes on, as rank 0's scheduler goes on (its retry row by row arrives as further steps).
    """
    root, steps = _root(group), 0
    while True:
        header = torch.empty(7, dtype=torch.long)
        dist.broadcast(header, src=root, group=group)
        op, b, t, flags, n_slots, max_blocks, _ = header.tolist()
        if op == _STOP:
            return steps
        if op == _IDLE:
            continue
        n = b * t + b * (bool(flags & _HAS_SLOTS) + bool(flags & _HAS_AT))
        n += (n_slots + n_slots * max_blocks) if flags & _HAS_CACHE else 0
        payload = torch.empty(n, dtype=torch.long)
        dist.broadcast(payload, src=root, group=group)
        ids, rest = payload[: b * t].view(b, t), payload[b * t :]
        slots = logits_at = None
        if flags & _HAS_SLOTS:
            slots, rest = rest[:b], rest[b:]
        if flags & _HAS_AT:
            logits_at, rest = rest[:b], rest[b:]
        if flags & _HAS_CACHE:
            tables = getattr(cache, "block_tables", None)
            if (n_slots, max_blocks) != (len(cache.lengths), 0 if tables is None else tables.shape[1]):
                raise LeanformerError("the ranks' KV caches differ: start every rank with the same flags")
            cache.lengths.copy_(rest[:n_slots])
            if max_blocks:
                cache.block_tables.copy_(rest[n_slots:].view(n_slots, max_blocks))
        try:
            model(ids, cache=cache if flags & _HAS_CACHE else None, slots=slots, logits_at=logits_at)
        except Exception:
            log.exception("a mirrored forward failed (rank 0's failed alike)")
        steps += 1
