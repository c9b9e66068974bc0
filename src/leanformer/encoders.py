"""Encoder tasks on a BERT-family model (models/bert.py) or its ONNX Runtime runner (export.py):
embed, classify, train a linear probe, STS-B / SST-2 / reference-cosine evaluation, attention-head pruning.

Speed comes from batching by token length: texts are tokenized once, sorted longest-first, cut into
batches padded only to their own longest member, and the results put back in input order.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import LeanformerError

PROBE_WEIGHTS, PROBE_CONFIG = "probe.safetensors", "probe.json"

# ---- loading ----


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
    """
    from .loading import build
    from .models.bert import ModelArgs, encoder_extras, sanitize

    config = dict(config)
    lf = dict(config.get("leanformer") or {})
    lf["encoder"] = {**(encoder_extras(folder) if folder else {}), **(lf.get("encoder") or {})}
    config["leanformer"] = lf
    # our names first: loading.build leaves state dicts alone once config["leanformer"] is set
    ours = sanitize(state_dict, ModelArgs.from_hf_config(config))
    state_dict.clear()  # as loading.build does: no second reference that would keep the originals alive
    model = build(config, ours, dtype, device)
    if fast is None:
        fast = onednn_pays()
    if fast and device == "cpu":
        _pack_linears_(model)
    if folder is not None:
        load_probe(model, folder)
    return model


def _pack_linears_(module: nn.Module) -> None:
    """Every plain float Linear → PackedLinear, skipping empty ones (a layer whose heads were all pruned
    has a [0, hidden] qkv: oneDNN has no primitive for it, and it is never multiplied anyway) and the
    probe: train_probe attaches a plain Linear, and a reloaded probe must give the very same scores."""
    from .models.layers import PackedLinear, can_pack

    for name, child in list(module.named_children()):
        if name == "probe":
            continue
        if type(child) is nn.Linear:
            if child.weight.numel() and can_pack(child.weight.dtype, child.weight.device):
                setattr(module, name, PackedLinear.from_linear(child))
        else:
            _pack_linears_(child)


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
    from .loading import read_hf_folder

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


