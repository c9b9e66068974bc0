"""Which layers lose the accuracy? Per-layer error of a compressed model against its original.

Two measures, both on the same token windows:
- **local error**: for every module that differs from the original (a quantized / pruned Linear), the
  relative error of its output against the original module's output *on the same input*
  (||y_q − y|| / ||y||), captured with forward hooks in one pass of the compressed model. Cheap, and
  says how well each layer approximates its own weights, but not how much the model output cares.
- **end-to-end attribution**: for the layers with the largest local error, the KL divergence of the
  original model with *only that one layer* swapped for its compressed version. This is what a user
  decides on: put the layers at the top into the recipe's `ignore` list and re-compress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from leanformer.errors import LeanformerError


@dataclass
class LayerError:
    name: str
    kind: str  # the compressed module's class, e.g. Int4Linear
    local_rel_error: float
    kld_alone: float | None = None  # KL(original ‖ original with only this layer compressed)


def _changed_modules(model: nn.Module, reference: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """name → (compressed module, original module) for leaf-level modules whose class differs."""
    ref_modules = dict(reference.named_modules())
    out = {}
    for name, mod in model.named_modules():
        ref = ref_modules.get(name)
        if ref is None or not name:
            continue
        # a compressed Linear replaces a (possibly packed) float Linear of the same name
        if isinstance(ref, nn.Linear) and not isinstance(mod, nn.Linear):
            out[name] = (mod, ref)
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.inference_mode()
def per_layer_errors(
    model: nn.Module, reference: nn.Module, windows: torch.Tensor, top: int = 10, progress: bool = True
) -> list[LayerError]:
    """windows [n, W] token ids → LayerError rows, sorted by end-to-end KLD (top ones) then local error.

    `model` and `reference` must share module names (a model compressed from `reference`)."""
    changed = _changed_modules(model, reference)
    if not changed:
        raise LeanformerError(
            "the model has no compressed layers relative to the reference: give the compressed model "
            "as MODEL and the original as --reference"
        )
    sq_err = dict.fromkeys(changed, 0.0)
    sq_ref = dict.fromkeys(changed, 0.0)

    def hook(name: str, original: nn.Module):
        def fn(_mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            expected = original(inputs[0])  # the original layer on the compressed model's own input
            sq_err[name] += float((output.float() - expected.float()).pow(2).sum())
            sq_ref[name] += float(expected.float().pow(2).sum())

        return fn

    handles = [mod.register_forward_hook(hook(n, ref)) for n, (mod, ref) in changed.items()]
    try:
        for w in windows:
            model(w[None])
    finally:
        for h in handles:
            h.remove()
    rows = [
        LayerError(n, type(mod).__name__, (sq_err[n] / max(sq_ref[n], 1e-30)) ** 0.5)
        for n, (mod, _) in changed.items()
    ]
    rows.sort(key=lambda r: -r.local_rel_error)

    ref_logp = [F.log_softmax(reference(w[None])[0, :-1].float(), -1) for w in windows]
    for row in tqdm(rows[:top], desc="attributing", unit="layer", disable=not progress):
        compressed, original = changed[row.name]
        _set(reference, row.name, compressed)
        try:
            kld = 0.0
            for w, rp in zip(windows, ref_logp):
                lp = F.log_softmax(reference(w[None])[0, :-1].float(), -1)
                kld += float((rp.exp() * (rp - lp)).sum())
            row.kld_alone = kld / (len(windows) * (windows.shape[1] - 1))
        finally:
            _set(reference, row.name, original)
    rows.sort(key=lambda r: (r.kld_alone is None, -(r.kld_alone or 0.0), -r.local_rel_error))
    return rows


def table_rows(rows: list[LayerError]) -> list[list[str]]:
    """Rows for a printed table: layer, module, local relative error, KLD with only this layer."""
    return [
        [
            r.name,
            r.kind,
            f"{r.local_rel_error:.4f}",
            "—" if r.kld_alone is None else f"{r.kld_alone:.5f}",
        ]
        for r in rows
    ]
