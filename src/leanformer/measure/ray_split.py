"""`embed --ray` and `eval --ray`: one large input split over Ray workers (distributed/ray_jobs.py),
the result identical to the single-process run and in the input's order.

Identity comes from giving every worker the very batches one process would form, never re-batching:
- embed: the driver forms encoders.embed's batches (duplicates dropped, sorted by token count, cut
  every `batch_size`); each work item is one batch's texts, which embed() on the worker keeps as one
  batch in the same order (already sorted: Python's sort is stable). Rows go back to their positions.
- eval: the driver cuts measure.evaluate's windows into its groups of `batch_size`; a worker returns
  each window's sums, and the driver adds them in window order, as evaluate() does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from leanformer.distributed.ray_jobs import ordered_map
from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import embed, length_sorted_batches
from leanformer.errors import LeanformerError
from leanformer.loading import load
from leanformer.measure.evaluate import EvalResult, _context, _logits, windows


def _embed_batch(state: tuple, item: tuple[list[str], bool | None]) -> np.ndarray:
    (model, tok), (texts, normalize) = state, item
    return embed(model, tok, texts, batch_size=len(texts), normalize=normalize)  # [B, D], one batch


def embed_ray(
    path: str,
    model,
    tok,
    texts: list[str],
    batch_size: int = 32,
    normalize: bool | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """encoders.embed.embed(model, tok, texts, batch_size, normalize) computed by Ray workers that each
    load the encoder at `path` (the driver's `model`, `tok`, loaded from it, form the batches)."""
    unique = list(dict.fromkeys(texts))  # as embed(): a repeated text is embedded once
    batches = [idx for idx, _, _ in length_sorted_batches(model, tok, unique, batch_size)]
    items = [([unique[i] for i in idx], normalize) for idx in batches]
    parts = ordered_map(load_encoder, (path,), _embed_batch, items, workers, desc="embed")
    if not parts:
        return np.empty((0, model.args.hidden_size * len(model.args.pooling)), np.float32)
    out = np.empty((len(unique), parts[0].shape[1]), np.float32)
    for idx, part in zip(batches, parts):
        out[idx] = part
    row = {t: i for i, t in enumerate(unique)}
    return out[[row[t] for t in texts]]


def _load_pair(path: str, dtype: str, keep_quantized: bool, reference: str | None) -> tuple:
    """(model, reference model or None) on a worker, loaded as the CLI loads them."""
    model, _ = load(path, dtype=dtype, keep_quantized=keep_quantized)
    return model, None if reference is None else load(reference, dtype="float32")[0]


@torch.inference_mode()
def _score_group(state: tuple, item: tuple[torch.Tensor, list[int]]) -> list[tuple]:
    """Per window of one batch [b, W]: (sum of log p(target), targets, reference's sum, KLD sum,
    top-1 agreements): the terms measure.evaluate.evaluate adds up, computed the same way."""
    (model, reference), (batch, firsts) = state, item
    window = batch.shape[1]
    logp = F.log_softmax(_logits(model, batch), dim=-1)  # [b, W, V]
    ref_logp = F.log_softmax(_logits(reference, batch), dim=-1) if reference is not None else None
    out = []
    for j, first in enumerate(firsts):
        pos, target = slice(first - 1, window - 1), batch[j, first:]
        lp = logp[j, pos]
        terms = [lp.gather(-1, target[:, None]).sum().item(), len(target), 0.0, 0.0, 0]
        if ref_logp is not None:
            rp = ref_logp[j, pos]
            terms[2] = rp.gather(-1, target[:, None]).sum().item()
            terms[3] = (rp.exp() * (rp - lp)).sum().item()
            terms[4] = (rp.argmax(-1) == lp.argmax(-1)).sum().item()
        out.append(tuple(terms))
    return out


def evaluate_ray(
    model,
    ids: list[int],
    load_args: tuple[str, str, bool, str | None],
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    workers: int | None = None,
) -> EvalResult:
    """measure.evaluate.evaluate(model, ids, window, stride, reference, batch_size) over Ray workers.

    load_args = (model path, dtype, keep_quantized, reference path or None): how each worker loads
    the models; the driver's `model` is only asked for its context length.
    """
    stride = stride or window
    if window > _context(model):
        raise LeanformerError(
            f"window {window} exceeds the model's context of {_context(model)}; pass a smaller --window"
        )
    spans = windows(len(ids), window, stride)
    if not spans:
        raise LeanformerError(f"the data has {len(ids)} tokens, fewer than one window of {window}")
    t = torch.as_tensor(ids, dtype=torch.long)
    items = []
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        items.append((torch.stack([t[s : s + window] for s, _ in group]), [f for _, f in group]))
    parts = ordered_map(_load_pair, load_args, _score_group, items, workers, desc="eval")
    nll_sum = ref_nll = kld_sum = 0.0
    agree = scored = 0
    for terms in (w for part in parts for w in part):  # window order, evaluate()'s additions
        nll_sum -= terms[0]
        scored += terms[1]
        ref_nll -= terms[2]
        kld_sum += terms[3]
        agree += terms[4]
    result = EvalResult(math.exp(nll_sum / scored), nll_sum / scored, scored, len(spans), window, stride)
    if load_args[3] is not None:
        result.kld, result.top1_agreement = kld_sum / scored, agree / scored
        result.reference_perplexity = math.exp(ref_nll / scored)
    return result
