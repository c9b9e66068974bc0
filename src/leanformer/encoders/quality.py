"""Encoder quality: STS-B Spearman, SST-2 accuracy, cosine to a reference (GLUE files from ../shared)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leanformer.encoders.embed import _label_names, classify, embed
from leanformer.errors import LeanformerError


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
