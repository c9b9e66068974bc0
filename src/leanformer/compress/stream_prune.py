"""Pruning and low-rank stages in streaming compression (compress/stream.py): their checks on the
structure-only plan, and the calibrated walk with the streaming hooks.

- Magnitude needs no calibration: it zeros each Linear as it is read, like round-to-nearest.
- Wanda / SparseGPT / LowRank / PruneFFN / PruneHeads are sequential per-block methods
  (calibrate.iter_scopes), so they run the same walk as GPTQ / AWQ, each block read just before its
  statistics are gathered.
- LowRank keep="faster" times each shape before any weight is read, on random Linears of the load
  dtype made as fast as `load` makes them (speed does not depend on the values): the kept-dense names
  join `ignore` before the plan, so a later stage targets the modules that will exist. The gate is a
  timing, so on a busy machine it may decide a borderline shape differently from an in-memory run;
  keep="smaller" is bit-identical to in memory.
- PruneFFN's smaller widths and PruneHeads' head counts are applied to the plan too, so a later int4
  stage's group-size check sees the real shapes before any work.
- SparseStorage packs the zeros once the walk is done (the streamed model is whole then, compressed):
  its capacities come from the pruned weights, so it must be the last stage.
- Several calibrated stages: one walk each (stream_walks.py); PruneLayers: a scoring walk first
  (stream_layers.py).
"""

from __future__ import annotations

import torch
from torch import nn

from leanformer.compress.calibrate import BlockHooks, Calibration
from leanformer.compress.config import LowRank, PruneConfig, PruneFFN, PruneHeads, PruneLayers
from leanformer.compress.quant import AWQ, GPTQ, QuantConfig
from leanformer.errors import LeanformerError

STRUCTURE = (PruneConfig, PruneFFN, LowRank, PruneHeads)


def check_streamable(stages: list[QuantConfig]) -> None:
    """One line before any work for a recipe streaming cannot run (which stage, and the way out)."""
    from leanformer.compress.sparse import SparseStorage

    for k, c in enumerate(stages):
        if isinstance(c, SparseStorage) and any(not isinstance(s, SparseStorage) for s in stages[k + 1 :]):
            raise LeanformerError(
                "streaming applies SparseStorage once every layer is pruned: make it the last stage, "
                "or load the model whole (--in-memory)"
            )


def trailing_storage(stages: list[QuantConfig]) -> int:
    """Index where the trailing SparseStorage stages start (len(stages) when there are none)."""
    from leanformer.compress.sparse import SparseStorage

    end = len(stages)
    while end and isinstance(stages[end - 1], SparseStorage):
        end -= 1
    return end


def plan_structure(dry: nn.Module, cfg: QuantConfig, names: list[str], lazy) -> list[str]:
    """Checks of a pruning / low-rank stage on the meta plan `dry` (as `apply` makes them in memory,
    before any weight is read); returns the stage's targets and leaves `dry` with its new shapes."""
    from leanformer.compress import lowrank, prune, prune_heads, structured

    if isinstance(cfg, PruneConfig):
        sparsities = prune.layer_sparsities(names, cfg)
        prune.check_prunable(dry, sparsities, cfg)
        return list(sparsities)
    if isinstance(cfg, PruneFFN):
        targets = structured.ffn_targets(dry, names)
        shrink_plan(dry, cfg, targets)
        return targets
    if isinstance(cfg, PruneHeads):
        targets = prune_heads.head_targets(dry, names)
        shrink_heads_plan(dry, cfg, targets)
        return targets
    if isinstance(cfg, LowRank) and cfg.keep == "faster":
        lowrank.speed_gate(_Probes(dry, lazy), cfg, lowrank.ranks(dry, names, cfg))
        return [n for n in names if n not in cfg.ignore]
    return names


def shrink_plan(dry: nn.Module, cfg: PruneFFN, targets: list[str]) -> None:
    """The meta plan's MLPs at the widths prune_ffn will leave (gate_up [2 keep, H], down [H, keep])."""
    from leanformer.compress.structured import kept_width, record_widths

    for n in targets:
        mlp = dry.get_submodule(n.rsplit(".", 1)[0])
        gu, dn = mlp.gate_up_proj, mlp.down_proj
        keep = kept_width(mlp.inter, cfg.sparsity, cfg.multiple)
        kw = {"device": "meta", "dtype": gu.weight.dtype}
        mlp.gate_up_proj = nn.Linear(gu.in_features, 2 * keep, bias=gu.bias is not None, **kw)
        mlp.down_proj = nn.Linear(keep, dn.out_features, bias=dn.bias is not None, **kw)
        mlp.inter = keep
    record_widths(dry)


