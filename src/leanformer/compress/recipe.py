"""Applying configs to a model: module selection by name patterns, `quantize_`, and recipes (an ordered
list of configs, saved as JSON or YAML beside the weights so a compressed model reloads exactly).

Reload contract: `apply(model, recipe, structure_only=True)` swaps in empty quantized modules of the
right shapes without computing anything; `model.load_state_dict(saved)` then fills them.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from leanformer.compress.calibrate import Calibration
from leanformer.compress.config import (
    BF16WeightOnly,
    F16WeightOnly,
    LowRank,
    PruneConfig,
    PruneFFN,
    PruneHeads,
    PruneLayers,
    matches,
)
from leanformer.compress.half import BF16Linear, F16Linear, HalfLinear
from leanformer.compress.presets import PRESETS
from leanformer.compress.quant import (
    AWQ,
    GPTQ,
    Int4Linear,
    Int4WeightOnly,
    Int8Dynamic,
    Int8DynamicLinear,
    Int8Linear,
    Int8WeightOnly,
    KVCache,
    QuantConfig,
    set_module,
)
from leanformer.compress.sparse import SparseStorage
from leanformer.errors import LeanformerError

RECIPE_VERSION = 1
_HALF = {BF16WeightOnly: BF16Linear, F16WeightOnly: F16Linear}  # 16-bit float weight configs -> modules


def select_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Names of the plain nn.Linear modules the config targets and does not ignore, in model order."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and matches(n, cfg.targets) and not matches(n, cfg.ignore)
    ]
    if not names:
        raise LeanformerError(
            f"{type(cfg).__name__}: no nn.Linear matches targets {cfg.targets} minus ignore {cfg.ignore}"
        )
    return names


def _check_shapes(model: nn.Module, names: list[str], cfg: QuantConfig) -> None:
    group = getattr(cfg, "group_size", None)
    if getattr(cfg, "bits", 4) != 4 or group is None or getattr(cfg, "pad", False):
        return
    for n in names:
        k = model.get_submodule(n).in_features
        if k % group:
            fits = [g for g in (256, 128, 64, 32) if k % g == 0]
            hint = f"use group_size={fits[0]}" if fits else "no supported group size divides it"
            raise LeanformerError(
                f"{type(cfg).__name__}: group_size {group} does not divide in_features {k} of {n}; {hint}, set "
                f'pad=True (in a recipe file: "pad": true), or ignore it'
            )


def _empty_like(cfg: QuantConfig, lin: nn.Linear) -> nn.Module:
    """Module of the right shapes and no computed weights (structure-only reload)."""
    shape = (lin.in_features, lin.out_features)
    bias, dev, dt = lin.bias is not None, lin.weight.device, lin.weight.dtype
    if isinstance(cfg, Int8Dynamic):
        return Int8DynamicLinear(*shape, bias, dev, dt, cfg.min_tokens)
    if isinstance(cfg, (BF16WeightOnly, F16WeightOnly)):
        return _HALF[type(cfg)](*shape, bias, dev, dt)
    if isinstance(cfg, Int8WeightOnly) or getattr(cfg, "bits", 4) == 8:
        return Int8Linear(*shape, bias, dev, dt)
    return Int4Linear(*shape, cfg.group_size, bias, dev, dt, scale_bits=getattr(cfg, "scale_bits", None))


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration: Calibration | None = None,
    *,
    structure_only: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Swap the targeted nn.Linear modules of `model` (in place) for quantized ones; returns `model`.
    GPTQ and AWQ need `calibration` (token ids [n, T] or a list of them) unless `structure_only`.
    A model carrying an HF-style `config` dict gets the config appended to
    config["leanformer"]["recipe"], so `save` writes it and `load` can rebuild the structure.
    A model loaded with `load(..., lazy=True)` is compressed one decoder layer at a time (stream.py)."""
    if getattr(model, "lazy", None) is not None and not structure_only:
        return apply(model, [config], calibration, progress=progress)
    _quantize(model, config, calibration, structure_only, progress)
    if not structure_only and isinstance(getattr(model, "config", None), dict):
        recipe = model.config.setdefault("leanformer", {}).setdefault("recipe", Recipe().to_dict())
        recipe["stages"].append(config.to_dict())
    return model


