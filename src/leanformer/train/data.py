"""Training text for distillation: token windows for decoders, sentences for encoders.

Decoders: the text is tokenized (no BOS) and cut into non-overlapping windows of `seq_len` tokens
([N, seq_len]). `exclude` (the evaluation text, e.g. the first 60,000 characters of wiki.test.raw that the
perplexity protocol reads) is cut out of the training text first, and the parts before and after it are
tokenized separately, so no training window contains a single evaluation character.
Encoders: one sentence per line (a GLUE .tsv with a `sentence` column: that column; `sentence1` /
`sentence2` columns: both sentences), duplicates removed.
The order of examples is a pure function of (seed, position): an exact resume needs no data state.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from leanformer.errors import LeanformerError


def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LeanformerError(f"data file not found: {p} (give a plain text file)")
    text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if not text.strip():
        raise LeanformerError(f"data file {p} is empty: give a plain text file with training text")
    return text


def tokenize(tok, text: str) -> list[int]:
    """Token ids without BOS / special tokens (transformers tokenizers and llama2.c's alike)."""
    if tok is None:
        raise LeanformerError("the teacher has no tokenizer: distillation needs one to turn text into tokens")
    if hasattr(tok, "convert_ids_to_tokens"):
        return list(tok.encode(text, add_special_tokens=False))
    return list(tok.encode(text, add_bos=False))


def cut_out(text: str, exclude: str | None) -> list[str]:
    """The parts of `text` around every occurrence of `exclude` (the evaluation text)."""
    if not exclude:
        return [text]
    return [part for part in text.split(exclude) if part.strip()]


@dataclass
class Windows:
    """Decoder data: train [N, seq_len] and held-out [M, seq_len] token windows (disjoint)."""

    train: torch.Tensor
    held_out: torch.Tensor

    def __len__(self) -> int:
        return len(self.train)


def token_windows(
    tok, text: str, seq_len: int, exclude: str | None = None, held_out: int = 4, source: str = "the data"
) -> Windows:
    """Non-overlapping windows of seq_len tokens; the last `held_out` windows (at most a tenth) are held out."""
    if seq_len < 2:
        raise LeanformerError(f"seq_len must be at least 2 tokens, got {seq_len}")
    rows: list[torch.Tensor] = []
    for part in cut_out(text, exclude):
        ids = torch.tensor(tokenize(tok, part), dtype=torch.long)
        n = len(ids) // seq_len
        if n:
            rows.append(ids[: n * seq_len].view(n, seq_len))
    n_total = sum(len(r) for r in rows)
    if n_total < 2:
        raise LeanformerError(
            f"{source} is too short: {n_total} window(s) of {seq_len} tokens (outside the evaluation "
            "text); distillation needs at least 2 (one to train on, one held out): more text or a smaller --seq-len"
        )
    windows = torch.cat(rows)
    keep = max(1, min(held_out, n_total // 10))
    return Windows(windows[:-keep], windows[-keep:])


def read_sentences(path: str | Path) -> list[str]:
    """Sentences from a text file (one per line) or a GLUE .tsv (sentence / sentence1 + sentence2)."""
    p = Path(path).expanduser()
    text = read_text(p)
    first = text.split("\n", 1)[0].split("\t")
    columns = [c for c in ("sentence", "sentence1", "sentence2") if c in first]
    if columns:
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        found = [r.get(c) or "" for r in rows for c in columns]
    else:
        found = text.split("\n")
    return list(dict.fromkeys(s.strip() for s in found if s and s.strip() and not s.startswith(" = ")))


@dataclass
class Sentences:
    """Encoder data: training sentences and held-out ones (for the loss on text never trained on)."""

    train: list[str]
    held_out: list[str]

    def __len__(self) -> int:
        return len(self.train)


def sentence_split(sentences: list[str], held_out: int = 64, source: str = "the data") -> Sentences:
    """At least 2 training sentences (the in-batch contrastive loss needs two); held out: at most a tenth."""
    if len(sentences) < 3:
        raise LeanformerError(
            f"{source} has {len(sentences)} sentence(s); distilling an encoder needs at least 3 lines of text"
        )
    keep = max(1, min(held_out, len(sentences) // 10))
    return Sentences(sentences[:-keep], sentences[-keep:])


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Example indices of micro-batch `micro_step`: epoch e reads a permutation seeded by (seed, e).

    Position p = micro_step * batch_size + j lies in epoch p // n, so the order depends on nothing but
    the arguments: a resumed run reads exactly the batches the uninterrupted run would have read.
    """
    out, perms = [], {}
    for p in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch = p // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g)
        out.append(int(perms[epoch][p % n]))
    return out
