"""Streaming compression: a model bigger than the spare memory, compressed one decoder layer at a time.

`load(path, lazy=True)` builds the model on the meta device and attaches a `LazyWeights` (a tensor
source from formats/lazy.py that reads one tensor at a time). `apply` / `quantize_` on such a model
come here: the embedding, final norm and LM head are read first, then for each decoder layer its
float weights are read (a bf16 file stays 2 bytes until then), cast to the load dtype, sped up the way
`load` does, compressed, and only the compressed modules are kept; the float copy is freed before the
next layer is read. Calibrated methods (GPTQ, AWQ; Wanda, SparseGPT, LowRank, PruneFFN, PruneHeads:
see stream_prune.py) run their usual sequential walk (calibrate.iter_scopes) with `BlockHooks` that
read each layer just before it is calibrated, so the calibration activations pass from one layer to the
next and the float model is never whole. Magnitude zeros each Linear as it is read. A recipe with
several calibrated stages walks once per stage, as in memory (stage 2 calibrates on the outputs of the
layers stage 1 changed): between walks the layers wait in a temporary file (spill.SpilledLayers).
PruneLayers is such a walk that only scores (block influence); the kept layers are renumbered after it.

What stays off the peak: round-to-nearest reads and rounds one module at a time (q|k|v, gate|up); an LM
head rounded per row (int8, plain int4), tied table included, is read from the file in row slices
(stream_rows.py; calibration looks its rows up in the file meanwhile) and, with calibration, built
after the walk; the walk's hidden states live in a temporary file (spill.py); the heap is trimmed
after every module. Measured peaks: docs/BENCHMARKS.md (issue #12).

Same result as compressing in memory, bit for bit: each stage meets every Linear in the state the
in-memory order gives it (stages before the calibrated one are applied to a layer before its
statistics, stages after it once the hidden states have passed through it), and the calibration
forward is the same walk with the same arguments.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformer.compress.calibrate import BlockHooks, Calibration, rss_mb, trim_heap
from leanformer.compress.config import PruneConfig, PruneLayers
from leanformer.compress.quant import KVCache, QuantConfig, set_module
from leanformer.compress.spill import SpilledLayers, check_space
from leanformer.compress.stream_prune import (
    STRUCTURE,
    check_streamable,
    magnitude,
    plan_drop,
    plan_structure,
    run_calibrated,
    shrink_heads_plan,
    shrink_plan,
    trailing_storage,
)
from leanformer.compress.stream_rows import FileEmbedding, row_heads, rows_quantized
from leanformer.errors import LeanformerError

# a decoder layer's tensors, in the file or in the model: Llama family (model.layers.N.) or GPT-2
# (h.N. in HF files, transformer.h.N. in ours)
LAYER = re.compile(r"^(?:model\.layers|(?:transformer\.)?h)\.(\d+)\.")


@dataclass
class LazyWeights:
    """What a lazily loaded model still has to read (loading._load_lazy fills it)."""

    source: object  # formats.lazy.TensorSource: shapes + get(name) + release()
    sanitize: Callable[[dict], dict]  # file names -> ours for any subset (q|k|v and gate|up fused)
    dtype: torch.dtype
    device: str
    speed_up: Callable[[nn.Module], nn.Module] | None  # loading.speed_up_linears_ when fast on CPU
    keep: set[str]  # a save's quantized tensors (scales, codes): never cast to dtype

    def read_into(self, model: nn.Module, names: list[str]) -> None:
        """Read the file tensors `names`, convert them as `load` would, assign them into `model`."""
        state = self.sanitize({n: self.source.get(n) for n in names})
        for n in list(state):  # one at a time: the file-dtype tensor is freed before the next cast
            t = state.pop(n)
            cast = t.is_floating_point() and n not in self.keep
            state[n] = (t.to(self.dtype) if cast else t).to(self.device)
            del t
        model.load_state_dict(state, strict=False, assign=True)
        self.source.release()

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """A float tensor from the file as `read_into` converts it (to the load dtype and device)."""
        return t.to(self.dtype).to(self.device)

    def stream(self, model: nn.Module, stages: list, calibration: Calibration | None, progress: bool):
        """What `apply` calls on a lazily loaded model (recipe.py does not import this module)."""
        return stream_apply(model, stages, calibration, progress=progress)


def _layer_of(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family model or of GPT-2."""
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _embedding(model: nn.Module) -> str:
    return "transformer.wte" if hasattr(model, "transformer") else "model.embed_tokens"