def _tokenize(tok, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length with one warning naming how many were cut."""
    enc = tok(
        texts,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = enc["input_ids"]
    if getattr(enc, "encodings", None):  # fast tokenizers record what truncation removed
        cut = sum(1 for e in enc.encodings if e.overflowing)
    else:
        cut = sum(1 for t in texts if len(tok(t)["input_ids"]) > max_length)
    if cut:
        warnings.warn(
            f"{cut} of {len(texts)} texts were truncated to the model's maximum of {max_length} tokens",
            stacklevel=3,
        )
    return ids


def length_sorted_batches(model, tok, texts: list[str], batch_size: int):
    """Yield (positions in `texts`, input_ids [B, T], attention_mask [B, T]), longest batch first."""
    if isinstance(texts, str):
        texts = [texts]
    if batch_size < 1:
        raise LeanformerError(f"batch size must be ≥ 1, got {batch_size}")
    if not texts:
        return
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise LeanformerError(f"texts must be strings, got a {type(bad).__name__}")
    ids = _tokenize(tok, list(texts), model.args.max_length)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # by tokens, not characters
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.args.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        t = len(ids[idx[0]])
        batch = torch.full((len(idx), t), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        yield idx, batch, mask


def embed(
    model, tok, texts: list[str], batch_size: int = 32, normalize: bool | None = None, numpy: bool = True
):
    """Texts → sentence embeddings [N, D] (np.ndarray, or torch.Tensor with numpy=False), input order.

    normalize: None follows the model (sentence-transformers' Normalize module); True/False forces it.
    `model` is a models.bert.Model or an export.OrtEncoder (ONNX Runtime); both expose .embed and .args.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    unique = list(dict.fromkeys(texts))  # a repeated text is embedded once (exact: same ids, same math)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for idx, ids, mask in length_sorted_batches(model, tok, unique, batch_size):
            e = model.embed(ids, mask, normalize=normalize).float()  # [B, D]
            if out is None:
                out = torch.empty((len(unique), e.shape[1]))
            out[idx] = e
    if out is None:
        dim = model.args.hidden_size * len(model.args.pooling)
        return np.empty((0, dim), np.float32) if numpy else torch.empty((0, dim))
    if len(unique) < len(texts):
        row = {t: i for i, t in enumerate(unique)}
        out = out[torch.tensor([row[t] for t in texts])]
    return out.numpy() if numpy else out


# ---- classification: a *ForSequenceClassification head, or a linear probe on the embeddings ----


def classify(model, tok, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Texts → [{"label": name, "score": probability}] from the model's head or its trained probe."""
    labels = _label_names(model)
    out: list[dict] = [{}] * len(texts)
    with torch.inference_mode():
        for idx, ids, mask in length_sorted_batches(model, tok, texts, batch_size):
            probs = model.logits(ids, mask).float().softmax(-1)  # [B, labels]
            for i, p in zip(idx, probs):
                k = int(p.argmax())
                out[i] = {"label": labels[k], "score": float(p[k])}
    return out


def _label_names(model) -> list[str]:
    a = model.args
    if a.head:
        return [a.id2label.get(i, f"LABEL_{i}") for i in range(a.num_labels)]
    if a.probe_labels:
        return list(a.probe_labels)
    raise LeanformerError("model has no classification head and no probe: run `leanformer train-probe` first")


def train_probe(
    model,
    tok,
    texts: list[str],
    labels: list[str],
    epochs: int = 100,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    save_to: str | os.PathLike | None = None,
) -> dict:
    """Fit a logistic-regression probe on frozen embeddings (full-batch L-BFGS) and attach it to `model`.

    After this, classify(model, ...) works on an embedding model; save_to writes probe.safetensors and
    probe.json into that folder, which the loader reads back. Returns {"labels", "train_accuracy"}.
    weight_decay: L2 penalty on the standardized-feature weights; 0.05 was best-or-near on SST-2 dev for
    all-MiniLM-L6-v2 with 2,000 (0.78) and 8,000 (0.80) training sentences.
    """
    if len(texts) != len(labels) or not texts:
        raise LeanformerError(f"need as many labels as texts (got {len(texts)} texts, {len(labels)} labels)")
    names = sorted(set(labels), key=lambda s: (len(s), s))  # "0" < "1" < "10"; stable label order
    if len(names) < 2:
        raise LeanformerError(f"a probe needs at least two classes, got {names}")
    x = embed(model, tok, texts, batch_size, numpy=False).clone()  # [N, D]; clone: out of inference mode
    y = torch.tensor([names.index(s) for s in labels])
    # Standardized features make L-BFGS well conditioned (embedding coordinates are ~0.05 in scale);
    # the scaling is folded back into the weights, so the probe reads raw embeddings.
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    probe = nn.Linear(x.shape[1], len(names))
    nn.init.zeros_(probe.weight), nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(
        probe.parameters(), max_iter=epochs, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(z), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float((probe(z).argmax(-1) == y).float().mean())
        weight = probe.weight / std  # [labels, D]
        bias = probe.bias - weight @ mean
    attach_probe(model, weight, bias, names)
    if save_to is not None:
        save_probe(model, save_to)
    return {"labels": names, "train_accuracy": acc}


def attach_probe(model, weight: torch.Tensor, bias: torch.Tensor, labels: list[str]) -> None:
    """Make the probe part of the model: a `probe` Linear on the pooled embedding, recorded in the config."""
    if model.args.head:
        raise LeanformerError("model already has a classification head; a probe is for embedding models")
    dim = model.args.hidden_size * len(model.args.pooling)
    if tuple(weight.shape) != (len(labels), dim):
        raise LeanformerError(
            f"probe weight {tuple(weight.shape)} does not fit {len(labels)} labels × {dim} dims"
        )
    probe = nn.Linear(dim, len(labels)).to(model.embeddings.word_embeddings.weight.dtype)
    probe.weight.data.copy_(weight), probe.bias.data.copy_(bias)
    model.probe, model.args.probe_labels = probe.eval(), list(labels)
    model.config.setdefault("leanformer", {}).setdefault("encoder", {})["probe_labels"] = list(labels)


def save_probe(model, folder: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    if model.probe is None:
        raise LeanformerError("model has no probe to save")
    if not os.access(folder, os.W_OK):
        raise LeanformerError(f"cannot write the probe into {folder}: choose another output folder")
    w = {
        "weight": model.probe.weight.detach().float().contiguous(),
        "bias": model.probe.bias.detach().float(),
    }
    save_file(w, folder / PROBE_WEIGHTS)
    meta = {
        "labels": model.args.probe_labels,
        "normalize": model.args.normalize,
        "pooling": model.args.pooling,
    }
    (folder / PROBE_CONFIG).write_text(json.dumps(meta, indent=2))
    return folder / PROBE_WEIGHTS


def load_probe(model, folder: str | os.PathLike) -> bool:
    """Attach folder/probe.safetensors (+ probe.json) to a just-built embedding model, if present."""
    folder = Path(folder)
    if model.args.head or not (folder / PROBE_WEIGHTS).exists() or not (folder / PROBE_CONFIG).exists():
        return False
    from safetensors.torch import load_file

    w = load_file(folder / PROBE_WEIGHTS)
    attach_probe(model, w["weight"], w["bias"], json.loads((folder / PROBE_CONFIG).read_text())["labels"])
    return True


# ---- evaluation ----


def _shared_data() -> Path | None:
    """../shared/data from the working directory or from the repository, or $LEANFORMER_DATA."""
    candidates = [
        os.environ.get("LEANFORMER_DATA", ""),
        "../shared/data",
        Path(__file__).parents[3] / "../shared/data",
    ]
    return next((Path(c) for c in candidates if c and Path(c, "glue").is_dir()), None)


def glue_path(task: str, split: str = "dev") -> Path:
    root = _shared_data()
    path = root / "glue" / task / f"{split}.tsv" if root else None
    if path is None or not path.exists():
        raise LeanformerError(f"GLUE {task} {split}.tsv not found: pass its path or set LEANFORMER_DATA")
    return path


def read_tsv(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise LeanformerError(f"data file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[:limit] if limit else rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (as scipy.stats.spearmanr)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def eval_stsb(model, tok, path=None, batch_size: int = 32) -> dict:
    """STS-B: Spearman between cosine of the two sentences' embeddings and the gold score."""
    rows = read_tsv(path or glue_path("stsb"))
    s1, s2 = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    e = embed(model, tok, s1 + s2, batch_size, normalize=True)  # [2N, D]
    cos = (e[: len(rows)] * e[len(rows) :]).sum(-1)
    return {
        "stsb_spearman": spearman(cos, np.array([float(r["score"]) for r in rows])),
        "stsb_pairs": len(rows),
    }


def eval_sst2(model, tok, path=None, batch_size: int = 32, limit: int | None = None) -> dict:
    """SST-2 dev accuracy of the model's head or probe (gold labels matched by name, else by index)."""
    rows = read_tsv(path or glue_path("sst2"), limit)
    preds = classify(model, tok, [r["sentence"] for r in rows], batch_size)
    names = _label_names(model)
    hits = [
        p["label"] == g if g in names else names.index(p["label"]) == int(g)
        for p, g in zip(preds, (r["label"] for r in rows))
    ]
    return {"sst2_accuracy": float(np.mean(hits)), "sst2_sentences": len(rows)}


def cosine_to_reference(emb: np.ndarray, ref: np.ndarray) -> dict:
    """Row-wise cosine between two embedding matrices [N, D] of the same texts: mean and minimum."""
    if emb.shape != ref.shape:
        raise LeanformerError(f"embedding shapes differ: {emb.shape} vs reference {ref.shape}")
    a, b = torch.from_numpy(emb).double(), torch.from_numpy(ref).double()
    cos = F.cosine_similarity(a, b, dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
