"""Real SmolLM2-135M: int8 stays close; GPTQ and AWQ each beat round-to-nearest int4 (KL to fp32).
A few minutes on 2 cores: run with -m slow. The full protocol lives in evaluate.py / the bench."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanformer as lf
from leanformer.compress import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly, quantize_

pytestmark = pytest.mark.slow


def _kld(model, wins: torch.Tensor, ref: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        total = sum(
            F.kl_div(model(w[None])[0, :-1].log_softmax(-1), r, log_target=True, reduction="sum").item()
            for w, r in zip(wins, ref)
        )
    return total / (len(wins) * (wins.shape[1] - 1))


def test_smollm2_int8_and_calibrated_int4(smollm2, shared):
    model, tok = lf.load(smollm2, fast=False, keep_quantized=False)
    text = (shared / "data/wikitext-2-raw/wiki.test.raw").read_text().replace("\r\n", "\n")
    wins = torch.tensor(tok.encode(text[:20000], add_special_tokens=False))[: 2 * 512].reshape(2, 512)
    calib = torch.tensor(tok.encode(text[300000:360000], add_special_tokens=False))[: 8 * 512].reshape(8, 512)
    with torch.inference_mode():
        ref = [model(w[None])[0, :-1].log_softmax(-1) for w in wins]
    kld = {}
    for name, cfg in [
        ("int8", Int8WeightOnly()),
        ("rtn", Int4WeightOnly(group_size=64)),
        ("gptq", GPTQ(group_size=64)),
        ("awq", AWQ(group_size=64)),
    ]:
        m, _ = lf.load(smollm2, fast=False, keep_quantized=False)
        quantize_(m, cfg, calib, progress=False)
        kld[name] = _kld(m, wins, ref)
    assert kld["int8"] < 0.01, kld
    assert kld["gptq"] < kld["rtn"] and kld["awq"] < kld["rtn"], kld
