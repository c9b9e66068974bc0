"""Continuous batching with a sliding window + sinks (engine/windowed.py): greedy outputs equal
lf.generate(..., kv_policy=SinkWindow(...)) for requests that run past the window and past the model's
context, for prompts longer than the cache, batched with others; slots are reused cleanly."""

from __future__ import annotations

import pytest

import leanformer as lf
from leanformer.engine.paged import build_scheduler, describe
from leanformer.engine.windowed import WindowScheduler
from leanformer.errors import LeanformerError
from leanformer.models.kv_policy import HeavyHitters, SinkWindow
from tests.engine.test_scheduler import make, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_dirs):
    return lf.load(tiny_dirs[request.param])[0]


def test_window_server_equals_generate_past_the_context(model):
    """Context 256; slots of 2 + 24 + 3 tokens; one request generates 300 tokens (past the context),
    one has a 60-token prompt (longer than the slot), the rest are short; 3 slots for 5 requests."""
    policy = SinkWindow(sinks=2, window=24)
    sched = WindowScheduler(model, None, n_slots=3, max_seq=400, policy=policy)
    assert sched.cache.max_seq == 2 + 24 + 3 and sched.max_seq == 400
    prompts = [[1, 5, 7], list(range(3, 63)), [4] * 9, [8, 6, 4, 2], [2, 3]]
    max_tokens = [300, 40, 10, 30, 50]
    jobs = [make(p, n) for p, n in zip(prompts, max_tokens)]
    for req, _ in jobs:
        sched.submit(req)
    run(sched, 5000)
    for (p, n), (_, sink) in zip(zip(prompts, max_tokens), jobs):
        assert sink.reason == "length"
        assert sink.tokens == lf.generate(model, None, p, max_new_tokens=n, ignore_eos=True, kv_policy=policy)
    assert sorted(sched.free) == [0, 1, 2]


def test_window_scheduler_checks(model):
    with pytest.raises(LeanformerError, match="exceed the model's context"):
        WindowScheduler(model, None, 2, 1000, SinkWindow(4, 300))
    with pytest.raises(LeanformerError, match="generate/chat only"):
        WindowScheduler(model, None, 2, 1000, HeavyHitters(16))
    sched = build_scheduler(model, None, "paged", 2, 100, None, None, 16, True, 256, 8, SinkWindow(4, 16))
    assert isinstance(sched, WindowScheduler) and "sliding window" in describe(sched)
    with pytest.raises(LeanformerError, match="context is 100 tokens"):
        sched.check(make([1, 2, 3], 98)[0])
