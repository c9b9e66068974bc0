"""LowRankLinear layers keep the fused decode step (models/fused.py): the C++ step runs each layer's
attention (and whole layers that are still dense) and torch runs the factorised MLPs; a factorised
attention puts that block on the module path. Decode logits match the module path."""

from __future__ import annotations

import pytest
import torch

from leanformer import kernels
from leanformer.compress import LowRank, quantize_
from leanformer.compress.lowrank import LowRankLinear
from leanformer.loading import load
from tests.models.test_fused import decode_logits

pytestmark = [
    pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here"),
    pytest.mark.usefixtures("one_thread"),
]
PROMPTS = [[3, 14, 15, 92, 65], [35, 89]]


@pytest.mark.parametrize(
    "targets, kinds",
    [
        (
            ["model.layers.0.mlp.*"],
            ["fused", "fused"],
        ),  # layer 0: attention fused, MLP in torch; layer 1 whole
        (["*mlp.down_proj"], ["fused", "fused"]),
        (["model.layers.1.self_attn.o_proj"], ["fused", "module"]),  # a factorised attention: module path
    ],
)
def test_lowrank_decodes_through_the_fused_step(tiny_dirs, targets, kinds):
    model, _ = load(tiny_dirs["llama"])
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, LowRank(ratio=0.5, multiple=8, keep="smaller", targets=targets), calib, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    ref = decode_logits(model, False, PROMPTS)
    got = decode_logits(model, True, PROMPTS)
    plan = model._decode_plan
    assert plan.stack is None and plan.segments is not None, "the partly fused step did not run"
    layer_kinds = [
        "module" if seg.stack is None else "fused" for seg in plan.segments for _ in range(seg.start, seg.end)
    ]
    assert layer_kinds == kinds
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