def _quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Calibration | None,
    structure_only: bool,
    progress: bool,
) -> None:
    if not isinstance(config, QuantConfig):
        raise LeanformerError(
            f"quantize_ expects a config such as Int8WeightOnly(), got {type(config).__name__}"
        )
    config.validate()
    if isinstance(config, KVCache):  # a setting of the engine's cache, not a module swap
        model.kv_cache_dtype = config.dtype
        return
    if isinstance(config, (PruneConfig, PruneFFN, PruneHeads, PruneLayers)):
        _prune(model, config, calibration, structure_only, progress)
        return
    if isinstance(config, LowRank):
        _lowrank(model, config, calibration, structure_only, progress)
        return
    if isinstance(config, SparseStorage):  # packs pruned weights (compress/sparse.py)
        config.apply_to(model, structure_only)
        return
    names = select_linears(model, config)
    _check_shapes(model, names, config)
    tied = _tied_embeddings(model, names)
    if structure_only:
        for n in names:
            set_module(model, n, _empty_like(config, model.get_submodule(n)))
        _share_quantized_tables(model, tied)
        return
    if isinstance(config, (GPTQ, AWQ)):
        if calibration is None:
            raise LeanformerError(f"{type(config).__name__} needs calibration token ids [n_samples, seq_len]")
        was_training = model.training
        model.eval()
        if isinstance(config, GPTQ):
            from leanformer.compress.gptq import gptq_quantize

            gptq_quantize(model, config, names, calibration, progress)
        else:
            from leanformer.compress.awq import awq_quantize

            awq_quantize(model, config, names, calibration, progress)
        model.train(was_training)
        _share_quantized_tables(model, tied)
        return
    quantize_linears(model, config, names)
    _share_quantized_tables(model, tied)


@torch.no_grad()
def quantize_linears(model: nn.Module, config: QuantConfig, names: list[str]) -> None:
    """Round-to-nearest swap of the Linears `names` (each on its own: the order does not matter)."""
    for n in names:
        lin = model.get_submodule(n)
        if isinstance(config, Int8WeightOnly):
            new = Int8Linear.from_linear(lin)
        elif isinstance(config, Int4WeightOnly):
            new = Int4Linear.from_linear(lin, config.group_size, scale_bits=config.scale_bits)
        elif isinstance(config, Int8Dynamic):
            new = Int8DynamicLinear.from_linear(lin, config.min_tokens)
        elif isinstance(config, (BF16WeightOnly, F16WeightOnly)):
            try:
                new = _HALF[type(config)].from_linear(lin)
            except LeanformerError as e:
                raise LeanformerError(f"{type(config).__name__} on {n}: {e}") from None
        else:
            raise LeanformerError(f"quantize_ cannot apply {type(config).__name__}")
        set_module(model, n, new)


def _prune(
    model: nn.Module,
    config: PruneConfig | PruneFFN | PruneHeads | PruneLayers,
    calibration: Calibration | None,
    structure_only: bool,
    progress: bool,
) -> None:
    """Pruning stages: on reload (structure_only) nothing to do: the zeros are in the saved weights, and
    the smaller FFN widths / fewer layers in the config ("intermediate_sizes", "num_hidden_layers"),
    which built the model's shapes. Every check runs before the calibration forward."""
    if structure_only:
        return
    from leanformer.compress import prune, structured

    if isinstance(config, PruneConfig):
        sparsities = prune.layer_sparsities(select_linears(model, config), config)
        prune.check_prunable(model, sparsities, config)
    elif isinstance(config, PruneFFN):
        names = structured.ffn_targets(model, select_linears(model, config))
    elif isinstance(config, PruneHeads):
        from leanformer.compress import prune_heads

        names = prune_heads.head_targets(model, select_linears(model, config))
        prune_heads.plan_counts(model, config, names)
    else:
        structured.check_prunable_layers(model, config)
    if config.needs_calibration and calibration is None:
        raise LeanformerError(f"{type(config).__name__} needs calibration token ids [n_samples, seq_len]")
    was_training = model.training
    model.eval()
    if isinstance(config, PruneConfig):
        prune.prune_linears(model, config, sparsities, calibration, progress)
    elif isinstance(config, PruneFFN):
        structured.prune_ffn(model, config, names, calibration, progress)
    elif isinstance(config, PruneHeads):
        prune_heads.prune_heads(model, config, names, calibration, progress)
    else:
        structured.prune_layers(model, config, calibration)
    model.train(was_training)


def _lowrank(
    model: nn.Module, config: LowRank, calibration: Calibration | None, structure_only: bool, progress: bool
) -> None:
    """Low-rank factorisation; the ranks follow from the config and the shapes, so a reload rebuilds
    the same empty factor modules."""
    from leanformer.compress import lowrank

    names = select_linears(model, config)
    rank_of = lowrank.ranks(model, names, config)
    if structure_only:
        for n in names:
            set_module(model, n, lowrank.empty_lowrank(model.get_submodule(n), rank_of[n]))
        return
    if calibration is None:
        raise LeanformerError("LowRank needs calibration token ids [n_samples, seq_len]")
    was_training = model.training
    model.eval()
    lowrank.lowrank_(model, config, rank_of, calibration, progress)
    model.train(was_training)