def _module_groups(file_names: list[str]) -> list[list[str]]:
    """A layer's file tensors grouped by the module they load into: q/k/v (fused into qkv_proj) and
    gate/up (gate_up_proj) together, every other module on its own, in file order."""
    groups: dict[str, list[str]] = {}
    for n in file_names:
        module = n.rsplit(".", 1)[0]
        for parts, fused in (
            ((".q_proj", ".k_proj", ".v_proj"), ".qkv"),
            ((".gate_proj", ".up_proj"), ".gate_up"),
        ):
            for part in parts:
                if module.endswith(part):
                    module = module[: -len(part)] + fused
        groups.setdefault(module, []).append(n)
    return list(groups.values())


def _read(model: nn.Module, name: str) -> bool:
    """Whether the Linear `name` holds read (not meta) float weights, i.e. is ready to round."""
    w = getattr(model.get_submodule(name), "weight", None)
    return isinstance(w, torch.Tensor) and not w.is_meta


def plan_stages(model: nn.Module, stages: list[QuantConfig]) -> list[list[str]]:
    """Every stage's target Linears in the in-memory order (a structure-only run on a meta copy):
    also every check `apply` makes (targets match, group sizes divide) before any weight is read."""
    from leanformer.compress.recipe import _quantize, select_linears

    check_streamable(stages)
    dry = copy.deepcopy(model, memo={id(model.lazy): None})  # no copy of the tensor source
    names = []
    for c in stages[: trailing_storage(stages)]:  # SparseStorage packs after the walk: no plan
        c.validate()
        names.append([] if isinstance(c, (KVCache, PruneLayers)) else select_linears(dry, c))
        if isinstance(c, PruneLayers):  # which layers go is known after the scoring walk: the plan
            plan_drop(dry, c)  # drops the last ones (the later stages' names follow the new numbering)
        if isinstance(c, STRUCTURE):
            names[-1] = plan_structure(dry, c, names[-1], model.lazy)
        outside = [n for n in names[-1] if _layer_of(n) is None]
        if (c.needs_calibration or isinstance(c, STRUCTURE)) and outside:
            raise LeanformerError(
                f"{type(c).__name__} targets {outside[0]}, outside the decoder layers: streaming works "
                "layer by layer; add it to `ignore` (the presets do) or load the model whole (--in-memory)"
            )
        _quantize(dry, c, None, structure_only=True, progress=False)
    return names


def _rtn(model: nn.Module, cfg: QuantConfig, names: list[str]) -> None:
    """A non-calibrated stage on some of its Linears (a tied embedding follows a quantized head)."""
    from leanformer.compress.recipe import _share_quantized_tables, _tied_embeddings, quantize_linears

    if isinstance(cfg, KVCache):
        model.kv_cache_dtype = cfg.dtype
        return
    if isinstance(cfg, PruneConfig) and names:  # Magnitude (the calibrated ones are walked)
        magnitude(model, cfg, names)
    elif names:
        tied = _tied_embeddings(model, names)
        quantize_linears(model, cfg, names)
        _share_quantized_tables(model, tied)


