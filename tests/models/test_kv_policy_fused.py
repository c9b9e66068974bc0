"""H2O on the fused C++ decode step (models/kv_replay.py): the decode steps it ran are replayed through
the module path before each eviction, so the scores and eviction decisions are the module path's."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.engine.generate import generate
from leanformer.models import kv_policy
from leanformer.models.fused import DecodePlan
from leanformer.models.kv_policy import HeavyHitters, PolicyCache, observe_queries

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def spies(monkeypatch):
    """Records every eviction's kept positions and counts the fused steps and the replays."""
    seen = {"keep": [], "fused": 0, "replays": 0}
    keep, run = PolicyCache._h2o_keep, DecodePlan.run

    def spy_keep(self, *a):
        out = keep(self, *a)
        seen["keep"].append([k.clone() for k in out])
        return out

    def spy_run(self, *a):
        out = run(self, *a)
        seen["fused"] += out is not None
        return out

    def spy_replay(model, cache, *a):
        before = [k.clone() for k in cache.k]
        replay(model, cache, *a)
        assert all(torch.equal(x, y) for x, y in zip(before, cache.k))  # read, never written
        seen["replays"] += 1

    replay = kv_policy.replay
    monkeypatch.setattr(PolicyCache, "_h2o_keep", spy_keep)
    monkeypatch.setattr(DecodePlan, "run", spy_run)
    monkeypatch.setattr(kv_policy, "replay", spy_replay)
    return seen


def _stream(model, policy, prompt, tokens, fused: bool):
    """Prefill `prompt`, then decode `tokens` one step each (teacher-forced: both paths see the same)."""
    cache = PolicyCache.for_model(model, 1, policy, len(prompt) + len(tokens), len(prompt))
    s = torch.tensor([0])
    model.fused_decode = fused
    try:
        with torch.inference_mode(), observe_queries(model, cache):
            for lo in range(0, len(prompt), cache.piece):
                piece = prompt[lo : lo + cache.piece]
                model(torch.tensor([piece]), cache=cache, slots=s)
                cache.advance(s, len(piece))
            for t in tokens:
                model(torch.tensor([[t]]), cache=cache, slots=s)
                cache.advance(s, 1)
            cache.catch_up()  # the steps since the last eviction: scored now
    finally:
        model.fused_decode = True
    return cache


@pytest.mark.parametrize("name,storage", [("llama", None), ("qwen2", "int8"), ("llama", "fp16")])
def test_fused_h2o_scores_and_evicts_as_the_module_path(tiny_dirs, spies, name, storage):
    model = lf.load(tiny_dirs[name])[0]
    if storage:
        lf.quantize_(model, lf.KVCache(dtype=storage))
    policy = HeavyHitters(24, sinks=2, chunk=5)
    prompt, tokens = ids(60, 5), ids(40, 6)
    modules = _stream(model, policy, prompt, tokens, fused=False)
    keep_modules, spies["keep"] = spies["keep"], []
    assert spies["fused"] == 0 and spies["replays"] == 0
    fused = _stream(model, policy, prompt, tokens, fused=True)
    # 40 decode steps, an eviction every 5: all but the first after the prompt replay 5 fused steps
    assert spies["fused"] == 40 and spies["replays"] == 8  # 7 evictions + catch_up()
    assert len(keep_modules) == 15  # the prompt evicts too: it is prefilled in pieces of 5
    for a, b in zip(keep_modules, spies["keep"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same positions kept, every layer/head
    n = int(fused.lengths[0])
    assert n == int(modules.lengths[0]) and torch.equal(fused.offsets, modules.offsets)
    for x, y in zip(fused.scores, modules.scores):
        assert torch.allclose(x[:, :, :n], y[:, :, :n], rtol=1e-4, atol=1e-4)


def test_fused_h2o_generates_what_the_module_path_does(tiny_dirs, spies):
    model = lf.load(tiny_dirs["llama"])[0]
    prompt, policy = ids(50, 7), HeavyHitters(20, sinks=2, chunk=4)
    fused = generate(model, None, prompt, max_new_tokens=50, ignore_eos=True, kv_policy=policy)
    assert spies["fused"] == 49 and spies["replays"] > 0
    model.fused_decode = False
    modules = generate(model, None, prompt, max_new_tokens=50, ignore_eos=True, kv_policy=policy)
    assert fused == modules


def test_fused_h2o_batch_of_unequal_prompts(tiny_dirs, spies):
    """Rows evict at different steps; each slot replays only its own unscored tokens."""
    model = lf.load(tiny_dirs["llama"])[0]
    prompts, policy = [ids(50, 8), ids(37, 9)], HeavyHitters(0.4, sinks=2, chunk=4)
    fused = generate(model, None, prompts, max_new_tokens=30, ignore_eos=True, kv_policy=policy)
    assert spies["replays"] > 0
    model.fused_decode = False
    assert generate(model, None, prompts, max_new_tokens=30, ignore_eos=True, kv_policy=policy) == fused
