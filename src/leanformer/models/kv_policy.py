"""KV policies: what a bounded cache keeps when a sequence outgrows it.

- SinkWindow(sinks, window): StreamingLLM. The first `sinks` tokens and the most recent `window`
  tokens stay; generation goes on past the model's context with a fixed amount of memory.
  Positions are *positions in the cache*: a kept key sits at its cache index, and when the window
  slides the kept keys move down and their RoPE rotation is undone by the distance moved (one
  rotation by -delta of the post-RoPE keys). Eviction happens in chunks of `chunk` tokens so the move
  and re-rotation cost is paid once per chunk (amortised), and the cache never holds more than
  sinks + window + chunk tokens. The physical layout stays KVCache's, so the fused C++ decode step
  reads it unchanged. GPT-2 (learned positions added at the input) gets positions in the cache too.
- HeavyHitters(budget): H2O. Keeps the sinks, the `recent` newest tokens and the keys with the most
  accumulated attention (summed over queries and over the query heads of a KV head), per KV head.
- SnapKV(budget): after the prompt, the last `observe` prompt queries vote (attention, max-pooled over
  `pool` neighbours) for the prompt keys worth keeping, per KV head; the sinks and the observation
  window always stay; decoding then appends to the compressed cache without further eviction.

H2O and SnapKV keep each key's original position (its rotation is left alone); new tokens continue at
their true position, cache index + tokens evicted from that slot (Step.rope_positions), so the
sequence must fit the model's context. Scoring needs the queries: `observe_queries(model, cache)`
hooks each attention's qkv projection. Decode steps may take the fused C++ step, which shows no
queries: an H2O cache records their tokens and replays them through the module path right before its
next eviction (models/kv_replay.py), so the scores, and the eviction decisions, are the module path's
at one batched forward of `chunk` tokens per eviction. Without the replay (a model with no Llama-style
embed_tokens / layers) an H2O cache that may evict keeps the module path (`fused_layout`). With a
budget (or window) that holds the whole sequence nothing is evicted or observed and the output is the
plain cache's, token for token.

The policies themselves (settings, checks, cache sizes) are models/kv_policy_types.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import torch
import torch.nn.functional as F

from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache, Step, cast, quantize_kv
from leanformer.models.kv_policy_types import HeavyHitters, Policy, SinkWindow, SnapKV
from leanformer.models.kv_replay import replay
from leanformer.models.layers import Attention, apply_rotary

# the policy types live in kv_policy_types.py; importers take them from here too
__all__ = ["HeavyHitters", "Policy", "PolicyCache", "SinkWindow", "SnapKV", "observe_queries"]


class PolicyCache(KVCache):
    """A KVCache that evicts by `policy` when a slot would overflow. `inv_freq` [D/2]: the model's RoPE
    frequencies (None for learned positions), used to re-rotate keys that a sliding window moves."""

    def __init__(
        self, *args, policy: Policy, prompt_len: int, total: int, inv_freq: torch.Tensor | None = None, **kw
    ) -> None:
        super().__init__(*args, **kw)
        self.policy, self.inv_freq = policy, inv_freq
        self.kept = policy.window if isinstance(policy, SinkWindow) else policy.kept(prompt_len)
        # tokens evicted per slot: a new token's RoPE position is its cache index + this (H2O / SnapKV)
        self.offsets = torch.zeros(self.n_slots, dtype=torch.long)
        self.compressed = torch.zeros(self.n_slots, dtype=torch.bool)  # SnapKV: done once per slot
        if isinstance(policy, SnapKV):
            self.may_evict = prompt_len > self.kept
        else:  # sequences of `total` tokens outgrow this cache
            self.may_evict = total > self.max_seq
        # the largest forward that always fits after an eviction (prompts are prefilled in such pieces)
        self.piece = self.max_seq - self.kept - (policy.sinks if isinstance(policy, SinkWindow) else 0)
        if isinstance(policy, SnapKV) or not self.may_evict:
            self.piece = self.max_seq  # SnapKV scores the prompt whole, then compresses it once
        n = len(self.k) if self.may_evict and not isinstance(policy, SinkWindow) else 0
        # accumulated (H2O) or observation-window (SnapKV) attention per key: [slots, n_kv, max_seq]
        self.scores = [torch.zeros(self.k[0].shape[:3], dtype=torch.float32) for _ in range(n)]
        self.queries: dict[int, torch.Tensor] = {}  # layer → this step's rotated queries [B, H, T, D]
        self.last_step: Step | None = None
        # H2O on the fused decode step (models/kv_replay.py): this step's input ids [B, T] (recorded by
        # observe_queries), whether its queries reached the scores, and per slot the unscored tokens
        # {cache position: token id}, replayed by `replay(slot, positions, ids)` before an eviction
        self.step_ids: torch.Tensor | None = None
        self.scored, self.replaying = False, False
        self.pending: list[dict[int, int]] = [{} for _ in range(self.n_slots)]
        self.replay, self.replay_s = None, 0.0  # and the seconds spent replaying (H2O's fused-step cost)

    @classmethod
    def for_model(cls, model, n_slots: int, policy: Policy, total: int, prompt_len: int) -> PolicyCache:
        """A cache for sequences of up to `total` tokens whose prompts are `prompt_len` long."""
        a = model.args
        param = next(p for p in model.parameters() if p.is_floating_point())
        max_seq = min(total, policy.capacity(prompt_len))
        rotary = getattr(model, "rotary", None)
        inv = None if rotary is None else rotary.inv_freq.detach().float().cpu()
        return cls(
            a.num_hidden_layers, n_slots, max_seq, a.num_key_value_heads, a.head_dim, param.dtype, param.device,
            getattr(model, "kv_cache_dtype", None), policy=policy, prompt_len=prompt_len, total=total,
            inv_freq=inv,
        )  # fmt: skip

    @property
    def observing(self) -> bool:
        """Whether every step's queries must reach the scores (H2O that may evict): seen by the hooks on
        the module path, replayed after the fused step (models/kv_replay.py)."""
        return isinstance(self.policy, HeavyHitters) and self.may_evict

    @property
    def fused_layout(self) -> bool:
        """models/fused.py takes the C++ decode step only when True: that step never shows its queries,
        so H2O needs the replay (observe_queries installs it for Llama-family models)."""
        return not self.observing or self.replay is not None

    def begin(self, slots: torch.Tensor, n_new: int) -> Step:
        self._settle()
        for s in slots.tolist():
            length = int(self.lengths[s])
            if isinstance(self.policy, SnapKV):
                if length > self.kept and not self.compressed[s] and self.scores:
                    self._compress(s, length, self._snap_keep(s, length))
            elif length + n_new > self.max_seq and self.may_evict:
                if isinstance(self.policy, SinkWindow):
                    self._slide(s, length, n_new)
                else:
                    self._catch_up(s, length)
                    self._compress(s, length, self._h2o_keep(s, length, n_new))
        step = super().begin(slots, n_new)
        step.rope_positions = step.positions + self.offsets[slots].to(step.positions.device)[:, None]
        self.last_step, self.queries, self.step_ids, self.scored = step, {}, None, False
        return step

    def reset(self, slots: torch.Tensor | None = None) -> None:
        super().reset(slots)
        for s in range(self.n_slots) if slots is None else torch.as_tensor(slots).view(-1).tolist():
            self.pending[s].clear()

    def update(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor):
        k_all, v_all = super().update(layer, step, k, v)
        q = self.queries.pop(layer, None)
        if q is not None and self.scores:
            self.score(layer, step, q, k_all)
            self.scored = True
        return k_all, v_all

    # --- scoring -------------------------------------------------------------------------------
    def _settle(self) -> None:
        """The last step ran without showing its queries (the fused step): keep its tokens for replay."""
        step, ids = self.last_step, self.step_ids
        if self.observing and step is not None and not self.scored and ids is not None:
            for row, slot in enumerate(step.slots.tolist()):
                self.pending[slot].update(zip(step.positions[row].tolist(), ids[row].tolist()))
        self.step_ids = None

    def catch_up(self) -> None:
        """Score now the decode steps the fused step ran (an eviction does this for its slot first)."""
        self._settle()
        for s in range(self.n_slots):
            self._catch_up(s, int(self.lengths[s]))

    def _catch_up(self, slot: int, length: int) -> None:
        """Score the slot's unscored tokens (those now in the cache) before the scores are read."""
        items = sorted((p, t) for p, t in self.pending[slot].items() if p < length)
        self.pending[slot].clear()
        if items and self.replay is not None:
            t0 = time.perf_counter()
            self.replay(slot, [p for p, _ in items], [t for _, t in items])
            self.replay_s += time.perf_counter() - t0

    def score(self, layer: int, step: Step, q: torch.Tensor, k: torch.Tensor) -> None:
        """Add this step's attention probabilities per key to the scores. q [B, H, T, D], k [B, KV, S, D]."""
        b, h, t, d = q.shape
        kv, s = k.shape[1], k.shape[2]
        first = 0
        if isinstance(self.policy, SnapKV):
            if t == 1:
                return  # decode steps do not vote
            first = max(0, t - self.policy.observe)
        total = torch.zeros(b, kv, s, dtype=torch.float32)
        kk = k.float().repeat_interleave(h // kv, dim=1)  # [B, H, S, D]
        for lo in range(first, t, 256):  # query blocks: [B, H, 256, S] at a time, not [B, H, T, S]
            hi = min(t, lo + 256)
            att = q[:, :, lo:hi].float() @ kk.transpose(-1, -2) / math.sqrt(d)  # [B, H, t', S]
            if step.mask is not None:
                att = att.masked_fill(~step.mask[:, :, lo:hi].cpu(), float("-inf"))
            elif t > 1:  # causal prefill from 0
                pos = torch.arange(lo, hi)[:, None]
                att = att.masked_fill(torch.arange(s)[None, :] > pos + (s - t), float("-inf"))
            p = att.softmax(-1).sum(2)  # [B, H, S]
            total += p.view(b, kv, h // kv, s).sum(2)
        rows = step.slots.cpu()
        if isinstance(self.policy, SnapKV):
            self.scores[layer][rows, :, :s] = total
        else:
            self.scores[layer][rows, :, :s] += total

    def _h2o_keep(self, slot: int, length: int, n_new: int) -> list[torch.Tensor]:
        """Per layer, the kept positions [KV, n] (sorted): sinks, the heaviest hitters, the newest."""
        p = self.policy
        n = min(self.kept, self.max_seq - n_new)
        recent = min(p.recent if p.recent is not None else n // 2, n - min(p.sinks, n))
        sinks = min(p.sinks, n - recent)
        heavy = n - sinks - recent
        out = []
        for sc in self.scores:
            mid = sc[slot, :, sinks : length - recent]  # [KV, middle]
            top = mid.topk(heavy, dim=-1).indices + sinks if heavy > 0 else mid[:, :0].long()
            fixed = torch.cat([torch.arange(sinks), torch.arange(length - recent, length)])
            idx = torch.cat([fixed.expand(sc.shape[1], -1), top], dim=1)
            out.append(idx.sort(dim=1).values)
        return out

    def _snap_keep(self, slot: int, length: int) -> list[torch.Tensor]:
        p = self.policy
        obs = min(p.observe, length)
        n = max(self.kept, obs)
        sinks = min(p.sinks, length - obs)
        pick = max(0, n - obs - sinks)
        out = []
        for sc in self.scores:
            mid = sc[slot, :, sinks : length - obs]  # [KV, prefix]
            if p.pool > 1 and mid.shape[1]:
                mid = F.max_pool1d(mid[None], p.pool, stride=1, padding=p.pool // 2)[0][:, : mid.shape[1]]
            pick_n = min(pick, mid.shape[1])
            top = mid.topk(pick_n, dim=-1).indices + sinks
            fixed = torch.cat([torch.arange(sinks), torch.arange(length - obs, length)])
            out.append(torch.cat([fixed.expand(sc.shape[1], -1), top], dim=1).sort(dim=1).values)
        return out

    # --- moving keys ---------------------------------------------------------------------------
    def _compress(self, slot: int, length: int, keep: list[torch.Tensor]) -> None:
        """Gather the kept positions keep[layer] [KV, n] of `slot` to the front of its rows."""
        n = keep[0].shape[1]
        bufs = [self.k, self.v, self.k_scale, self.v_scale, self.scores]
        for i, idx in enumerate(keep):
            for buf in bufs:
                if not buf:
                    continue
                rows = buf[i][slot, :, :length]  # [KV, L(, D)]
                j = idx.to(rows.device)
                if rows.dim() == 3:
                    j = j[..., None].expand(-1, -1, rows.shape[-1])
                buf[i][slot, :, :n] = rows.gather(1, j)
        self.offsets[slot] += length - n
        self.lengths[slot] = n
        self.compressed[slot] = True

    def _slide(self, slot: int, length: int, n_new: int) -> None:
        """Keep the sinks and the newest tokens so n_new more fit; move them down and re-rotate."""
        sinks = min(self.policy.sinks, length)
        keep = min(self.kept, self.max_seq - n_new - sinks, length - sinks)
        if keep < 0:
            raise LeanformerError(f"a step of {n_new} tokens does not fit a window cache of {self.max_seq}")
        src, delta = length - keep, length - keep - sinks
        if delta == 0:
            return
        for i in range(len(self.k)):
            for buf in (self.v, self.v_scale):
                if buf:
                    buf[i][slot, :, sinks : sinks + keep] = buf[i][slot, :, src:length].clone()
            k = cast(self.k[i][slot, :, src:length], self.dtype)  # [KV, keep, D]; int8 / fp16 storage
            if self.quantized:
                k = k * self.k_scale[i][slot, :, src:length]
            k = self._rotate(k, -delta)
            if self.quantized:
                k, scale = quantize_kv(k)
                self.k_scale[i][slot, :, sinks : sinks + keep] = scale
            self.k[i][slot, :, sinks : sinks + keep] = k
        self.lengths[slot] = sinks + keep

    def _rotate(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys [..., D] rotated by `delta` positions (HF rotate_half layout); no-op without RoPE."""
        if self.inv_freq is None:
            return k.clone()
        ang = delta * self.inv_freq.double()  # in float64: the angle, not the keys, is what drifts
        cos = torch.cat([ang.cos(), ang.cos()]).to(k.dtype)
        sin = torch.cat([-ang.sin(), ang.sin()]).to(k.dtype)
        return apply_rotary(k.float(), cos.float(), sin.float()).to(k.dtype)


@contextlib.contextmanager
def observe_queries(model, cache):
    """While inside, every attention that runs over `cache` leaves its rotated queries [B, H, T, D] in
    cache.queries[layer] for the eviction scores. Nothing is hooked when the cache needs no scores."""
    if not isinstance(cache, PolicyCache) or not cache.scores:
        yield
        return
    rotary = getattr(model, "rotary", None)
    armed: dict[int, bool] = {}
    ropes: dict = {}  # the last step's (cos, sin)

    def arm(module, args):
        target = args[2] if len(args) > 2 else None  # the cache, or a replay's view of it
        armed[module.layer_idx] = target is cache or getattr(target, "base", None) is cache

    def grab(attn, out):
        if not armed.pop(attn.layer_idx, False):
            return
        step = cache.last_step
        b, t, _ = out.shape
        q = out[..., : attn.n_heads * attn.head_dim].reshape(b, t, attn.n_heads, attn.head_dim)
        if rotary is not None:
            if ropes.get("step") is not step:  # the step object itself: an id() may be reused
                ropes.update(step=step, rope=rotary(step.rope_positions, q.dtype))
            q = apply_rotary(q, *ropes["rope"])
        cache.queries[attn.layer_idx] = q.transpose(1, 2)

    def record(module, args):
        if not cache.replaying:
            cache.step_ids = args[0]  # [B, T] input ids of the step begun

    handles = []
    for m in model.modules():
        if isinstance(m, Attention):
            handles.append(m.register_forward_pre_hook(arm))
            handles.append(m.qkv_proj.register_forward_hook(lambda mod, i, o, a=m: grab(a, o)))
    backbone = getattr(model, "model", None)
    if cache.observing and hasattr(backbone, "embed_tokens") and hasattr(backbone, "layers"):
        handles.append(backbone.embed_tokens.register_forward_pre_hook(record))
        cache.replay = functools.partial(replay, model, cache)
    try:
        yield
    finally:
        cache.replay = None
        for h in handles:
            h.remove()