def stream_apply(
    model: nn.Module,
    stages: list[QuantConfig],
    calibration: Calibration | None = None,
    *,
    progress: bool = True,
) -> nn.Module:
    """Read and compress a lazily loaded model layer by layer (see the module doc); returns `model`,
    now whole (compressed) and runnable. No stages: just read the weights (`materialize_`)."""
    lazy: LazyWeights = model.lazy
    names = plan_stages(model, stages)
    stages, storage = stages[: len(names)], stages[len(names) :]  # SparseStorage: after the walk
    cals = [k for k, c in enumerate(stages) if c.needs_calibration]  # one walk each, in order
    if cals and calibration is None:
        raise LeanformerError(
            f"{type(stages[cals[0]]).__name__} needs calibration token ids [n_samples, seq_len]"
        )
    layers, embedding = decoder_layers(model), _embedding(model)
    by_layer: list[list[str]] = [[] for _ in layers]
    rest = []
    for n in lazy.source.shapes:
        j = _layer_of(n)
        (rest if j is None else by_layer[j]).append(n)
    if len(cals) > 1 or any(isinstance(stages[k], PruneLayers) for k in cals):  # layers parked between walks
        size = torch.empty((), dtype=lazy.dtype).element_size()
        floats = sum(math.prod(lazy.source.shapes[n]) * size for names_j in by_layer for n in names_j)
        check_space(floats, "the decoder layers between calibration walks")

    # an LM head rounded per row (int8 per channel, int4 without coded scales) is read in row slices
    # from the file: the [vocab, hidden] float table (545 MB fp32 for Qwen2.5-0.5B) is never whole
    head = getattr(model, "lm_head", None)
    table = getattr(model.get_submodule(embedding), "weight", None)  # None: a saved QuantEmbedding
    tied = table is not None and getattr(head, "weight", None) is table
    del table
    in_file = [f"{embedding}.weight", f"{embedding.removeprefix('transformer.')}.weight"]  # GPT-2: wte
    table_file = next((n for n in in_file if n in lazy.source.shapes), None) if tied else None
    by_rows = row_heads(model, stages, names, lazy.source.shapes, table_file)  # name -> (stage, file tensor)
    rest = [n for n in rest if n not in {f for _, f in by_rows.values()}]

    def stage_on(k: int, j: int | None, rows: bool = True) -> None:
        """Stage k on layer j's Linears (None: those outside the layers; `rows`: with the head)."""
        todo = [n for n in names[k] if _layer_of(n) == j]
        for n in [n for n in todo if n in by_rows and rows]:
            rows_quantized(model, stages[k], n, by_rows[n][1], lazy, embedding if tied else None)
        _rtn(model, stages[k], [n for n in todo if n not in by_rows])

    def heads_by_rows(ks: range) -> None:
        for k in ks:
            for n in [n for n in names[k] if n in by_rows]:
                rows_quantized(model, stages[k], n, by_rows[n][1], lazy, embedding if tied else None)

    def read_layer(j: int, before: range) -> None:
        if not cals:  # round-to-nearest: one Linear (q|k|v, gate|up fused) read and rounded at a
            done: set[tuple[int, str]] = set()  # time, so a layer is never whole in float
            for group in _module_groups(by_layer[j]):
                lazy.read_into(model, group)
                for k in before:
                    todo = [
                        n for n in names[k] if _layer_of(n) == j and (k, n) not in done and _read(model, n)
                    ]
                    done.update((k, n) for n in todo)  # a pruned Linear stays float: zeroed once
                    _rtn(model, stages[k], todo)
                trim_heap()  # the float copy just rounded, before the next is read
            return
        lazy.read_into(model, by_layer[j])
        if lazy.speed_up is not None:  # as `load` leaves it: the calibration forward runs the same
            lazy.speed_up(layers[j])  # kernels (round-to-nearest reads W only)
        for k in before:
            stage_on(k, j)
        trim_heap()

    # the rest first (embedding, final norm, head): read as float; the calibration capture needs it
    lazy.read_into(model, rest)
    table_by_rows = tied and "lm_head" in by_rows
    if tied and not table_by_rows:  # assign=True gave the embedding a new Parameter: tie the head again
        model.lm_head.weight = model.get_submodule(embedding).weight
    del head  # no reference may outlive the float table once a quantized head replaces it
    before = range(cals[0] if cals else len(stages))
    if table_by_rows and by_rows["lm_head"][0] not in before:  # the capture looks rows up in the file
        set_module(model, embedding, FileEmbedding(lazy, by_rows["lm_head"][1], *model.lm_head.weight.shape))
    for k in before:
        stage_on(k, None)
    if not cals:
        bar = tqdm(range(len(layers)), desc="compress", unit="layer", disable=not progress)
        for j in bar:
            read_layer(j, before)
            bar.set_postfix(rss=f"{rss_mb():.0f} MB", refresh=False)
    else:
        _walks(model, stages, names, cals, calibration, progress, read_layer, stage_on, heads_by_rows)
    if lazy.speed_up is not None:
        lazy.speed_up(model)  # float Linears left outside the layers (a float LM head)
    model.lazy = None
    for c in storage:  # the zeros packed, from the pruned weights (capacities filled here)
        _quantize_whole(model, c)
    stages = stages + storage
    if isinstance(getattr(model, "config", None), dict):
        from leanformer.compress.recipe import Recipe

        recipe = model.config.setdefault("leanformer", {}).setdefault("recipe", Recipe().to_dict())
        recipe["stages"].extend(c.to_dict() for c in stages)
    return model


