"""Quality of a decoder LM: windowed perplexity, and KL divergence / top-1 agreement vs a reference.

Protocol (../shared/PERF-FACTS.md, so our figures compare with the peers'): text with CRLF → LF,
tokenized without BOS, cut into windows of `window` tokens advanced by `stride`; each window starts
from an empty cache; logits at window positions 0..W-2 score tokens 1..W-1 (with stride < window only
the tokens not scored by an earlier window count). KLD = KL(reference ‖ model) over the full vocabulary,
averaged per scored token; top-1 = how often both models' argmax agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from leanformer.errors import LeanformerError


@dataclass
class EvalResult:
    perplexity: float
    nll: float
    scored_tokens: int
    windows: int
    window: int
    stride: int
    kld: float | None = None
    top1_agreement: float | None = None
    reference_perplexity: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    p = Path(path)
    if not p.is_file():
        raise LeanformerError(f"data file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return text[:max_chars] if max_chars else text


def tokenize(tok, text: str) -> list[int]:
    """Token ids without BOS/special tokens, for any tokenizer leanformer loads."""
    if tok is None:
        raise LeanformerError(
            "this model has no tokenizer; evaluation needs one to turn the data into tokens"
        )
    if hasattr(tok, "convert_ids_to_tokens"):  # transformers tokenizer
        return list(tok.encode(text, add_special_tokens=False))
    return list(tok.encode(text, add_bos=False))


def calibration_ids(tok, path: str | Path, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] token ids cut from a text file (evenly spread over it): what GPTQ, AWQ, Wanda,
    SparseGPT and PruneFFN calibrate on (`compress`, `bench` and `report` --calibration)."""
    ids = torch.tensor(tokenize(tok, read_text(path)))
    if len(ids) < seq_len:
        raise LeanformerError(
            f"calibration file {path} has {len(ids)} tokens, fewer than one sample of {seq_len}"
        )
    if samples > len(ids) - seq_len + 1:
        raise LeanformerError(
            f"calibration file {path} has {len(ids)} tokens: at most {len(ids) - seq_len + 1} distinct samples of "
            f"{seq_len}, not {samples}; lower --calibration-samples or give more text"
        )
    starts = torch.linspace(0, len(ids) - seq_len, samples).long()
    return torch.stack([ids[s : s + seq_len] for s in starts])


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored index within the window) for each full window."""
    if stride <= 0 or stride > window:
        raise LeanformerError(f"stride must be in 1..window ({window}), got {stride}")
    out, scored_until = [], 0
    for start in range(0, n_tokens - window + 1, stride):
        out.append((start, max(1, scored_until - start)))
        scored_until = start + window
    return out


@torch.inference_mode()
def evaluate(
    model,
    ids: list[int] | torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    reference=None,
    batch_size: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of `model` on token ids; with `reference` (another model) also KLD and top-1 agreement."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    stride = stride or window
    limit = _context(model)
    if window > limit:
        raise LeanformerError(
            f"window {window} exceeds the model's context of {limit}; pass a smaller --window"
        )
    spans = windows(len(ids), window, stride)
    if not spans:
        raise LeanformerError(f"the data has {len(ids)} tokens, fewer than one window of {window}")
    nll_sum = ref_nll = kld_sum = 0.0
    agree = scored = 0
    bar = tqdm(range(0, len(spans), batch_size), desc="eval", unit="batch", disable=not progress)
    for i in bar:
        group = spans[i : i + batch_size]
        batch = torch.stack([ids[s : s + window] for s, _ in group])  # [b, W]
        logp = F.log_softmax(_logits(model, batch), dim=-1)  # [b, W, V]
        ref_logp = F.log_softmax(_logits(reference, batch), dim=-1) if reference is not None else None
        for j, (_, first) in enumerate(group):
            pos = slice(first - 1, window - 1)  # logits at these positions score tokens first..W-1
            target = batch[j, first:]
            lp = logp[j, pos]
            nll_sum -= lp.gather(-1, target[:, None]).sum().item()
            scored += len(target)
            if ref_logp is not None:
                rp = ref_logp[j, pos]
                ref_nll -= rp.gather(-1, target[:, None]).sum().item()
                kld_sum += (rp.exp() * (rp - lp)).sum().item()
                agree += (rp.argmax(-1) == lp.argmax(-1)).sum().item()
        bar.set_postfix(ppl=f"{math.exp(nll_sum / scored):.3f}")
    result = EvalResult(math.exp(nll_sum / scored), nll_sum / scored, scored, len(spans), window, stride)
    if reference is not None:
        result.kld = kld_sum / scored
        result.top1_agreement = agree / scored
        result.reference_perplexity = math.exp(ref_nll / scored)
    return result


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    """Our models return logits; transformers models return an output object with .logits.

    A model with a quantized KV cache is scored through that cache (attention then reads the
    dequantized keys/values, as it does when generating), otherwise the cache is skipped.
    """
    if getattr(model, "kv_cache_dtype", None):
        from leanformer.models.kv_cache import KVCache

        out = model(batch, cache=KVCache.for_model(model, batch.shape[0], batch.shape[1]))
    else:
        out = model(batch)
    return getattr(out, "logits", out).float()


def _context(model) -> int:
    args = getattr(model, "args", None) or getattr(model, "config", None)
    return getattr(args, "max_position_embeddings", None) or 1 << 30
