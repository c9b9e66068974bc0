"""Sparse attention for long encoder inputs (inference only): sliding-window and LSH-bucketed attention,
and position tables stretched past the length an encoder was trained on.

- local (block-local, as BigBird's sliding blocks without global tokens): the input is cut into blocks
  of `window` tokens and each block's queries attend to the keys of their own block and of the block on
  either side. Every key within `window` positions of a query is seen, and some up to 2·window - 1 away
  (a query at a block's start sees one block back, at its end one block ahead). The cost is
  T x 3·window instead of T x T, as one SDPA call over [B, H·n, window, D] queries against
  [B, H·n, 3·window, D] keys (no [T, T] mask). Two blocks or fewer (window >= T / 2) is dense attention.
- lsh (Reformer, Kitaev et al. 2020, angular LSH): each round draws a random rotation R [D, n/2] and
  hashes the unit-normalised queries and keys (a pretrained BERT has separate Q and K, unlike Reformer's
  shared QK, so both are hashed with the same R) to bucket argmax([xR, -xR]); queries and keys are
  sorted by (bucket, position) and cut into chunks of `bucket_size`; query chunk c attends to key chunks
  c - 1, c, c + 1 (one flash-attention call per round, as for local). Several rounds are merged by
  their log-sum-exp weights; a key that falls in a query's chunks in r rounds gets its score lowered
  by log(r) in each (Reformer's duplicate correction), so the merge is softmax over the union of the
  rounds' keys, each key once.
- positions past the position table: "interpolate" (a row longer than the table reads the table at
  fractional positions p·(P-1)/(len-1), linearly interpolated; a row that fits is unchanged) or "repeat"
  (position p reads row p mod P). Per row, never per batch: a text embeds the same in any batch.

Shapes: q, k, v [B, H, T, D]; key_mask [B, T] bool (True = real token) or None; outputs [B, H, T, D].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from leanformer.errors import LeanformerError

KINDS = ("dense", "local", "lsh")
POSITIONS = ("interpolate", "repeat")
_NEG = torch.finfo(torch.float32).min  # finite: a row with every key masked gives a uniform softmax, not NaN


@dataclass(frozen=True)
class LongAttention:
    """How an encoder attends: kind dense | local | lsh, and how positions past the table are read."""

    kind: str = "dense"
    window: int = 256  # local: block length; every key within this distance is seen (some to 2x)
    bucket_size: int = 64  # lsh: chunk length after sorting by bucket (each query sees 3 chunks)
    hashes: int = 2  # lsh: hash rounds
    seed: int = 0  # lsh: the random rotations (fixed: the same text embeds the same every call)
    positions: str = "interpolate"  # rows longer than the position table: interpolate | repeat

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LeanformerError(f"attention {self.kind!r} unknown; choose one of {', '.join(KINDS)}")
        if self.positions not in POSITIONS:
            raise LeanformerError(f"positions {self.positions!r} unknown; choose {' or '.join(POSITIONS)}")
        for name in ("window", "bucket_size", "hashes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LeanformerError(f"attention {name} must be a whole number >= 1, got {value!r}")

    @classmethod
    def make(cls, attention: str | LongAttention | None = None, **options) -> LongAttention:
        """From a kind name (+ window=, bucket_size=, hashes=, seed=, positions=) or an instance."""
        if isinstance(attention, LongAttention):
            if options:
                raise LeanformerError("give attention options either in LongAttention(...) or as keywords")
            return attention
        known = {f.name for f in fields(cls)} - {"kind"}
        bad = sorted(set(options) - known)
        if bad:
            raise LeanformerError(f"unknown attention option {bad[0]!r}; known: {', '.join(sorted(known))}")
        return cls(kind=attention or "dense", **{k: v for k, v in options.items() if v is not None})


def position_ids(pos: torch.Tensor, lengths: torch.Tensor, table: int, mode: str) -> torch.Tensor:
    """0-based positions pos [B, T] (long) of rows with `lengths` [B] real tokens → fractional indices
    into a table of `table` rows [B, T] (float; integral where the row fits the table)."""
    if mode == "repeat":
        return (pos % table).to(torch.float32)
    scale = ((table - 1) / (lengths.clamp(min=2) - 1).to(torch.float32)).clamp(max=1.0)  # [B]
    return (pos.to(torch.float32) * scale[:, None]).clamp(max=table - 1)


def lookup(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of weight [P, hidden] at fractional indices [B, T], linearly interpolated → [B, T, hidden]."""
    lo = index.floor().long().clamp(max=weight.shape[0] - 1)
    hi = (lo + 1).clamp(max=weight.shape[0] - 1)
    frac = (index - lo.to(index.dtype))[..., None].to(weight.dtype)
    return weight[lo] * (1 - frac) + weight[hi] * frac