def _walks(model, stages, names, cals, calibration, progress, read_layer, stage_on, heads_by_rows) -> None:
    """One sequential walk per calibrated stage, as in memory (stage 2 calibrates on the outputs of
    layers stage 1 already changed). Walk 0 reads each layer from the file; between walks the layers
    wait in a temporary file (spill.SpilledLayers), so one layer at a time is in memory. Stages between
    two calibrated ones run on a layer as the next walk takes it back; those after the last, as the
    last walk leaves it. A PruneLayers walk only scores: the kept layers are renumbered, and the
    stages after it are applied in a last pass over the parked layers."""
    scores_last = isinstance(stages[cals[-1]], PruneLayers)
    spill = SpilledLayers() if len(cals) > 1 or scores_last else None
    bounds = [*cals, len(stages)]
    for w, cal in enumerate(cals):
        last = w == len(cals) - 1
        pre, nxt = range(cals[w - 1] + 1 if w else 0, cal), range(cal + 1, bounds[w + 1])
        keep = last and not scores_last  # the last walk keeps its layers (unless it only scores)
        if w:  # a head rounded by rows between two walks: before this walk's capture reads a tied table
            heads_by_rows(pre)

        def start_layer(j: int, w=w, pre=pre, nxt=nxt) -> None:
            if j == 0:  # the inputs are captured: the walk never reads the embedding or head again,
                for k in nxt:  # so their later stages run now and a float table is freed early;
                    stage_on(k, None, rows=False)  # one read by rows waits (off the peak)
            if w == 0:
                read_layer(j, pre)
                return
            spill.restore(j, decoder_layers(model)[j])
            for k in pre:
                stage_on(k, j)
            trim_heap()

        def finish_layer(j: int, nxt=nxt, keep=keep) -> None:
            if keep:
                for k in nxt:
                    stage_on(k, j)
            else:
                spill.put(j, decoder_layers(model)[j])
            trim_heap()

        hooks = BlockHooks(before=start_layer, after=finish_layer)
        drop = run_calibrated(model, stages[cal], names[cal], calibration, progress, hooks)
        if isinstance(stages[cal], PruneLayers):
            spill.renumber([i for i in range(len(drop) + len(decoder_layers(model))) if i not in drop])
        if last and scores_last:  # parked -> the stages after the last walk
            bar = tqdm(range(len(decoder_layers(model))), desc="compress", unit="layer", disable=not progress)
            for j in bar:
                spill.restore(j, decoder_layers(model)[j])
                for k in nxt:
                    stage_on(k, j)
                trim_heap()
                bar.set_postfix(rss=f"{rss_mb():.0f} MB", refresh=False)
        if last:
            heads_by_rows(nxt)
    if spill is not None:
        spill.close()


def _quantize_whole(model: nn.Module, cfg: QuantConfig) -> None:
    from leanformer.compress.recipe import _quantize

    _quantize(model, cfg, None, structure_only=False, progress=False)


def materialize_(model: nn.Module, progress: bool = True) -> nn.Module:
    """Read every weight of a lazily loaded model (no compression); a no-op for a loaded model."""
    if getattr(model, "lazy", None) is not None:
        stream_apply(model, [], progress=progress)
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors, a tied matrix counted once (works on the meta device too)."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def compressed_bytes(model: nn.Module, stages: list[QuantConfig]) -> int:
    """Size of the weights `stages` would leave (a structure-only run on a meta copy of a lazily
    loaded model): for the disk-space check before any work. Exact, except for AWQ: whether a
    Linear keeps an fp32 `input_scale` [in_features] (a scale it could not fold upstream) depends on
    the calibration, so every AWQ target is counted with one (an upper bound)."""
    from leanformer.compress.config import PruneFFN, PruneHeads
    from leanformer.compress.prune_heads import head_targets
    from leanformer.compress.quant import AWQ
    from leanformer.compress.recipe import _quantize, select_linears
    from leanformer.compress.sparse import SparseStorage
    from leanformer.compress.structured import ffn_targets

    dry = copy.deepcopy(model, memo={id(getattr(model, "lazy", None)): None})
    input_scales = 0
    for c in stages:
        if isinstance(c, SparseStorage) and not c.capacity:
            continue  # its capacities come from the pruned weights: the dense size is the bound
        if isinstance(c, PruneFFN):  # the smaller widths (a structure-only run leaves them whole)
            shrink_plan(dry, c, ffn_targets(dry, select_linears(dry, c)))
        if isinstance(c, PruneHeads):  # the fewer heads
            shrink_heads_plan(dry, c, head_targets(dry, select_linears(dry, c)))
        if isinstance(c, PruneLayers):  # the fewer layers
            plan_drop(dry, c)
        if isinstance(c, AWQ):
            input_scales += sum(4 * dry.get_submodule(n).in_features for n in select_linears(dry, c))
        _quantize(dry, c, None, structure_only=True, progress=False)
    return state_bytes(dry) + input_scales
