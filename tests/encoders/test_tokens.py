"""encoders/tokens.py: truncating tokenization that cuts long texts before tokenizing them gives exactly the
ids (and the truncation warning) of tokenizing them whole, for every kind of tokenizer it cuts for, and
leaves alone the tokenizers it cannot prove that for."""

from __future__ import annotations

import random
import warnings

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from leanformer.encoders import tokens
from leanformer.encoders.build import load_tokenizer
from tests.encoders.helpers import need_minilm

PIECES = [
    "the",
    "cat's",
    "naïve",
    "café",
    "Straße",
    "東京",
    "x2",
    "1,234.5",
    "e\u0301",
    "don't",
    "(quoted)",
    "--",
    "emoji🙂",
    "tab\tsep",
    "a\u00a0b",
    "ctl\x1cx",
    "zero\u200bwidth",
    "UPPER",
    "supercalifragilisticexpialidocious",
]
SEPARATORS = [" ", " ", " ", "  ", "\n", " \n ", "\t", "\u3000", ""]


def _texts(seed: int, count: int = 60) -> list[str]:
    """Texts of 0-2,500 characters mixing words, unicode, odd whitespace and run-on words."""
    rng = random.Random(seed)
    out = ["", "one", " leading and trailing ", "x" * 3000, ("word " * 400).strip()]
    for _ in range(count):
        n = rng.choice([3, 30, 200, 400, 600])
        out.append("".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(n)))
    return out


def _whole(tok, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    enc = tok(texts, truncation=True, max_length=max_length)
    return enc["input_ids"], sum(1 for e in enc.encodings if e.overflowing)


def _check(tok, max_length: int, seed: int = 0) -> None:
    texts = _texts(seed)
    want, cut = _whole(tok, texts, max_length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = tokens.tokenize(tok, texts, max_length)
    assert got == want
    assert [str(w.message).split(" of ")[0] for w in caught] == [str(cut)]


def _fast(model, normalizer, pre, decoder=None, post=None, **kw) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer around a tokenizers pipeline trained on the test texts."""
    tk = Tokenizer(model)
    tk.normalizer, tk.pre_tokenizer = normalizer, pre
    if decoder is not None:
        tk.decoder = decoder
    trainer = {
        "WordPiece": trainers.WordPieceTrainer,
        "BPE": trainers.BpeTrainer,
        "Unigram": trainers.UnigramTrainer,
    }[type(model).__name__](vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], **kw)
    tk.train_from_iterator(_texts(1) + _texts(2), trainer)
    if post is not None:
        tk.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def _bert_post():
    return processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])


STABLE = {
    "wordpiece": lambda: _fast(
        models.WordPiece(unk_token="[UNK]"),
        normalizers.BertNormalizer(lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
        decoders.WordPiece(),
        _bert_post(),
    ),
    "bytelevel-bpe": lambda: _fast(
        models.BPE(),
        None,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
    "metaspace-unigram": lambda: _fast(
        models.Unigram(),
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
        pre_tokenizers.Metaspace(),
        decoders.Metaspace(),
        unk_token="[UNK]",
    ),
    "whitespace-digits": lambda: _fast(
        models.WordPiece(unk_token="[UNK]"),
        normalizers.NFD(),
        pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]),
    ),
}


@pytest.mark.parametrize("kind", sorted(STABLE))
@pytest.mark.parametrize("max_length", [8, 64, 128])
def test_cut_texts_tokenize_as_whole_texts(kind, max_length):
    tok = STABLE[kind]()
    assert tokens.prefix_stable(tok)
    _check(tok, max_length)


def test_the_real_minilm_tokenizer_on_long_texts(monkeypatch):
    tok = load_tokenizer(need_minilm())
    assert tokens.prefix_stable(tok)
    for max_length in (16, 128, 256, 512):
        _check(tok, max_length, seed=max_length)
    # a cut too early for the limit (few long tokens): the text is tokenized again whole
    monkeypatch.setattr(tokens, "CHARS_PER_TOKEN", 1)
    _check(tok, 128, seed=7)


def test_a_cut_happens_only_where_it_pays(monkeypatch):
    tok = STABLE["wordpiece"]()
    seen: list[list[str]] = []
    real = type(tok).__call__
    monkeypatch.setattr(
        type(tok), "__call__", lambda self, t, **kw: seen.append(list(t)) or real(self, t, **kw)
    )
    long_text = "word " * 2000
    tokens.tokenize(tok, ["short text", long_text], 64)
    assert len(seen) == 1 and seen[0][0] == "short text"
    assert len(seen[0][1]) < 6 * 64 + 10 and long_text.startswith(seen[0][1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: _fast(models.BPE(), None, pre_tokenizers.ByteLevel(use_regex=False)),
        lambda: _fast(models.Unigram(), None, pre_tokenizers.Metaspace(split=False), unk_token="[UNK]"),
        lambda: _fast(models.BPE(), normalizers.Replace("ab", "c"), pre_tokenizers.Whitespace()),
        lambda: _fast(models.BPE(), None, pre_tokenizers.Digits()),
        lambda: _fast(models.BPE(), None, None),
    ],
    ids=["bytelevel-no-regex", "metaspace-no-split", "replace-normalizer", "no-whitespace-split", "none"],
)
def test_tokenizers_that_may_merge_across_a_cut_are_tokenized_whole(make):
    tok = make()
    assert not tokens.prefix_stable(tok)
    _check(tok, 32)


def test_left_truncation_and_whitespace_in_added_tokens_are_not_cut():
    tok = STABLE["wordpiece"]()
    tok.truncation_side = "left"
    assert not tokens.prefix_stable(tok)
    _check(tok, 32)
    tok = STABLE["wordpiece"]()
    tok.add_tokens(["new york"])
    assert not tokens.prefix_stable(tok)
    assert not tokens.prefix_stable(object())
