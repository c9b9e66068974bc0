"""A student from a teacher: a copy with fewer layers (`layers=0,2,4`), a pruning recipe / preset
(`ffn-25`, `drop=6`, a recipe file), or a model folder; and the checks that it can learn from the teacher."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from leanformer.compress.config import PruneLayers
from leanformer.compress.presets import PRESETS
from leanformer.compress.recipe import apply, load_recipe
from leanformer.compress.structured import record_heads, record_widths
from leanformer.errors import LeanformerError
from leanformer.train.losses import blocks, layer_mapping

SPEC_HELP = (
    "layers=I,J,... (keep these teacher layers, 0-based), drop=N (remove the N least influential decoder "
    "layers), a pruning preset (e.g. ffn-25) or recipe file, or a model folder"
)


def is_encoder(model: nn.Module) -> bool:
    return callable(getattr(model, "embed", None)) and getattr(model, "lm_head", None) is None


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'layers=0,2,4' → [0, 2, 4]: distinct, in range, increasing, fewer than all."""
    body = spec.split("=", 1)[1]
    try:
        idx = [int(x) for x in body.split(",") if x.strip()]
    except ValueError:
        raise LeanformerError(
            f"student spec {spec!r}: layers=I,J,... takes integers, e.g. layers=0,2,4"
        ) from None
    if not idx:
        raise LeanformerError(f"student spec {spec!r} names no layers, e.g. layers=0,2,4")
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise LeanformerError(
            f"student spec {spec!r}: layer {bad[0]} out of range; the teacher has layers 0..{n_layers - 1}"
        )
    if sorted(set(idx)) != idx:
        raise LeanformerError(f"student spec {spec!r}: list each layer once, in increasing order")
    return idx


def keep_layers_(model: nn.Module, idx: list[int]) -> nn.Module:
    """Keep only layers `idx` of a leanformer decoder or encoder, in place; the config records the new
    count (and per-layer FFN widths / pruned heads), so `save` → `load` rebuilds the same shapes."""
    layers = blocks(model)
    kept = nn.ModuleList(layers[i] for i in idx)
    if is_encoder(model):
        model.layers = kept
        pruned = {j: model.args.pruned_heads[i] for j, i in enumerate(idx) if model.args.pruned_heads.get(i)}
        model.args.pruned_heads = pruned
        if isinstance(model.config, dict):
            model.config["pruned_heads"] = {str(j): h for j, h in pruned.items()}
    else:
        for j, layer in enumerate(kept):  # KV cache slots are indexed by position in the stack
            layer.self_attn.layer_idx = j
        model.model.layers = kept
        if getattr(model.args, "intermediate_sizes", None):
            record_widths(model)
        if getattr(model.args, "num_attention_heads_per_layer", None):
            record_heads(model)  # the head-pruned layers that remain, in their new order
    model.args.num_hidden_layers = len(idx)
    if isinstance(getattr(model, "config", None), dict):
        model.config["num_hidden_layers"] = len(idx)
    return model


def make_student(
    teacher: nn.Module, spec: str, calibration: torch.Tensor | None = None, progress: bool = True
) -> tuple[nn.Module, list[int]]:
    """A trainable copy of `teacher` shaped by `spec` → (student, teacher layer matched by each student
    layer). Not for folders: load those with `load` and pass the model to `distill`."""
    if not isinstance(spec, str) or not spec.strip():
        raise LeanformerError(f"student spec must be {SPEC_HELP}")
    spec = spec.strip()
    n = len(blocks(teacher))
    if spec.startswith("layers="):
        idx = parse_layers(spec, n)
        if len(idx) == n:
            raise LeanformerError(f"student spec {spec!r} keeps all {n} layers: a student must be smaller")
        student = keep_layers_(copy.deepcopy(teacher), idx)
        return student, idx
    if is_encoder(teacher):
        raise LeanformerError(f"student spec {spec!r}: for an encoder use layers=I,J,... (e.g. layers=0,2,4)")
    if spec.startswith("drop="):
        try:
            recipe = [PruneLayers(n_layers=int(spec.split("=", 1)[1]))]
        except ValueError:
            raise LeanformerError(f"student spec {spec!r}: drop=N takes an integer, e.g. drop=6") from None
    elif spec in PRESETS or Path(spec).is_file():
        recipe = load_recipe(spec)
    else:
        raise LeanformerError(f"unknown student spec {spec!r}; give {SPEC_HELP}")
    student = copy.deepcopy(teacher)
    before = list(blocks(student))
    apply(student, recipe, calibration, progress=progress)
    after = list(blocks(student))
    # a layer-dropped student's layers match the teacher layers they were copied from
    mapping = [next(i for i, b in enumerate(before) if b is a) for a in after]
    return student, mapping


def plain_linears_(model: nn.Module) -> nn.Module:
    """Replace leanformer's fast Linears (PackedLinear / FastLinear / H16Linear: a packed copy of the weight made at
    load time) with nn.Linears sharing the same Parameters, for good: training changes the weights, and
    a packed copy would go stale. `save` → `load` brings the fast kernels back."""
    from leanformer.kernels.h16 import H16Linear
    from leanformer.kernels.modules import FastLinear
    from leanformer.kernels.packed import PackedLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (PackedLinear, FastLinear, H16Linear)):
                plain = nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, device="meta"
                )
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    return model


def default_mapping(student: nn.Module, teacher: nn.Module) -> list[int]:
    return layer_mapping(len(blocks(student)), len(blocks(teacher)))


def check_pair(teacher: nn.Module, student: nn.Module, teacher_tok=None, student_tok=None) -> None:
    """Same kind of model and the same vocabulary, or a one-line error before any training."""
    if is_encoder(teacher) != is_encoder(student):
        kinds = ["an encoder" if is_encoder(m) else "a decoder LM" for m in (teacher, student)]
        raise LeanformerError(
            f"the teacher is {kinds[0]} but the student is {kinds[1]}: both must be the same kind"
        )
    tv, sv = teacher.args.vocab_size, student.args.vocab_size
    if tv != sv:
        raise LeanformerError(
            f"the student's vocabulary ({sv} tokens) differs from the teacher's ({tv}): distillation "
            "compares them token by token; use a student with the teacher's tokenizer"
        )
    if teacher_tok is not None and student_tok is not None:
        tvocab, svocab = _vocab(teacher_tok), _vocab(student_tok)
        if tvocab is not None and svocab is not None and tvocab != svocab:
            raise LeanformerError(
                "the student's tokenizer differs from the teacher's (same size, other tokens): "
                "use a student with the teacher's tokenizer"
            )


def _vocab(tok) -> dict | None:
    get = getattr(tok, "get_vocab", None)
    return get() if callable(get) else None
