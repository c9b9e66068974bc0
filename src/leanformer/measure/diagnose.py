"""Which layers lose the accuracy? Per-layer error of a compressed model against its original.

Two measures, both on the same token windows:
- **local error**: for every module that differs from the original (a quantized, pruned or factorised
  Linear; the MLP / attention block of a structured pruning that changed its Linears' shapes), the
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
    block: bool = False  # an MLP / attention block (structured pruning), not one Linear


def ignore_pattern(row: LayerError) -> str:
    """What to put in a recipe's `ignore` to leave this layer uncompressed (a block: its Linears)."""
    return f"{row.name}.*" if row.block else row.name


def _params(m: nn.Module) -> int:
    return sum(t.numel() for t in [*m.parameters(), *m.buffers()] if not t.is_meta)


def _same_shape(a: nn.Module, b: nn.Module) -> bool:
    return (a.in_features, a.out_features) == (b.in_features, b.out_features)


def _zeros(m: nn.Module) -> float:
    w = m.weight.detach()
    return float((w == 0).float().mean())


def _unit(name: str) -> str:
    """The MLP / attention block holding Linear `name`: where a structured pruning (FFN channels,
    heads) changed shapes inside it, its input and output are unchanged, so it can be compared and
    swapped whole."""
    parts = name.split(".")
    while len(parts) > 1:
        parts.pop()
        parent = ".".join(parts)
        if parts[-1] in ("mlp", "self_attn", "attention", "attn", "ffn"):
            return parent
    return name


def _changed_modules(model: nn.Module, reference: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, str]]:
    """name → (compressed module, original module, kind) for every compressed unit: a Linear
    replaced by another module (quantized, LowRankLinear, SparseLinear), a Linear of the same shape
    whose weights changed (Magnitude / Wanda / SparseGPT zeros), or, where a structured pruning
    changed a Linear's shape (PruneFFN, heads), the MLP / attention block holding it."""
    ref_layers = getattr(getattr(reference, "model", None), "layers", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if ref_layers is not None and layers is not None and len(ref_layers) != len(layers):
        raise LeanformerError(
            f"the model has {len(layers)} decoder layers, the reference {len(ref_layers)} (PruneLayers): "
            "per-layer diagnosis matches layers by name; compare before removing layers"
        )
    ref_modules = dict(reference.named_modules())
    out = {}
    for name, mod in model.named_modules():
        ref = ref_modules.get(name)
        if ref is None or not name or not isinstance(ref, nn.Linear):
            continue
        if not hasattr(mod, "in_features") or not _same_shape(mod, ref):  # structured: its block
            unit = _unit(name)
            if unit != name and unit in ref_modules and unit not in out:
                m, r = model.get_submodule(unit), ref_modules[unit]
                kind = f"{type(m).__name__} ({100 * _params(m) / max(_params(r), 1):.0f}% params)"
                out[unit] = (m, r, kind)
            continue
        if not isinstance(mod, nn.Linear):  # a compressed Linear replaces a (possibly packed) float one
            out[name] = (mod, ref, type(mod).__name__)
        elif mod.weight.shape == ref.weight.shape and not torch.equal(mod.weight, ref.weight):
            out[name] = (mod, ref, f"{type(mod).__name__} ({_zeros(mod):.0%} zeros)")
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
        def fn(_mod: nn.Module, inputs: tuple, kwargs: dict, output) -> None:
            # the original unit on the compressed model's own input (an attention block also gets
            # its positions / mask arguments)
            expected = _first(original(*inputs, **kwargs))
            output = _first(output)
            sq_err[name] += float((output.float() - expected.float()).pow(2).sum())
            sq_ref[name] += float(expected.float().pow(2).sum())

        return fn

    handles = [
        mod.register_forward_hook(hook(n, ref), with_kwargs=True) for n, (mod, ref, _) in changed.items()
    ]
    try:
        for w in windows:
            model(w[None])
    finally:
        for h in handles:
            h.remove()
    rows = [
        LayerError(n, kind, (sq_err[n] / max(sq_ref[n], 1e-30)) ** 0.5, block=not isinstance(ref, nn.Linear))
        for n, (_, ref, kind) in changed.items()
    ]
    rows.sort(key=lambda r: -r.local_rel_error)

    ref_logp = [F.log_softmax(reference(w[None])[0, :-1].float(), -1) for w in windows]
    for row in tqdm(rows[:top], desc="attributing", unit="layer", disable=not progress):
        compressed, original, _ = changed[row.name]
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


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


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