def prune_(
    model: nn.Module,
    config: PruneConfig | PruneFFN | PruneHeads | PruneLayers,
    calibration: Calibration | None = None,
    *,
    progress: bool = True,
) -> nn.Module:
    """Prune `model` in place (Magnitude / Wanda / SparseGPT zeros, PruneFFN smaller MLPs, PruneLayers
    fewer layers); returns it. All but Magnitude need `calibration` token ids. Recorded in the recipe
    like quantize_."""
    if not isinstance(config, (PruneConfig, PruneFFN, PruneHeads, PruneLayers)):
        raise LeanformerError(
            f"prune_ expects Magnitude, Wanda, SparseGPT, PruneFFN, PruneHeads or PruneLayers, got {type(config).__name__}; "
            "use quantize_ for quantization and low-rank (LowRank)"
        )
    return quantize_(model, config, calibration, progress=progress)


def _tied_embeddings(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Embedding name → the targeted Linear sharing its weight (a tied LM head), before the swap."""
    by_weight = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {by_weight[id(w)]: n for n in names if id(w := model.get_submodule(n).weight) in by_weight}


def _share_quantized_tables(model: nn.Module, tied: dict[str, str]) -> None:
    """A tied embedding follows its quantized LM head: it becomes a QuantEmbedding reading the head's
    table (rows dequantized on lookup), so the matrix stays stored once, quantized, and the float
    table is freed. (Int8Dynamic heads keep the float embedding: their table is oneDNN-packed.)"""
    from leanformer.compress.layout import QuantEmbedding

    for emb_name, head_name in tied.items():
        head = model.get_submodule(head_name)
        if isinstance(head, (Int4Linear, Int8Linear, HalfLinear)):
            dtype = model.get_submodule(emb_name).weight.dtype
            set_module(model, emb_name, QuantEmbedding(head, tied=True, dtype=dtype))


@dataclass
class Recipe:
    """Ordered configs; earlier stages win (a later stage only sees Linears still unquantized)."""

    stages: list[QuantConfig] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"version": RECIPE_VERSION, "stages": [c.to_dict() for c in self.stages]}

    @classmethod
    def from_dict(cls, d: dict | list) -> Recipe:
        stages = d if isinstance(d, list) else d.get("stages") if isinstance(d, dict) else None
        if stages is None and isinstance(d, dict) and "type" in d:
            stages = [d]  # a single config
        if not isinstance(stages, list):
            raise LeanformerError("a recipe is {'stages': [config, ...]} or a list of configs")
        if isinstance(d, dict) and d.get("version", RECIPE_VERSION) > RECIPE_VERSION:
            raise LeanformerError(f"recipe version {d['version']} is newer than this leanformer supports")
        return cls([QuantConfig.from_dict(s) for s in stages])

    def save(self, path: str | Path) -> None:
        """JSON, or YAML for a .yaml / .yml path; written to a temp file, then renamed (never half-written)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise LeanformerError(f"recipe file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # json/yaml each raise their own types
            raise LeanformerError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data)


def as_recipe(recipe: Recipe | QuantConfig | list | dict | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, QuantConfig):
        return Recipe([recipe])
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe)
    if isinstance(recipe, list) and all(isinstance(c, QuantConfig) for c in recipe):
        return Recipe(list(recipe))
    return Recipe.from_dict(recipe)


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe file (.json / .yaml) or a preset name (int8, int4, w8a8, gptq-int4, awq-int4, wanda-50,
    ...). Presets whose stages say `needs_calibration` (GPTQ, AWQ, Wanda, SparseGPT, PruneFFN, PruneHeads) need
    calibration when applied."""
    if str(path_or_name) in PRESETS:
        return Recipe([copy.deepcopy(c) for c in PRESETS[str(path_or_name)]])
    if not Path(path_or_name).is_file():
        raise LeanformerError(
            f"no recipe file or preset named {str(path_or_name)!r}; presets: {', '.join(PRESETS)}"
        )
    return Recipe.load(path_or_name)


def apply(
    model: nn.Module,
    recipe: Recipe | QuantConfig | list | dict | str | Path,
    calibration: Calibration | None = None,
    *,
    structure_only: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Apply each stage of the recipe in order (in place); returns `model`. A model loaded with
    `load(..., lazy=True)` is read and compressed one decoder layer at a time (compress/stream.py),
    with the same result as compressing it whole."""
    if getattr(model, "lazy", None) is not None and not structure_only:  # stream.LazyWeights
        return model.lazy.stream(model, as_recipe(recipe).stages, calibration, progress)
    for cfg in as_recipe(recipe).stages:
        quantize_(model, cfg, calibration, structure_only=structure_only, progress=progress)
    return model