def long_attention(q, k, v, key_mask: torch.Tensor | None, spec: LongAttention, dense) -> torch.Tensor:
    """spec's attention over q/k/v [B, H, T, D] → [B, H, T, D]; `dense(q, k, v)` for the dense case."""
    t = q.shape[-2]
    # two blocks / chunks or fewer: every query's own and neighbouring blocks hold every key — dense
    if spec.kind == "local" and -(-t // spec.window) > 2:
        return local_attention(q, k, v, key_mask, spec.window)
    if spec.kind == "lsh" and -(-t // spec.bucket_size) > 2:
        return lsh_attention(q, k, v, key_mask, spec.bucket_size, spec.hashes, spec.seed)
    return dense(q, k, v)


def _neighbours(x: torch.Tensor, c: int, value=0.0) -> torch.Tensor:
    """x [B, H, n·c(, D)] in n blocks of c → each block's previous, own and next block side by side
    [B, H, n, 3c(, D)] (one copy; `value` fills the missing blocks at both ends)."""
    tail = x.shape[3:]
    b, h, n = x.shape[0], x.shape[1], x.shape[2] // c
    xp = F.pad(x, (0, 0) * len(tail) + (c, c), value=value).view(b, h, n + 2, c, *tail)
    return torch.cat([xp[:, :, :-2], xp[:, :, 1:-1], xp[:, :, 2:]], dim=3)


def _attend(q, k, v, bias, lse: bool):
    """softmax(q k^T / sqrt(D) + bias) v for q [B, G, c, D], k/v [B, G, L, D], bias broadcastable to
    [B, G, c, L] → (out [B, G, c, D], log-sum-exp of the scores [B, G, c] or None). torch's CPU flash
    kernel, which returns the log-sum-exp too (LSH merges its rounds by it); the plain matmuls where
    that private op is missing."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type != "cpu" or q.requires_grad or flash is None:
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)) + bias  # [B, G, c, L]
        out = torch.matmul(torch.softmax(scores, -1), v)
        return out, (torch.logsumexp(scores, -1) if lse else None)
    if not lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    out, log_sum = flash(q, k, v, 0.0, False, attn_mask=bias.expand(*q.shape[:2], *bias.shape[2:]))
    return out, log_sum


def _key_bias(valid: torch.Tensor) -> torch.Tensor:
    """valid [...] bool → additive score bias [...]: 0 where True, a finite -max where False (a query
    whose keys are all padding gets a uniform softmax, not NaN)."""
    return torch.zeros(valid.shape).masked_fill_(~valid, _NEG)


def local_attention(q, k, v, key_mask: torch.Tensor | None, window: int) -> torch.Tensor:
    """Block-local attention: blocks of `window` queries attend to their own block and the blocks on
    either side (see the module docstring). One SDPA call over [B, H·n, window, D] queries and
    [B, H·n, 3·window, D] keys; the only mask is padding and the two missing blocks at the ends."""
    b, h, t, d = q.shape
    c = window
    n = -(-t // c)  # blocks
    pad = n * c - t
    qb = F.pad(q, (0, 0, 0, pad)).reshape(b, h * n, c, d)
    kb = _neighbours(F.pad(k, (0, 0, 0, pad)), c).view(b, h * n, 3 * c, d)
    vb = _neighbours(F.pad(v, (0, 0, 0, pad)), c).view(b, h * n, 3 * c, d)
    real = torch.ones(b, t, dtype=torch.bool) if key_mask is None else key_mask.bool()
    valid = _neighbours(F.pad(real, (0, pad))[:, None], c, False)  # [B, 1, n, 3c]
    bias = _key_bias(valid).expand(b, h, n, 3 * c).reshape(b, h * n, 1, 3 * c)
    out, _ = _attend(qb, kb, vb, bias, lse=False)  # [B, H·n, c, D]
    return out.view(b, h, n * c, d)[:, :, :t]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], idx [B, H, N] → x's rows at idx [B, H, N, D]. index_select over the flat rows
    copies whole rows; gather with an index expanded over D measured ~5x slower."""
    b, h, t, d = x.shape
    base = (torch.arange(b * h, device=idx.device) * t).view(b, h, 1)
    return x.reshape(b * h * t, d).index_select(0, (idx + base).flatten()).view(*idx.shape, d)


def _bucket(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Angular LSH: x [B, H, T, D] (unit rows), rot [H, D, n/2] → bucket ids [B, H, T] in [0, n)."""
    proj = torch.einsum("bhtd,hdn->bhtn", x, rot)
    return torch.cat([proj, -proj], dim=-1).argmax(-1)


def lsh_rounds(q, k, key_mask, bucket_size: int, hashes: int, seed: int) -> list[tuple]:
    """Per hash round (order_q, order_k, chunk_q, chunk_k), each [B, H, T] long: the sorted order
    (slot → token) of queries and keys, and the chunk every token lands in (token → slot // bucket_size)."""
    b, h, t, d = q.shape
    n = -(-t // bucket_size)  # chunks
    n_buckets = max(2, 2 * -(-n // 2))  # about one bucket per chunk, even (argmax over [xR, -xR])
    real = torch.ones(b, t, dtype=torch.bool) if key_mask is None else key_mask.bool()
    g = torch.Generator().manual_seed(seed)
    rot = torch.randn(hashes, h, d, n_buckets // 2, generator=g).to(q.dtype)  # per round and head
    pos = torch.arange(t)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    rounds = []
    for r in range(hashes):
        # padding sorts last for queries and keys alike, so real tokens fill the same slots [0, length)
        # on both sides: a real query's own chunk always holds real keys (never an all-masked row)
        bq = _bucket(qn, rot[r]).masked_fill(~real[:, None, :], n_buckets)
        bk = _bucket(kn, rot[r]).masked_fill(~real[:, None, :], n_buckets)
        oq = torch.argsort(bq * t + pos, dim=-1)  # ties by position: a bucket keeps text order
        ok = torch.argsort(bk * t + pos, dim=-1)
        slot_chunk = (pos // bucket_size).expand_as(oq)
        cq = torch.empty_like(oq).scatter_(-1, oq, slot_chunk)
        ck = torch.empty_like(ok).scatter_(-1, ok, slot_chunk)
        rounds.append((oq, ok, cq, ck))
    return rounds


def lsh_attention(q, k, v, key_mask, bucket_size: int, hashes: int, seed: int) -> torch.Tensor:
    """Reformer-style LSH attention with separate Q and K (see the module docstring): query i attends to
    the union over rounds of the keys whose chunk is within one of its own. Per round one flash-attention
    call over the sorted chunks [B, H·n, c, D] against their neighbourhoods [B, H·n, 3c, D]."""
    b, h, t, d = q.shape
    c = bucket_size
    n = -(-t // c)  # chunks
    pad = n * c - t
    real = torch.ones(b, t, dtype=torch.bool) if key_mask is None else key_mask.bool()
    pos = torch.arange(t)
    rounds = lsh_rounds(q, k, key_mask, bucket_size, hashes, seed)
    outs, lses = [], []
    for r, (oq, ok, _, _) in enumerate(rounds):
        qs = F.pad(_gather_rows(q, oq), (0, 0, 0, pad)).view(b, h * n, c, d)
        kb = _neighbours(F.pad(_gather_rows(k, ok), (0, 0, 0, pad)), c).view(b, h * n, 3 * c, d)
        vb = _neighbours(F.pad(_gather_rows(v, ok), (0, 0, 0, pad)), c).view(b, h * n, 3 * c, d)
        key_idx = _neighbours(F.pad(ok, (0, pad), value=-1), c, -1)  # [B, H, n, 3c]: token, -1 = none
        valid = key_idx >= 0
        key_idx = key_idx.clamp(min=0)
        valid &= torch.gather(real[:, None, :].expand(b, h, t), 2, key_idx.flatten(2)).view_as(valid)
        bias = _key_bias(valid)[:, :, :, None, :]  # [B, H, n, 1, 3c]
        if hashes > 1:  # in how many rounds each (query, key) pair meets: log(count) off each score
            q_idx = F.pad(oq, (0, pad)).view(b, h, n, c)  # padding slots read token 0; dropped below
            count = None  # [B, H, n, c, 3c] uint8: the other rounds in which the pair meets
            for r2, (_, _, cq, ck) in enumerate(rounds):
                if r2 == r:  # here every (query, key in its chunks) pair meets by construction
                    continue
                # int16 chunk ids: the [.., c, 3c] broadcast compares run ~4x faster than int64's
                at_q = torch.gather(cq, 2, q_idx.flatten(2)).view(b, h, n, c, 1).to(torch.int16)
                at_k = torch.gather(ck, 2, key_idx.flatten(2)).view(b, h, n, 1, 3 * c).to(torch.int16)
                meets = (at_q - at_k).abs_() <= 1
                count = meets.to(torch.uint8) if count is None else count.add_(meets)
            dup = torch.zeros(count.shape, dtype=q.dtype)  # log(1 + count), by value (log and
            for m in range(1, hashes):  # table lookups over the largest tensor here measured slower)
                dup.masked_fill_(count == m, math.log(1 + m))
            bias = dup.neg_().add_(bias)  # in place: [B, H, n, c, 3c]
        bias = bias.reshape(b, h * n, bias.shape[3], 3 * c)
        out, lse = _attend(qs, kb, vb, bias, lse=hashes > 1)  # [B, H·n, c, D], [B, H·n, c]
        inv = torch.empty_like(oq).scatter_(-1, oq, pos.expand_as(oq))  # token → sorted slot
        outs.append(_gather_rows(out.reshape(b, h, n * c, d), inv))  # back to token order [B, H, T, D]
        if hashes > 1:
            lses.append(torch.gather(lse.reshape(b, h, n * c), 2, inv))  # [B, H, T]
    if hashes == 1:
        return outs[0]
    w = torch.softmax(torch.stack(lses), dim=0)[..., None]  # [R, B, H, T, 1]: each round's share
    return (torch.stack(outs) * w).sum(0)
