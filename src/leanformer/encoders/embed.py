"""Embeddings and classification: length-sorted batches through the encoder, original order kept."""

from __future__ import annotations

import numpy as np
import torch

from leanformer.encoders.tokens import tokenize
from leanformer.errors import LeanformerError
from leanformer.models.bert_attention import LongAttention


def length_sorted_batches(model, tok, texts: list[str], batch_size: int, max_length: int | None = None):
    """Yield (positions in `texts`, input_ids [B, T], attention_mask [B, T]), longest batch first.
    max_length: tokens kept per text (default: the model's limit)."""
    texts = _texts(texts)
    if batch_size < 1:
        raise LeanformerError(f"batch size must be ≥ 1, got {batch_size}")
    if not texts:
        return
    ids = tokenize(tok, texts, max_length or model.args.max_length)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # by tokens, not characters
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.args.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        t = len(ids[idx[0]])
        # one tensor from padded lists: row by row tensor writes took ~4% of embedding STS-B sentences
        batch = torch.tensor([ids[i] + [pad] * (t - len(ids[i])) for i in idx], dtype=torch.long)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (t - len(ids[i])) for i in idx], dtype=torch.long)
        yield idx, batch, mask


def embed(
    model,
    tok,
    texts: list[str],
    batch_size: int = 32,
    normalize: bool | None = None,
    numpy: bool = True,
    *,
    attention: str | LongAttention | None = None,
    max_length: int | None = None,
    **attention_options,
):
    """Texts → sentence embeddings [N, D] (np.ndarray, or torch.Tensor with numpy=False), input order.

    normalize: None follows the model (sentence-transformers' Normalize module); True/False forces it.
    `model` is a models.bert.Model or an export.OrtEncoder (ONNX Runtime); both expose .embed and .args.
    attention: "dense" (default) | "local" (window=256: blocks of that many tokens, each seeing its own and
    the neighbouring blocks, so every key within `window`) | "lsh" (bucket_size=64, hashes=2, seed=0) or a
    LongAttention (models/bert_attention.py); torch models only.
    max_length: tokens kept per text (default: the model's trained limit). Longer than the position table,
    positions= "interpolate" (default) or "repeat" says how positions past its end are read.
    """
    long = _long_attention(model, attention, max_length, attention_options)
    texts = _texts(texts)
    unique = list(dict.fromkeys(texts))  # a repeated text is embedded once (exact: same ids, same math)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for idx, ids, mask in length_sorted_batches(model, tok, unique, batch_size, max_length):
            kw = {} if long is None else {"attention": long}
            e = model.embed(ids, mask, normalize=normalize, **kw).float()  # [B, D]
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


def _texts(texts) -> list[str]:
    """One text or an iterable of texts → a list of strings, else a one-line error."""
    if isinstance(texts, str):
        return [texts]
    try:
        out = list(texts)
    except TypeError:
        raise LeanformerError(
            f"texts must be a string or a list of strings, got {type(texts).__name__}"
        ) from None
    bad = next((t for t in out if not isinstance(t, str)), None)
    if bad is not None:
        raise LeanformerError(f"texts must be strings, got a {type(bad).__name__}")
    return out


def _long_attention(model, attention, max_length: int | None, options: dict) -> LongAttention | None:
    """The LongAttention embed() runs with (None: plain dense within the trained length), checked first."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
        raise LeanformerError(f"max_length must be a whole number of tokens, got {max_length!r}")
    if max_length is not None and max_length < 2:
        raise LeanformerError(f"max_length must be at least 2 tokens, got {max_length}")
    long = LongAttention.make(attention, **options)
    beyond = max_length is not None and max_length > model.args.max_length
    if long.kind == "dense" and not beyond:  # plain dense within the trained length: any backend
        return None
    if not hasattr(model, "layers"):  # an ONNX Runtime graph: its attention is baked in
        raise LeanformerError("local / LSH attention and longer inputs run on the torch backend only")
    return long


def classify(model, tok, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Texts → [{"label": name, "score": probability}] from the model's head or its trained probe."""
    labels = _label_names(model)
    texts = _texts(texts)
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
