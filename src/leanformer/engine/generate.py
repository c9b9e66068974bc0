"""Prefill + decode loop over the KV cache; generate() and stream_generate().

The loop (`decode`) works on token ids and yields each step's new tokens, so generate, streaming,
benchmarks and (later) the server all drive the same code. Finished rows leave the batch at once:
their cache slots are simply no longer named in the next step.
"""

from __future__ import annotations

import inspect
import numbers
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from leanformer.engine import spec_rows
from leanformer.engine.prefill import prefill
from leanformer.engine.sampling import SamplingParams, sample
from leanformer.engine.speculative import Speculative, resolve_speculative, speculative_decode
from leanformer.errors import LeanformerError
from leanformer.models.fused_steps import FusedSteps
from leanformer.models.kv_cache import KVCache
from leanformer.models.kv_policy import Policy, PolicyCache, SinkWindow, observe_queries

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    steps: int = 0
    per_row: list[int] = field(default_factory=list)
    # speculative decoding (engine/speculative.py): tokens proposed / kept, verification rounds, fall-backs
    drafted: int = 0
    accepted: int = 0
    spec_rounds: int = 0
    fallbacks: int = 0

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the target kept (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


def _is_id(t) -> bool:
    """A token id: any integer (NumPy's too), not a bool."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def encode_prompt(tok, prompt: Prompt) -> list[int]:
    """Text, token ids, or a chat (list of {"role", "content"}) → token ids."""
    if isinstance(prompt, str):
        if tok is None:
            raise LeanformerError("this model has no tokenizer: pass token ids instead of text")
        return list(tok.encode(prompt))
    if len(prompt) and isinstance(prompt[0], dict):
        return encode_chat(tok, list(prompt))
    if not all(_is_id(t) for t in prompt):
        bad = next(t for t in prompt if not _is_id(t))
        raise LeanformerError(
            f"a prompt must be text, a chat (list of messages) or a list of token ids (integers), got {bad!r} in it"
        )
    ids = [int(t) for t in prompt]
    if not ids:
        raise LeanformerError("empty prompt: give at least one token (e.g. the BOS id)")
    return ids


def check_decoder(model) -> None:
    """A one-line error for what is not one of our decoder models (an ONNX runner, an encoder, a HF model)."""
    decoder = isinstance(model, torch.nn.Module) and hasattr(model, "args")
    if decoder and "cache" in inspect.signature(model.forward).parameters:
        return
    hint = (
        "; an ONNX runner (load_onnx_decoder) generates with runner.generate(ids)"
        if hasattr(model, "empty_past")
        else ""
    )
    raise LeanformerError(f"generate takes a decoder model from lf.load, got a {type(model).__name__}{hint}")


def check_prompts(prompts: list[list[int]], vocab: int) -> None:
    """Every prompt has tokens and every id is in 0..vocab-1: an embedding lookup would otherwise fail
    with an IndexError deep in the model (or, on some kernels, read out of bounds)."""
    for i, p in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if not p:
            raise LeanformerError(
                f"{where} has no tokens (an empty text with a tokenizer that adds no BOS?): give some text or ids"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise LeanformerError(
                f"{where} holds token id {bad}, outside this model's vocabulary 0..{vocab - 1}"
            )


def encode_chat(tok, messages: list[dict]) -> list[int]:
    if tok is None or not getattr(tok, "chat_template", None):
        raise LeanformerError("this model has no chat template: pass plain text or token ids")
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def eos_ids(model, tok) -> set[int]:
    ids: set[int] = set()
    for source in (tok, getattr(model, "config", {})):
        value = getattr(source, "eos_token_id", None) if source is tok else source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


@torch.inference_mode()
def decode(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: set[int] = frozenset(),
    stats: GenerationStats | None = None,
    speculative: Speculative | str | None = None,
    kv_policy: Policy | None = None,
    fixed_model: bool = False,
) -> Iterator[dict[int, int]]:
    """Yield {row: new_token} for the rows still running, one step at a time.

    fixed_model=True: the caller does not change the model between two steps (generate's own loop), so
    plain decoding checks the fused C++ stack once for the loop instead of every step
    (models/fused_steps.py); the default re-checks it each step.

    speculative (engine/speculative.py) applies to one prompt without repetition penalty, and to a
    batch of prompts with greedy prompt lookup (engine/spec_rows.py: each row drafts and accepts on its
    own, one verification forward for all); other batches, or a repetition penalty (it rescores every
    drafted position differently), decode plainly.
    kv_policy (models/kv_policy.py): SinkWindow (generation past the context in bounded memory),
    HeavyHitters or SnapKV (a KV budget; a share of the longest prompt when given as a float).
    """
    check_decoder(model)
    spec = resolve_speculative(speculative, model)
    vocab = model.args.vocab_size
    check_prompts(prompts, vocab)
    if max_new_tokens < 0:
        raise LeanformerError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    context = model.args.max_position_embeddings
    longest = max(len(p) for p in prompts)
    check_policy(kv_policy, context, longest + max_new_tokens, spec)
    if longest + max_new_tokens > context and not isinstance(kv_policy, SinkWindow):
        raise LeanformerError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of {context}"
            "; a sliding window (kv_policy=SinkWindow(...), CLI --sinks/--window) generates past it"
        )
    if spec is not None and len(prompts) == 1 and params.repetition_penalty == 1.0:
        yield from speculative_decode(model, prompts[0], max_new_tokens, params, spec, stop_ids, stats)
        return
    if spec is not None and spec_rows.supports(spec, len(prompts), params):
        yield from spec_rows.speculative_rows(model, prompts, max_new_tokens, params, spec, stop_ids, stats)
        return
    n = len(prompts)
    if kv_policy is None:
        cache = KVCache.for_model(model, n, longest + max_new_tokens)
    else:
        cache = PolicyCache.for_model(model, n, kv_policy, longest + max_new_tokens, longest)
    with observe_queries(model, cache):
        yield from _decode_loop(model, cache, prompts, max_new_tokens, params, stop_ids, stats, fixed_model)


def check_policy(policy: Policy | None, context: int, total: int, spec) -> None:
    """A window whose cache would outgrow the model's positions, or a policy with speculative decoding,
    fails before any work."""
    if policy is None:
        return
    if spec is not None:
        raise LeanformerError(
            "speculative decoding does not combine with a KV policy (sinks/window, eviction)"
        )
    if isinstance(policy, SinkWindow) and min(total, policy.capacity()) > context:
        raise LeanformerError(
            f"sinks {policy.sinks} + window {policy.window} + eviction chunk {policy.step} exceed the "
            f"model's context of {context}: the cache positions must stay inside it; lower --window"
        )


def _decode_loop(
    model, cache, prompts, max_new_tokens, params, stop_ids, stats, fixed_model: bool
) -> Iterator[dict[int, int]]:
    n, vocab = len(prompts), model.args.vocab_size
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(n, vocab, dtype=torch.bool)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p).clamp_max(vocab - 1)] = True
    lengths = torch.tensor([len(p) for p in prompts])
    t0 = time.perf_counter()
    if getattr(cache, "may_evict", False):  # prompts longer than the cache: each in pieces that fit
        logits = torch.cat([_prefill_pieces(model, cache, p, i) for i, p in enumerate(prompts)])
    else:
        logits = prefill(model, cache, prompts)  # engine/prefill.py
    if not bool(torch.isfinite(logits).all()):  # once, on the first step: NaN weights decode to nothing
        warnings.warn(
            "the model's logits hold NaN or inf: its output is meaningless (NaN/inf weights? a bad file?)",
            stacklevel=3,
        )
    rows = torch.arange(n)
    steps = FusedSteps.start(model, cache) if fixed_model else None
    if stats is not None:
        stats.prompt_tokens += int(lengths.sum())
        stats.prefill_s += time.perf_counter() - t0
        stats.per_row = [0] * n
    t1 = time.perf_counter()  # start of the step being timed (the first token comes from the prefill)
    for step in range(max_new_tokens):
        tokens = sample(logits, params, generator, None if seen is None else seen[rows])
        if seen is not None:
            seen[rows, tokens] = True
        if stats is not None:
            if step == 0:
                stats.first_token_s = time.perf_counter() - t0
            else:  # per step, consumer's time excluded: right however early the caller stops (EOS, stop)
                stats.decode_s += time.perf_counter() - t1
            stats.new_tokens += len(rows)
            stats.steps += 1
            for r in rows.tolist():
                stats.per_row[r] += 1
        listed = tokens.tolist()
        yield dict(zip(rows.tolist(), listed))
        t1 = time.perf_counter()
        stopped = [t in stop_ids for t in listed]
        if step == max_new_tokens - 1 or all(stopped):
            break
        if any(stopped):  # most steps stop no row: no indexing then
            keep = ~torch.tensor(stopped)
            rows, tokens = rows[keep], tokens[keep]
        logits = steps(tokens, rows) if steps is not None else None
        if logits is None:
            logits = model(tokens[:, None], cache=cache, slots=rows)[:, -1].float()
            cache.advance(rows, 1)


def _prefill_pieces(model, cache: PolicyCache, prompt: list[int], slot: int) -> torch.Tensor:
    """Prefill one prompt into `slot` in pieces the policy cache can take → last logits [1, V]."""
    slots = torch.tensor([slot])
    for lo in range(0, len(prompt), cache.piece):
        piece = torch.tensor(prompt[lo : lo + cache.piece])[None]  # [1, T]
        out = model(piece, cache=cache, slots=slots, logits_at=torch.tensor([piece.shape[1] - 1]))
        cache.advance(slots, piece.shape[1])
    return out[:, -1].float()


def _check_prompt_type(prompt) -> None:
    if not isinstance(prompt, (Sequence, torch.Tensor)):
        raise LeanformerError(
            "a prompt must be text, a chat (list of messages), a list of token ids, or a list of these; "
            f"got {type(prompt).__name__}"
        )


def _texts_or_ids(tok, prompt):
    """Normalise one prompt or a batch of prompts → (list of prompts, was_batch, wants_text)."""
    if isinstance(prompt, np.ndarray):  # ids from a tokenizer's return_tensors="np"
        prompt = torch.as_tensor(prompt)
    single_ids = isinstance(prompt, Sequence) and len(prompt) > 0 and _is_id(prompt[0])
    single_chat = isinstance(prompt, Sequence) and len(prompt) > 0 and isinstance(prompt[0], dict)
    _check_prompt_type(prompt)
    if (
        isinstance(prompt, str)
        or single_ids
        or single_chat
        or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1)
    ):
        batch, was_batch = [prompt], False
    else:
        batch, was_batch = list(prompt), True
    if not batch:
        raise LeanformerError("empty prompt: give text, a chat, token ids, or a list of prompts")
    for p in batch:  # e.g. None, or floats taken for a batch of prompts
        _check_prompt_type(p)
    batch = [p.tolist() if isinstance(p, torch.Tensor) else p for p in batch]
    wants_text = tok is not None and not (len(batch[0]) and _is_id(batch[0][0]))
    return batch, was_batch, wants_text


def generate(
    model,
    tok,
    prompt,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    ignore_eos: bool = False,
    stats: GenerationStats | None = None,
    speculative: Speculative | str | None = None,
    kv_policy: Policy | None = None,
):
    """Generate a continuation for one prompt or a batch of prompts (text, token ids, or a chat).

    Returns text for text/chat prompts (a list for a batch), new token ids for id prompts.
    speculative: "prompt-lookup", PromptLookup(...) or DraftModel(model) (engine/speculative.py).
    kv_policy: SinkWindow(sinks=4, window=512), HeavyHitters(budget) or SnapKV(budget) (models/kv_policy.py).
    """
    check_decoder(model)
    resolve_speculative(speculative, model)  # a bad argument fails before the prompt is encoded
    batch, was_batch, wants_text = _texts_or_ids(tok, prompt)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
    prompts = [encode_prompt(tok, p) for p in batch]
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if stop and tok is None:
        raise LeanformerError("stop strings need a tokenizer; this model has none")
    stop_ids = set() if ignore_eos else eos_ids(model, tok)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    # fixed_model: nothing below changes the model between steps
    steps = decode(
        model, prompts, max_new_tokens, params, stop_ids, stats, speculative, kv_policy, fixed_model=True
    )
    for new in steps:
        for row, token in new.items():
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
                continue
            outputs[row].append(token)
            if stop and _find_stop(_decode(tok, outputs[row]), stop) is not None:
                done[row] = True
        if all(done):
            break
    results = outputs
    if wants_text:
        results = []
        for ids, p in zip(outputs, prompts):
            text = _decode(tok, ids, p[-1:])
            cut = _find_stop(text, stop) if stop else None
            results.append(text if cut is None else text[:cut])
    return results if was_batch else results[0]


def stream_generate(
    model,
    tok,
    prompt,
    max_new_tokens: int = 128,
    stop=None,
    ignore_eos: bool = False,
    speculative: Speculative | str | None = None,
    stats: GenerationStats | None = None,
    kv_policy: Policy | None = None,
    **sampling,
):
    """Yield the continuation of one prompt as text pieces (token ids when there is no tokenizer)."""
    check_decoder(model)
    params = SamplingParams(**sampling)
    resolve_speculative(speculative, model)
    batch, was_batch, _ = _texts_or_ids(tok, prompt)
    if was_batch:
        raise LeanformerError("stream_generate takes one prompt (generate takes a batch)")
    ids = encode_prompt(tok, batch[0])
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    stop_ids = set() if ignore_eos else eos_ids(model, tok)
    out: list[int] = []
    sent = ""
    for new in decode(model, [ids], max_new_tokens, params, stop_ids, stats, speculative, kv_policy):
        token = new[0]
        if token in stop_ids:
            return
        if tok is None:
            yield token
            continue
        out.append(token)
        text = _decode(tok, out, ids[-1:])
        cut = _find_stop(text, stop) if stop else None
        if cut is not None:
            if cut > len(sent):
                yield text[len(sent) : cut]
            return
        # hold back a piece that ends inside a multi-byte character or could be the start of a stop string
        safe = len(text) - max((len(s) - 1 for s in stop), default=0)
        if text.endswith("\ufffd"):
            continue
        if safe > len(sent):
            yield text[len(sent) : safe]
            sent = text[:safe]
    if tok is not None and len(text := _decode(tok, out, ids[-1:])) > len(sent):
        yield text[len(sent) :]


def _find_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _decode(tok, ids: list[int], context: list[int] = ()) -> str:
    """Text of `ids` as it continues `context` (the prompt's last token).

    Decoding the new tokens alone gets word boundaries wrong: sentencepiece-style decoders drop the
    leading space of the first piece, while llama2.c's drops it only right after BOS. Decoding
    context + ids and removing the context's own text gives what the continuation really adds.
    """
    kw = {"skip_special_tokens": True}
    head = tok.decode(list(context), **kw) if context else ""
    return tok.decode(list(context) + list(ids), **kw)[len(head) :]
