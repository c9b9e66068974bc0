"""Encoder building: HF / sentence-transformers folder → an eval-mode BERT-family model with pooling, normalisation, probe and (where it pays) oneDNN-packed Linears."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from leanformer.encoders.probe import load_probe
from leanformer.errors import LeanformerError
from leanformer.kernels.h16 import h16_linears_, native_f16
from leanformer.loading import bad_config, build, read_hf_folder, register_builder


def build_encoder(
    config: dict,
    state_dict: dict[str, torch.Tensor],
    folder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    fast: bool | None = None,
):
    """(HF config, HF state dict, the folder they came from) → an eval-mode encoder with weights assigned.

    The folder supplies sentence-transformers' pooling/normalize/max length and a saved probe, if any;
    leanformer.load and load_encoder both come here, so every way in gives the same model.
    fast: swap Linears for oneDNN-packed ones (same math, |Δ| < 1e-4): None = where it pays on this CPU
    (onednn_pays), True = always, False = never.
    dtype bfloat16 with packed Linears: the Linears' weights in bf16 and everything else in fp32 (the
    residual stream, LayerNorm, attention; models/bert.py _linear casts around each matmul). All-bf16
    put every embedding within cosine 0.99988 of fp32 on all-MiniLM-L6-v2; this, 0.99997, and faster at
    long inputs (the fused fp32 attention kernel instead of bf16 SDPA).
    dtype float16 with packed Linears on a CPU with AVX512-FP16 (kernels/h16.py): an fp32 model whose
    Linears multiply in fp16 (H16Linear; cosine 0.99999 to fp32 on all-MiniLM-L6-v2). Where bf16 buys
    nothing (Intel without AMX) this is the 16-bit path that pays: ~1.6x fp32's matmul rate.
    """
    from leanformer.models.bert import ModelArgs, encoder_extras, sanitize

    config = dict(config)
    lf = dict(config.get("leanformer") or {})
    lf["encoder"] = {**(encoder_extras(folder) if folder else {}), **(lf.get("encoder") or {})}
    config["leanformer"] = lf
    # our names first: loading.build leaves state dicts alone once config["leanformer"] is set
    ours = sanitize(state_dict, ModelArgs.from_hf_config(config))
    state_dict.clear()  # as loading.build does: no second reference that would keep the originals alive
    if fast is None:
        fast = onednn_pays()
    pack = fast and device == "cpu"
    h16 = pack and dtype == torch.float16 and native_f16()  # fp16 matmuls, fp32 elsewhere (docstring)
    mixed = pack and dtype == torch.bfloat16  # bf16 matmuls, fp32 elsewhere (docstring)
    model = build(config, ours, torch.float32 if mixed or h16 else dtype, device)
    if h16:
        h16_linears_(model)
    elif pack:
        _pack_linears_(model, torch.bfloat16 if mixed else None)
    if folder is not None:
        load_probe(model, folder)
    return model


def _pack_linears_(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Every plain float Linear → PackedLinear (its weights cast to `dtype` first, if given), skipping
    empty ones (a layer whose heads were all pruned has a [0, hidden] qkv: oneDNN has no primitive for
    it, and it is never multiplied anyway) and the probe: train_probe attaches a plain Linear, and a
    reloaded probe must give the very same scores."""
    from leanformer.kernels.packed import PackedLinear, can_pack

    for name, child in list(module.named_children()):
        if name == "probe":
            continue
        if type(child) is nn.Linear:
            if child.weight.numel() and can_pack(dtype or child.weight.dtype, child.weight.device):
                setattr(module, name, PackedLinear.from_linear(child.to(dtype) if dtype else child))
        else:
            _pack_linears_(child, dtype)


def onednn_pays() -> bool:
    """Whether oneDNN-packed fp32 matmuls beat torch's default (MKL) for encoder-sized batches here.

    Measured: on AVX-512 CPUs oneDNN runs ~2x MKL's fp32 GEMM (PERF-FACTS.md); on an AVX2-only EPYC
    (2 cores) MKL was ~7% faster at [512, 384] x [384, 1536]. Force either way with fast=True/False.
    """
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def load_encoder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, fast: bool | None = None):
    """An HF / sentence-transformers folder (or a leanformer save of one) → (Model, tokenizer).

    The same model as leanformer.load(folder); this one takes a torch dtype and the oneDNN switch.
    """

    folder = Path(folder).expanduser()
    if not (folder / "config.json").exists():
        raise LeanformerError(f"no config.json in {folder}: not an HF model folder")
    config, state_dict, tok = read_hf_folder(folder)
    return build_encoder(config, state_dict, folder, dtype, fast=fast), tok


def load_tokenizer(folder: str | os.PathLike):
    """transformers' AutoTokenizer on the folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _build_for_load(config, state_dict, folder, dtype, device, fast, source) -> nn.Module:
    """leanformer.load's way in: config errors as one line naming the file; fast=False never packs."""
    with bad_config(source):
        return build_encoder(config, state_dict, folder, dtype, device, None if fast else False)


register_builder("bert", _build_for_load)
