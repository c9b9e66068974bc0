"""BERT-family weights and sentence-transformers settings: HF names (BERT / RoBERTa / XLM-R / DistilBERT)
→ models/bert.py's names with q/k/v fused, and what a sentence-transformers folder adds to config.json.
models/bert.py re-exports `sanitize` and `encoder_extras` (the family-module contract)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from leanformer.errors import LeanformerError

_LEGACY_POOLING = {  # sentence-transformers < 5 wrote one flag per mode, in this concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",  # unsupported: listed so the error names it
    "pooling_mode_lasttoken": "lasttoken",
}


_LAYER = re.compile(r"^(?:encoder|transformer)\.layer\.(\d+)\.(.*)$")
_IN_LAYER = (  # HF suffix inside a layer → ours; BERT/RoBERTa names, then DistilBERT's
    ("attention.output.dense.", "attn_out."), ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "ffn_in."), ("output.dense.", "ffn_out."), ("output.LayerNorm.", "ffn_norm."),
    ("attention.out_lin.", "attn_out."), ("sa_layer_norm.", "attn_norm."), ("ffn.lin1.", "ffn_in."),
    ("ffn.lin2.", "ffn_out."), ("output_layer_norm.", "ffn_norm."),
)  # fmt: skip
_QKV = {"attention.self.query.": 0, "attention.self.key.": 1, "attention.self.value.": 2,
        "attention.q_lin.": 0, "attention.k_lin.": 1, "attention.v_lin.": 2}  # fmt: skip
_HEADS = {
    "bert": (("pooler.dense.", "head.dense."), ("classifier.", "head.out.")),
    "roberta": (("classifier.dense.", "head.dense."), ("classifier.out_proj.", "head.out.")),
    "distilbert": (("pre_classifier.", "head.dense."), ("classifier.", "head.out.")),
}
_DROP = ("cls.", "lm_head.", "vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "pooler.")


def sanitize(state_dict: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """HF names (any of the four families, with or without the `bert.`-style prefix) → ours."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}  # "layers.{i}.qkv.weight" → [q, k, v]
    for name, t in state_dict.items():
        name = re.sub(r"^(bert|roberta|distilbert)\.", "", name)
        name = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        if name.endswith(("position_ids", "token_type_ids")):  # buffers, not weights
            continue
        for hf, ours in _HEADS[args.family] if args.head else ():
            if name.startswith(hf):
                name = ours + name[len(hf) :]
                break
        if name.startswith(_DROP):  # MLM heads and the unused pooler
            continue
        m = _LAYER.match(name)
        if m:
            i, rest = m.groups()
            part = next((p for p in _QKV if rest.startswith(p)), None)
            if part is not None:
                qkv.setdefault(f"layers.{i}.qkv.{rest[len(part) :]}", [None] * 3)[_QKV[part]] = t
                continue
            rest = next((ours + rest[len(hf) :] for hf, ours in _IN_LAYER if rest.startswith(hf)), rest)
            name = f"layers.{i}.{rest}"
        out[name] = t
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            raise LeanformerError(f"checkpoint has only some of q/k/v for {name!r}")
        out[name] = torch.cat(parts)
    return out


def encoder_extras(folder: str | os.PathLike) -> dict:
    """What a sentence-transformers folder adds to config.json: pooling modes, Normalize, max_seq_length."""
    folder, extra = Path(folder), {}
    modules = folder / "modules.json"
    if modules.exists():
        mods = json.loads(modules.read_text())
        extra["normalize"] = any(m.get("type", "").endswith(".Normalize") for m in mods)
        for m in mods:
            if m.get("type", "").endswith(".Pooling") and (folder / m["path"] / "config.json").exists():
                pc = json.loads((folder / m["path"] / "config.json").read_text())
                modes = (
                    pc.get("pooling_mode") or [v for k, v in _LEGACY_POOLING.items() if pc.get(k)] or ["mean"]
                )
                extra["pooling"] = [modes] if isinstance(modes, str) else list(modes)
    st = folder / "sentence_bert_config.json"
    if st.exists() and json.loads(st.read_text()).get("max_seq_length"):
        extra["max_seq_length"] = int(json.loads(st.read_text())["max_seq_length"])
    return extra
