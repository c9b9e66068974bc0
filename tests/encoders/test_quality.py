"""Real all-MiniLM-L6-v2 quality in the default run, a few seconds each: STS-B on 200 pairs, an
SST-2 probe from 500 sentences scored on 100, and head pruning that keeps what its ranking says
matters. The full-dev figures (STS-B 0.8672 on 1,500 pairs, SST-2 > 0.75) stay in the `slow` tests
of test_encoders.py."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import embed
from leanformer.encoders.probe import train_probe
from leanformer.encoders.prune_heads import head_importance, prune_heads_, prune_heads_auto_
from leanformer.encoders.quality import eval_sst2, eval_stsb, read_tsv, spearman
from tests.encoders.helpers import need_glue, need_minilm


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(need_minilm())


@pytest.fixture(scope="module")
def stsb() -> list[dict]:
    return read_tsv(need_glue("stsb"))


def _stsb(model, tok, pairs: list[dict]) -> float:
    e = embed(model, tok, [r["sentence1"] for r in pairs] + [r["sentence2"] for r in pairs])
    cos = (e[: len(pairs)] * e[len(pairs) :]).sum(-1)  # embeddings are normalized (Normalize module)
    return spearman(cos, np.array([float(r["score"]) for r in pairs]))


def test_minilm_stsb_first_200_pairs(minilm, tmp_path):
    model, tok = minilm
    lines = need_glue("stsb").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "dev200.tsv").write_text("".join(lines[:201]), encoding="utf-8")  # header + 200 pairs
    r = eval_stsb(model, tok, tmp_path / "dev200.tsv")
    # 0.9362 measured (AVX-512 and the plain torch path agree to 1e-6 in the cosines); these first
    # pairs are easier than the whole dev set, whose 0.8672 matches sentence-transformers
    assert r["stsb_pairs"] == 200 and r["stsb_spearman"] == pytest.approx(0.9362, abs=3e-3)


def test_minilm_sst2_probe_from_500_sentences(minilm):
    model, tok = copy.deepcopy(minilm[0]), minilm[1]  # the probe attaches to the model
    rows = read_tsv(need_glue("sst2", "train"), 500)
    train_probe(model, tok, [r["sentence"] for r in rows], [r["label"] for r in rows])
    # 0.77 measured on the first 100 dev sentences (2,000 training sentences: 0.7775 on all 872);
    # chance is 0.5, and a broken embedding (pooling, norms) lands near it
    assert eval_sst2(model, tok, need_glue("sst2"), limit=100)["sst2_accuracy"] >= 0.70


def _plan(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    plan: dict[int, list[int]] = {}
    for li, h in heads:
        plan.setdefault(li, []).append(h)
    return plan


def test_minilm_norm_pruning_beats_the_opposite_and_random(minilm, stsb):
    """Half the heads removed by the norm ranking vs removing the heads it ranks highest, and vs random
    picks. Measured: STS-B (100 pairs) 0.933 ranked vs 0.799 opposite (unpruned 0.943); cosine to the
    unpruned embeddings 0.82 ranked vs 0.58 opposite vs 0.73-0.76 random. (Taylor, one round on this
    little calibration text, does not reliably beat its opposite on MiniLM, so its ranking is checked on
    tiny models in test_encoders.py: finite differences and the order heads are removed in.)"""
    model, tok = minilm
    calib = [r["sentence1"] for r in stsb[300:364]]
    held = [r["sentence2"] for r in stsb[400:464]]
    base = embed(model, tok, held)

    def cosine(m) -> float:
        return float((embed(m, tok, held) * base).sum(1).mean())

    imp = head_importance(model, tok, calib, "norm")
    ranked = sorted((float(v), li, h) for li, s in enumerate(imp) for h, v in enumerate(s))
    heads = [(li, h) for _, li, h in ranked]
    auto = copy.deepcopy(model)
    prune_heads_auto_(auto, tok, calib, 0.5, method="norm", steps=1)
    opposite = prune_heads_(copy.deepcopy(model), _plan(heads[-36:]))
    a_sts, o_sts = _stsb(auto, tok, stsb[:100]), _stsb(opposite, tok, stsb[:100])
    assert a_sts > o_sts + 0.05, (a_sts, o_sts)
    a_cos, o_cos = cosine(auto), cosine(opposite)
    r_cos = [
        cosine(prune_heads_(copy.deepcopy(model), _plan(random.Random(s).sample(heads, 36)))) for s in (0, 1)
    ]
    assert a_cos > o_cos + 0.1 and a_cos > max(r_cos) + 0.02, (a_cos, o_cos, r_cos)
