"""Texts → token ids for the encoders, truncated to the model's length without tokenizing what is cut off.

A document of 5,000 words embedded by a 256-token model is mostly thrown away by truncation, yet a
tokenizer call tokenizes all of it first (sentence-transformers does). When the tokenizer is *prefix
stable* (below), the text is cut at a space after about 6 characters per kept token and the prefix
tokenized: if the prefix alone still overflows the limit, its truncated ids are the full text's, exactly;
if not, the full text is tokenized as before. all-MiniLM-L6-v2's tokenizer on 96 texts of ≥ 300 tokens cut
to 128: 33 → 23 ms (docs/BENCHMARKS.md, session 30); the longer the texts, the larger the saving.
"""

from __future__ import annotations

import json
import re
import warnings

# Characters per kept token where a text is cut (English WordPiece / BPE: ~4-5 characters a token).
CHARS_PER_TOKEN = 6

# Char-local normalizers: what they do to the characters before a cut does not depend on what follows.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Prepend"}
# Pre-tokenizers that end every word at a whitespace (so the model sees the same words before a cut), and
# ones that only split further.
_SPLITTING = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"}
_FURTHER = {"Punctuation", "Digits"}
# A cut: just before a space, tab or newline that follows a character no tokenizer counts as whitespace.
_CUT = re.compile(r"[^\s][ \t\n]")


def _parts(backend_part, key: str) -> list[dict]:
    """A tokenizers normalizer / pre-tokenizer → its components as dicts (a Sequence flattened)."""
    if backend_part is None:
        return []
    state = json.loads(backend_part.__getstate__())
    out, todo = [], [state]
    while todo:
        c = todo.pop(0)
        if c.get("type") == "Sequence":
            todo[:0] = c.get(key, [])
        else:
            out.append(c)
    return out


def prefix_stable(tok) -> bool:
    """Whether `tok` (a transformers tokenizer) gives a text's tokens unchanged up to a cut made before a
    whitespace that ends a word: a fast tokenizer truncating on the right, with char-local normalizers, a
    pre-tokenizer that ends words at whitespace (BERT, ByteLevel, Metaspace with split, Whitespace), and
    no added token holding whitespace. Everything else is tokenized whole."""
    backend = getattr(tok, "backend_tokenizer", None)
    if (
        backend is None
        or not getattr(tok, "is_fast", False)
        or getattr(tok, "truncation_side", "right") != "right"
    ):
        return False
    try:
        norms = _parts(backend.normalizer, "normalizers")
        pres = _parts(backend.pre_tokenizer, "pretokenizers")
        added = [t.content for t in backend.get_added_tokens_decoder().values()]
    except (AttributeError, TypeError, ValueError):  # another tokenizers version: play safe
        return False
    if any(n.get("type") not in _LOCAL_NORMALIZERS for n in norms):
        return False
    if any(p.get("type") not in _SPLITTING | _FURTHER for p in pres):
        return False
    splits = [
        p
        for p in pres
        if p.get("type") in _SPLITTING
        and p.get("use_regex", True)  # ByteLevel without its regex: the whole text is one word
        and p.get("split", True)  # Metaspace without split: likewise
    ]
    return bool(splits) and not any(re.search(r"\s", a) for a in added)


def _cut(text: str, chars: int) -> str | None:
    """text cut before the first word-ending whitespace at or after `chars`, or None if none is there."""
    if len(text) <= chars:
        return None
    m = _CUT.search(text, max(chars - 1, 0))
    return None if m is None else text[: m.start() + 1]


def tokenize(tok, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to max_length (as `tok(texts, truncation=True, max_length=...)`), with
    one warning naming how many were cut. Long texts of a prefix-stable tokenizer are cut first."""
    call = dict(
        truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )
    prefixes: dict[int, str] = {}
    if getattr(tok, "is_fast", False) and prefix_stable(tok):
        for i, t in enumerate(texts):
            p = _cut(t, CHARS_PER_TOKEN * max_length)
            if p is not None:
                prefixes[i] = p
    enc = tok([prefixes.get(i, t) for i, t in enumerate(texts)], **call)
    ids = list(enc["input_ids"])
    encodings = getattr(enc, "encodings", None)
    if encodings:  # fast tokenizers record what truncation removed
        over = [bool(e.overflowing) for e in encodings]
        # a prefix that does not overflow the limit may hold fewer tokens than the text: tokenize it whole
        redo = [i for i in prefixes if not over[i]]
        if redo:
            again = tok([texts[i] for i in redo], **call)
            for i, row, e in zip(redo, again["input_ids"], again.encodings, strict=True):
                ids[i], over[i] = row, bool(e.overflowing)
        cut = sum(over)
    else:
        cut = sum(1 for t in texts if len(tok(t)["input_ids"]) > max_length)
    if cut:
        warnings.warn(
            f"{cut} of {len(texts)} texts were truncated to the model's maximum of {max_length} tokens",
            stacklevel=3,
        )
    return ids