def plan_drop(dry: nn.Module, cfg: PruneLayers) -> None:
    """The meta plan without cfg.n_layers layers. Which go is decided later by the scoring walk, so the
    plan drops the smallest ones: its size is an upper bound (exact when the layers have equal shapes,
    as a decoder's do unless an earlier stage pruned them unevenly)."""
    from leanformer.compress.structured import check_prunable_layers, drop_layers

    check_prunable_layers(dry, cfg)
    size = [
        sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in dry.model.layers
    ]
    smallest = sorted(range(len(size)), key=lambda i: (size[i], -i))[: cfg.n_layers]
    drop_layers(dry, sorted(smallest))


def shrink_heads_plan(dry: nn.Module, cfg: PruneHeads, targets: list[str]) -> None:
    """The meta plan's attention at the head counts prune_heads will leave (qkv [(H' + 2 KV') D, hidden],
    o_proj [hidden, H' D]); plan_counts makes the in-memory checks."""
    from leanformer.compress.prune_heads import plan_counts
    from leanformer.compress.structured import record_widths

    per_group, kv_keep = plan_counts(dry, cfg, targets)
    for n in targets:
        attn = dry.get_submodule(n.rsplit(".", 1)[0])
        qkv, o, d = attn.qkv_proj, attn.o_proj, attn.head_dim
        heads = per_group * kv_keep
        kw = {"device": "meta", "dtype": qkv.weight.dtype}
        attn.qkv_proj = nn.Linear(qkv.in_features, (heads + 2 * kv_keep) * d, bias=qkv.bias is not None, **kw)
        attn.o_proj = nn.Linear(heads * d, o.out_features, bias=o.bias is not None, **kw)
        attn.n_heads, attn.n_kv_heads = heads, kv_keep
    record_widths(dry)


class _Probes:
    """Stands in for the model in lowrank.speed_gate: name -> a random Linear of that name's shape in
    the load dtype, made as fast as `load` makes it (one per shape)."""

    def __init__(self, dry: nn.Module, lazy) -> None:
        self.dry, self.lazy, self.made = dry, lazy, {}

    @torch.no_grad()
    def get_submodule(self, name: str) -> nn.Module:
        m = self.dry.get_submodule(name)
        key = (m.out_features, m.in_features, m.bias is not None)
        if key not in self.made:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=self.lazy.dtype)
            wrap = nn.Sequential(lin.to(self.lazy.device))
            if self.lazy.speed_up is not None:
                wrap = self.lazy.speed_up(wrap)
            self.made[key] = wrap[0]
        return self.made[key]


def magnitude(model: nn.Module, cfg: PruneConfig, names: list[str]) -> None:
    """Magnitude pruning of some of the stage's Linears (no calibration: one Linear at a time)."""
    from leanformer.compress.prune import layer_sparsities, prune_linears

    prune_linears(model, cfg, layer_sparsities(names, cfg), None, progress=False)


def run_calibrated(
    model: nn.Module,
    cfg: QuantConfig,
    names: list[str],
    calibration: Calibration,
    progress: bool,
    hooks: BlockHooks,
) -> list[int]:
    """A calibrated stage's sequential walk, with `hooks` reading each block just before it; returns
    the layers PruneLayers dropped (none for the others)."""
    drop: list[int] = []
    was_training = model.training
    model.eval()
    if isinstance(cfg, GPTQ):
        from leanformer.compress.gptq import gptq_quantize

        gptq_quantize(model, cfg, names, calibration, progress, hooks)
    elif isinstance(cfg, AWQ):
        from leanformer.compress.awq import awq_quantize

        awq_quantize(model, cfg, names, calibration, progress, hooks)
    elif isinstance(cfg, PruneConfig):
        from leanformer.compress.prune import layer_sparsities, prune_linears

        prune_linears(model, cfg, layer_sparsities(names, cfg), calibration, progress, hooks)
    elif isinstance(cfg, LowRank):
        from leanformer.compress.lowrank import lowrank_, ranks

        lowrank_(model, cfg, ranks(model, names, cfg), calibration, progress, hooks, gated=True)
    elif isinstance(cfg, PruneFFN):
        from leanformer.compress.structured import prune_ffn

        prune_ffn(model, cfg, names, calibration, progress, hooks)
    elif isinstance(cfg, PruneHeads):
        from leanformer.compress.prune_heads import prune_heads

        prune_heads(model, cfg, names, calibration, progress, hooks)
    elif isinstance(cfg, PruneLayers):
        from leanformer.compress.structured import prune_layers

        drop = prune_layers(model, cfg, calibration, hooks, progress)
    else:
        raise LeanformerError(f"{type(cfg).__name__} cannot run layer by layer yet (--in-memory)")
    model.train(was_training)
    return drop
