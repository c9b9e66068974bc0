"""Unstructured and N:M weight pruning of BERT-family encoders (Magnitude / Wanda / SparseGPT).

The pruning itself is compress/prune.py, reached through `prune_` like any model: block by block on
calibration hidden states (Wanda, SparseGPT), zeros written into the block Linears (qkv, attn_out,
ffn_in, ffn_out). What encoders add is the calibration: sentences, not windows of one long text. An
encoder attends both ways, so a padded batch without its attention mask would let every token see the
padding; `encoder_calibration` groups the sentences by token count instead, so every calibration
batch is [n, T] with no padding and the forward needs no mask.

The pruned model stays a dense float encoder (same speed); a SparseStorage stage after it (optionally
after Int8WeightOnly) stores the zeros compactly on disk, and Int8Dynamic after it gives the int8 speed.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn

from leanformer.compress.config import PruneConfig, matches, parse_pattern
from leanformer.compress.recipe import prune_
from leanformer.encoders.tokens import tokenize
from leanformer.errors import LeanformerError

ENCODER_TARGETS = ["layers.*"]  # the Transformer blocks; the task head and a probe stay dense


def encoder_calibration(model, tok, texts: list[str], max_length: int | None = None) -> list[torch.Tensor]:
    """Sentences → calibration token ids for `prune_` / `quantize_`: one LongTensor [n, T] per token
    count T (with [CLS] / [SEP], as embed() tokenizes them), so no batch holds padding."""
    if isinstance(texts, str) or not texts:
        raise LeanformerError("calibration needs a non-empty list of texts (one sentence per item)")
    bad = next((t for t in texts if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise LeanformerError(f"calibration texts must be non-empty strings, got {bad!r}")
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for ids in tokenize(tok, list(texts), max_length or model.args.max_length):
        by_len[len(ids)].append(ids)
    return [torch.tensor(rows, dtype=torch.long) for _, rows in sorted(by_len.items())]


def encoder_config(config: PruneConfig) -> PruneConfig:
    """The config with the block Linears as targets when it kept the default ("*"), so the
    classification head and a linear probe are not pruned unless named."""
    if not isinstance(config, PruneConfig):
        raise LeanformerError(
            f"expected Magnitude, Wanda or SparseGPT, got {type(config).__name__}; "
            "for heads / FFN channels use prune_heads_ or prune_encoder_"
        )
    if list(config.targets) == ["*"]:
        return dataclasses.replace(config, targets=list(ENCODER_TARGETS))
    return config


def prune_weights_(
    model: nn.Module, tok, texts: list[str] | None, config: PruneConfig, *, progress: bool = True
) -> dict:
    """Prune an encoder in place with `config` (Magnitude needs no texts; Wanda / SparseGPT are
    calibrated on `texts`, sentences that are not the evaluation data). Every check runs before the
    calibration forward. Returns {Linear name: measured zero fraction}."""
    config = encoder_config(config)
    config.validate()
    calibration = None
    if config.needs_calibration:
        if not texts:
            raise LeanformerError(f"{type(config).__name__} needs calibration texts (one sentence per item)")
        calibration = encoder_calibration(model, tok, texts)
    prune_(model, config, calibration, progress=progress)
    return weight_sparsity(model, config)


def weight_sparsity(model: nn.Module, config: PruneConfig | None = None) -> dict[str, float]:
    """{block Linear name: share of its weight that is exactly zero} (the config's targets if given)."""
    targets = config.targets if config is not None else ENCODER_TARGETS
    return {
        n: float((m.weight == 0).float().mean())
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and matches(n, targets) and m.weight.numel()
    }


def check_pattern(weight: torch.Tensor, pattern: str) -> bool:
    """Whether every group of M consecutive inputs of each row of weight [N, K] holds at most N
    non-zeros (an N:M pattern); "unstructured" is always true."""
    nm = parse_pattern(pattern, "check_pattern")
    if nm is None:
        return True
    keep, m = nm
    nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)  # [N, K / M]
    return bool((nonzero <= keep).all())
