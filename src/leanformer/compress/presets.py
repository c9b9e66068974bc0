"""The named recipes `load_recipe` and the CLI accept by name (`int4-g32-dq8+head-int8`, ...): each an
ordered list of configs, applied by compress/recipe.py's `apply`."""

from __future__ import annotations

from leanformer.compress.config import (
    BF16WeightOnly,
    F16WeightOnly,
    LowRank,
    Magnitude,
    PruneFFN,
    PruneHeads,
    SparseGPT,
    Wanda,
)
from leanformer.compress.quant import (
    AWQ,
    GPTQ,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    KVCache,
    QuantConfig,
)
from leanformer.compress.sparse import SparseStorage

PRESETS: dict[str, list[QuantConfig]] = {
    "int8": [Int8WeightOnly()],
    "int4": [Int4WeightOnly(group_size=64)],
    "int4-g32": [Int4WeightOnly(group_size=32)],
    "int4-g32-dq8": [Int4WeightOnly(group_size=32, scale_bits=8)],
    # + the LM head (and a tied embedding: one int8 table for both) in int8
    "int4-g32-dq8+head-int8": [
        Int4WeightOnly(group_size=32, scale_bits=8),
        Int8WeightOnly(targets=["lm_head"], ignore=[]),
    ],
    "int8+head-int8": [Int8WeightOnly(ignore=[])],
    "int4-g128": [Int4WeightOnly(group_size=128)],
    # bf16 weights, fp32 math: half of fp32's bytes, lossless for a checkpoint shipped in bf16
    "bf16": [BF16WeightOnly()],
    "bf16+head-bf16": [BF16WeightOnly(ignore=[])],
    "f16": [F16WeightOnly()],  # the same in IEEE half: lossless for fp16 checkpoints
    "f16+head-f16": [F16WeightOnly(ignore=[])],
    "w8a8": [Int8Dynamic()],
    "gptq-int4": [GPTQ(bits=4, group_size=64)],
    "awq-int4": [AWQ(bits=4, group_size=64)],
    "gptq-int8": [GPTQ(bits=8)],
    "kv-int8": [KVCache(dtype="int8")],
    "kv-fp16": [KVCache(dtype="fp16")],
    "int8+kv-int8": [Int8WeightOnly(), KVCache(dtype="int8")],
    "magnitude-50": [Magnitude(sparsity=0.5)],
    "magnitude-2:4": [Magnitude(pattern="2:4")],
    "wanda-50": [Wanda(sparsity=0.5)],
    "wanda-2:4": [Wanda(pattern="2:4")],
    "wanda-4:8": [Wanda(pattern="4:8")],
    "sparsegpt-50": [SparseGPT(sparsity=0.5)],
    "sparsegpt-2:4": [SparseGPT(pattern="2:4")],
    "wanda-50+int8": [Wanda(sparsity=0.5), Int8WeightOnly()],
    # + the zeros stored as a bitmask (files ~half the size; memory stays dense: same speed)
    "wanda-50+sparse": [Wanda(sparsity=0.5), SparseStorage()],
    "sparsegpt-2:4+sparse": [SparseGPT(pattern="2:4"), SparseStorage()],
    "wanda-50+int8+sparse": [Wanda(sparsity=0.5), Int8WeightOnly(), SparseStorage()],
    # FFN channels: 1/3 of SmolLM2's FFN is 25% of its block parameters
    "ffn-25": [PruneFFN(sparsity=0.25)],
    "ffn-33": [PruneFFN(sparsity=1 / 3)],
    "ffn-33+int4-g32-dq8+head-int8": [
        PruneFFN(sparsity=1 / 3),
        Int4WeightOnly(group_size=32, scale_bits=8),
        Int8WeightOnly(targets=["lm_head"], ignore=[]),
    ],
    # attention heads, GQA-safe (SmolLM2: 9 query heads in 3 KV groups of 3): heads-33 keeps 2 query heads
    # per group (6 of 9; 6.25% of block parameters, +23% PPL); heads-kv-33 drops 1 of 3 KV groups with its
    # query heads (8.3%, KV cache 2/3, +70% PPL). docs/BENCHMARKS.md
    # whitened SVD (SVD-LLM style): svd-20 keeps 80% of every block Linear's parameters (for size; SmolLM2
    # +311% PPL before any healing, docs/BENCHMARKS.md issue #13: distill after it), lowrank-50 half of
    # each Linear, factorised only where its two thin matmuls time faster than the dense one
    "svd-20": [LowRank(ratio=0.8, keep="smaller")],
    "lowrank-50": [LowRank(ratio=0.5, keep="faster")],
    "heads-33": [PruneHeads(sparsity=1 / 3)],
    "heads-kv-33": [PruneHeads(kv_sparsity=1 / 3)],
    # heads + FFN channels: 25.0% of SmolLM2's block parameters (6.25% from heads, 18.75% from the FFN)
    "heads-33+ffn-25": [PruneHeads(sparsity=1 / 3), PruneFFN(sparsity=0.25)],
    "heads-33+ffn-25+int4-g32-dq8+head-int8": [
        PruneHeads(sparsity=1 / 3),
        PruneFFN(sparsity=0.25),
        Int4WeightOnly(group_size=32, scale_bits=8),
        Int8WeightOnly(targets=["lm_head"], ignore=[]),
    ],
}
