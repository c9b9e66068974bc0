"""Distillation losses: KL on temperature-softened logits, hidden-state matching, embedding cosine and
in-batch contrastive (encoders). Every loss is a scalar averaged over tokens or sentences."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.errors import LeanformerError


@dataclass
class LossWeights:
    """Weights of the loss terms (0 turns a term off) and the softmax temperature of the KL term.

    kl: KL(teacher ‖ student) on logits / temperature, times temperature² (Hinton et al.: gradients keep
    their scale); ce: the plain next-token loss on the data; hidden: MSE between mapped layers' outputs
    (only where hidden sizes match); cosine: 1 - cos(student embedding, teacher embedding); contrastive:
    in-batch InfoNCE, student sentence i must be nearest teacher sentence i (scale `scale`).
    """

    kl: float = 1.0
    ce: float = 0.0
    hidden: float = 0.0
    cosine: float = 1.0
    contrastive: float = 0.1
    temperature: float = 2.0
    scale: float = 20.0

    def validate(self) -> None:
        for name in ("kl", "ce", "hidden", "cosine", "contrastive"):
            w = getattr(self, name)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not (0 <= w < float("inf")):
                raise LeanformerError(f"loss weight {name} must be a finite number ≥ 0, got {w!r}")
        for name in ("temperature", "scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < float("inf")):
                raise LeanformerError(f"{name} must be a finite number > 0, got {v!r}")


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """student / teacher logits [..., V] → T² · mean over positions of KL(softmax(t/T) ‖ softmax(s/T))."""
    s = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)  # [N, V]
    t = F.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] at positions 0..T-2 score ids 1..T-1."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def hidden_mse(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mapping: list[int], mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over student layers j of MSE(student[j], teacher[mapping[j]]); hidden [B, T, H], mask [B, T]."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for j, i in enumerate(mapping):
        diff = (student[j].float() - teacher[i].float()).pow(2).mean(-1)  # [B, T]
        total = total + (diff[mask.bool()].mean() if mask is not None else diff.mean())
    return total / len(mapping)


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[B, D] × [B, D] → mean of 1 - cos."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def in_batch_contrastive(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    """InfoNCE over the batch: row i of cos(student, teacher) [B, B] · scale should peak at column i."""
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    logits = s @ t.T * scale  # [B, B]
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def layer_mapping(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer matched by each student layer: evenly spaced, last to last (0-based).
    3 of 6 → [1, 3, 5]: each student layer stands for the teacher layers up to its match."""
    return [round((j + 1) * n_teacher / n_student) - 1 for j in range(n_student)]


def blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated layers of a leanformer decoder (model.model.layers) or encoder (model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    layers = layers if layers is not None else getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LeanformerError(f"{type(model).__name__} has no layer stack leanformer knows (model.layers)")
    return layers


@contextlib.contextmanager
def capture_hidden(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect every layer's output hidden state [B, T, H] during the forwards inside the block."""
    out: list[torch.Tensor] = []
    if not enabled:
        yield out
        return

    def hook(_mod, _args, result):
        out.append(result[0] if isinstance(result, (tuple, list)) else result)

    handles = [layer.register_forward_hook(hook) for layer in blocks(model)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
