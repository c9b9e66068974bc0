"""FusedSteps (models/fused_steps.py): a generate loop's steps with the checks done once give the logits
model.forward gives, step by step, and hand back to model.forward wherever they cannot run."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.engine.generate import decode
from leanformer.engine.sampling import SamplingParams
from leanformer.models.fused_steps import FusedSteps
from leanformer.models.kv_cache import KVCache
from leanformer.models.kv_policy import PolicyCache, SinkWindow
from leanformer.models.layers import Rotary
from tests.models.test_fused_tokens import plain_head

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")

PROMPTS = [[3, 14, 15, 92, 65], [32, 38], [7, 1, 100, 5, 9, 11, 2]]  # rows of different lengths


@pytest.fixture
def model(tiny_dirs):
    m, _ = lf.load(tiny_dirs["qwen2"])  # tied: the int8 head is the embedding too
    lf.quantize_(m, lf.Int4WeightOnly(group_size=32))
    lf.quantize_(m, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))
    return m


def prefilled(model, rows: int = 3) -> tuple[KVCache, torch.Tensor]:
    """A cache holding PROMPTS[:rows] and each row's greedy next token [rows]."""
    cache = KVCache.for_model(model, rows, 40)
    nxt = []
    for s, p in enumerate(PROMPTS[:rows]):
        slot = torch.tensor([s])
        nxt.append(model(torch.tensor([p]), cache=cache, slots=slot)[0, -1].argmax())
        cache.advance(slot, len(p))
    return cache, torch.stack(nxt)


@torch.inference_mode()
def test_logits_equal_model_forward_step_by_step(model):
    ref_cache, tokens = prefilled(model)
    cache, _ = prefilled(model)
    steps = FusedSteps.start(model, cache)
    assert steps is not None
    rows = torch.arange(3)
    for i in range(6):
        if i == 3:  # a row stopped: the others go on in their own slots
            rows, tokens = rows[[0, 2]], tokens[[0, 2]]
        ref = model(tokens[:, None], cache=ref_cache, slots=rows)[:, -1].float()
        ref_cache.advance(rows, 1)
        got = steps(tokens, rows)
        assert torch.equal(got, ref)
        assert torch.equal(cache.lengths, ref_cache.lengths)
        tokens = ref.argmax(-1)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        assert torch.equal(a, b)


def test_generate_decodes_what_the_checked_loop_decodes(model, monkeypatch):
    calls = []
    call = FusedSteps.__call__
    monkeypatch.setattr(FusedSteps, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    p = SamplingParams()
    fixed = list(decode(model, PROMPTS, 12, p, fixed_model=True))
    assert len(calls) == 11  # every step after the prefill's token
    checked = list(decode(model, PROMPTS, 12, p))
    assert len(calls) == 11  # the default loop checks the model each step instead
    assert fixed == checked and len(fixed) == 12


@torch.inference_mode()
def test_a_reset_plan_hands_back_to_model_forward(model):
    cache, tokens = prefilled(model, 1)
    steps = FusedSteps.start(model, cache)
    model.float()  # Model._apply resets the plan: the stack the runner holds may be stale
    lengths = cache.lengths.clone()
    assert steps(tokens, torch.arange(1)) is None
    assert torch.equal(cache.lengths, lengths)  # nothing done


@torch.inference_mode()
def test_where_it_does_not_start(model, tiny_dirs, monkeypatch):
    cache, _ = prefilled(model, 1)
    policy = PolicyCache.for_model(model, 1, SinkWindow(sinks=2, window=8), 40, 8)
    assert FusedSteps.start(model, policy) is None  # policy caches plan their own steps
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    assert FusedSteps.start(model, cache) is None  # the hook must run: model.forward's head
    handle.remove()
    handle = model.register_forward_pre_hook(lambda *a: None)
    assert FusedSteps.start(model, cache) is None  # a hook on the model (a profiler's timer) sees every step
    handle.remove()
    assert FusedSteps.start(model, cache) is not None
    model.fused_decode = False
    assert FusedSteps.start(model, cache) is None
    model.fused_decode = True
    fp32, _ = lf.load(tiny_dirs["llama"])  # a FastLinear fp32 head: the stack holds it too
    fp32_cache = KVCache.for_model(fp32, 1, 40)
    assert FusedSteps.start(fp32, fp32_cache) is not None
    plain_head(fp32)  # a plain nn.Linear head (F.linear): no ends
    assert FusedSteps.start(fp32, fp32_cache) is None
    monkeypatch.setattr(Rotary, "TABLE_POSITIONS", 16)  # the cache's 40 positions are past the table
    assert FusedSteps.start(model, cache) is None


def test_rotary_table_rows_are_forward_rows():
    rot = Rotary(16, 10000.0, None)
    table = rot.table(300)
    assert table.shape == (512, 2, 16)
    pos = torch.tensor([[0], [299]])
    cos, sin = rot(pos, torch.float32)
    assert torch.equal(table[pos][..., 0:1, :], cos) and torch.equal(table[pos][..., 1:2, :], sin)
    assert rot.table(Rotary.TABLE_POSITIONS + 1) is None
