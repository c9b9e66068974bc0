"""Compression transforms: module swaps on nn.Linear driven by flat, serializable configs.

quantize_(model, Int4WeightOnly(group_size=64))
apply(model, Recipe([GPTQ(bits=4, group_size=64)]), calibration=token_ids)
prune_(model, Wanda(sparsity=0.5), calibration=token_ids); apply(model, "wanda-50+int8", calibration=ids)
"""

from leanformer.compress.config import (
    BF16WeightOnly,
    F16WeightOnly,
    LowRank,
    Magnitude,
    PruneConfig,
    PruneFFN,
    PruneHeads,
    PruneLayers,
    SparseGPT,
    Wanda,
)
from leanformer.compress.half import BF16Linear, F16Linear
from leanformer.compress.int5 import Int5Linear
from leanformer.compress.presets import PRESETS
from leanformer.compress.qbase import set_activations, set_prefill_activations
from leanformer.compress.quant import (
    AWQ,
    CONFIG_TYPES,
    GPTQ,
    Int4Linear,
    Int4WeightOnly,
    Int8Dynamic,
    Int8DynamicLinear,
    Int8Linear,
    Int8WeightOnly,
    KVCache,
    QuantConfig,
)
from leanformer.compress.recipe import (
    Recipe,
    apply,
    as_recipe,
    load_recipe,
    matches,
    prune_,
    quantize_,
    select_linears,
)

__all__ = [
    "BF16Linear",
    "BF16WeightOnly",
    "F16Linear",
    "F16WeightOnly",
    "set_activations",
    "set_prefill_activations",
    "AWQ",
    "CONFIG_TYPES",
    "PruneLayers",
    "GPTQ",
    "Int4Linear",
    "Int5Linear",
    "Int4WeightOnly",
    "Int8Dynamic",
    "Int8DynamicLinear",
    "Int8Linear",
    "Int8WeightOnly",
    "KVCache",
    "LowRank",
    "Magnitude",
    "PRESETS",
    "PruneConfig",
    "PruneFFN",
    "PruneHeads",
    "QuantConfig",
    "Recipe",
    "SparseGPT",
    "Wanda",
    "apply",
    "as_recipe",
    "load_recipe",
    "matches",
    "prune_",
    "quantize_",
    "select_linears",
]
