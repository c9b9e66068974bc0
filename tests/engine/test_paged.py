"""Paged KV cache + prefix caching: greedy outputs equal generate() / the static-slot scheduler (fp32 and
int8 KV, chunked prefill, requests waiting for blocks, prefix hits); blocks never leak; the prefix cache
is exact and evicts least recently used blocks first."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.engine.block_manager import BlockManager
from leanformer.engine.paged import PagedScheduler, plan_blocks
from leanformer.engine.scheduler import Scheduler
from leanformer.errors import LeanformerError
from leanformer.models.fused import DecodePlan
from tests.engine.test_scheduler import PROMPTS, make, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_dirs):
    return lf.load(tiny_dirs[request.param])[0]


@pytest.fixture(scope="module")
def stories(shared):
    return lf.load(shared / "models/stories260K")[0]


def serve_all(sched, prompts, max_tokens):
    jobs = [make(p, n) for p, n in zip(prompts, max_tokens)]
    for req, _ in jobs:
        sched.submit(req)
    run(sched)
    return [sink.tokens for _, sink in jobs]


def assert_no_leak(sched: PagedScheduler) -> None:
    bm = sched.blocks
    assert bm.n_free == bm.num_blocks and bm.reserved == 0 and all(r == 0 for r in bm.refs)
    assert sorted(sched.free) == list(range(sched.cache.n_slots))


@pytest.mark.parametrize("chunk, fused_decode", [(256, True), (3, True), (256, False)])
def test_paged_greedy_equals_generate(model, chunk, fused_decode, monkeypatch):
    """More requests than blocks for all at once (some wait), unequal prompts, chunked prefill; decode
    steps on the fused C++ step reading the pools in place (Llama) or (GPT-2, fused_decode off) the
    module path."""
    max_tokens = [6 + 3 * i for i in range(len(PROMPTS))]
    sched = PagedScheduler(
        model, None, max_batch=4, max_seq=64, num_blocks=14, block_size=4, prefill_chunk=chunk
    )
    fused = []
    run_fused, run_tokens = DecodePlan.run, DecodePlan.run_tokens

    def spy_tokens(*a):
        logits = run_tokens(*a)
        fused.extend([] if logits is None else [1])
        return logits

    monkeypatch.setattr(DecodePlan, "run", lambda *a: fused.append(1) or run_fused(*a))
    monkeypatch.setattr(DecodePlan, "run_tokens", spy_tokens)
    model.fused_decode = fused_decode
    try:
        got = serve_all(sched, PROMPTS, max_tokens)
    finally:
        model.fused_decode = True
    assert bool(fused) == (fused_decode and model.family != "gpt2")
    for p, n, tokens in zip(PROMPTS, max_tokens, got):
        assert tokens == lf.generate(model, None, p, max_new_tokens=n, ignore_eos=True)
    assert_no_leak(sched)


def test_decode_in_chunks_of_rows_equals_generate(stories):
    """decode_rows=2: five running requests decode as forwards of 2, 2 and 1 rows, outputs unchanged."""
    sched = PagedScheduler(stories, None, max_batch=5, max_seq=64, num_blocks=40, block_size=4)
    sched.decode_rows = 2
    got = serve_all(sched, PROMPTS[:5], [7] * 5)
    assert got == [lf.generate(stories, None, p, max_new_tokens=7, ignore_eos=True) for p in PROMPTS[:5]]
    assert set(sched.batch_sizes) <= {1, 2} and sched.batch_sizes[2] > 0
    assert_no_leak(sched)


def test_prefix_hit_prefills_only_the_rest(stories):
    system = [1] + list(range(30, 70))  # 41 tokens: 10 full blocks of 4 before the last token
    a, b = system + [80, 81], system + [90, 91, 92]
    sched = PagedScheduler(stories, None, max_batch=2, max_seq=128, num_blocks=40, block_size=4)
    first = serve_all(sched, [a], [10])[0]
    prefilled = sched.prompt_tokens_total
    second = serve_all(sched, [b], [10])[0]
    assert sched.blocks.hit_tokens == 40 and sched.prompt_tokens_total - prefilled == len(b) - 40
    again = serve_all(sched, [a], [10])[0]  # the same prompt: everything but its last block is cached
    assert first == again == lf.generate(stories, None, a, max_new_tokens=10, ignore_eos=True)
    assert second == lf.generate(stories, None, b, max_new_tokens=10, ignore_eos=True)
    assert sched.blocks.query_tokens == len(a) * 2 + len(b)
    assert_no_leak(sched)


def test_generated_blocks_are_cached_too(stories):
    """A follow-up whose prompt is an earlier prompt + its reply (a chat's next turn) hits both."""
    sched = PagedScheduler(stories, None, max_batch=2, max_seq=128, num_blocks=40, block_size=4)
    p = [1, 5, 9, 13, 17, 21]
    reply = serve_all(sched, [p], [20])[0]
    turn2 = p + reply + [7, 8]
    hits = sched.blocks.hit_tokens
    out = serve_all(sched, [turn2], [5])[0]
    assert (
        sched.blocks.hit_tokens - hits == (len(p) + 19) // 4 * 4
    )  # the last reply token's KV was never computed
    assert out == lf.generate(stories, None, turn2, max_new_tokens=5, ignore_eos=True)


@pytest.mark.parametrize("kv,store", [("int8", torch.int8), ("fp16", torch.float16)])
def test_stored_kv_parity_with_static_slots(tiny_dirs, kv, store):
    model, _ = lf.load(tiny_dirs["llama"])
    lf.quantize_(model, lf.KVCache(dtype=kv))
    prompts, n = PROMPTS[:4] + [PROMPTS[0] + [3, 3]], [8] * 5
    static = serve_all(Scheduler(model, None, n_slots=2, max_seq=64), prompts, n)
    sched = PagedScheduler(model, None, max_batch=3, max_seq=64, num_blocks=40, block_size=2)
    assert sched.cache.quantized == (kv == "int8") and sched.cache.k_pool[0].dtype == store
    assert serve_all(sched, prompts[:4], n[:4]) + serve_all(sched, prompts[4:], n[4:]) == static
    assert sched.blocks.hit_tokens == 4  # the 5th reads the 1st one's first two blocks
    assert_no_leak(sched)


def test_too_long_for_the_pool_is_refused_and_waiting_is_fifo(stories):
    sched = PagedScheduler(stories, None, max_batch=4, max_seq=64, num_blocks=6, block_size=4)
    with pytest.raises(LeanformerError, match="KV cache holds 24 tokens"):
        sched.check(make([1, 2, 3], 30)[0])
    jobs = [make([1, 2 + i] + [3] * 15, 4) for i in range(3)]  # prompt + first token: 5 blocks each
    for req, _ in jobs:
        sched.submit(req)
    sched.step()
    assert sched.n_running == 1 and sched.n_waiting == 2
    run(sched)
    assert all(s.reason == "length" and len(s.tokens) == 4 for _, s in jobs)
    assert_no_leak(sched)


def test_preemption_many_long_requests_in_few_blocks(stories):
    """Blocks are taken as tokens come: 6 requests are admitted on 2 blocks each, run out of blocks,
    and the newest are preempted and recomputed; every output equals the request served alone."""
    prompts = [[1, 9 + i, 30 + i, 7] for i in range(6)]
    sched = PagedScheduler(stories, None, max_batch=6, max_seq=64, num_blocks=16, block_size=4)
    got = serve_all(sched, prompts, [40] * 6)
    assert sched.preemptions_total > 0
    assert got == [lf.generate(stories, None, p, max_new_tokens=40, ignore_eos=True) for p in prompts]
    assert_no_leak(sched)
    assert not sched.preempted


def test_block_manager_lru_refcounts_and_exact_keys():
    bm = BlockManager(num_blocks=4, block_size=2)
    t1 = bm.admit([1, 2, 3, 4, 5], 6)  # 3 blocks reserved, none cached yet
    bm.grow(t1, 5)
    bm.register(t1, [1, 2, 3, 4, 5], 5)  # blocks [1,2] and [3,4] are full and computed
    assert bm.n_cached == 2 and bm.n_used == 3
    assert bm.admit([9, 9, 9, 9, 9], 6) is None  # 3 more blocks do not fit
    t2 = bm.admit([1, 2, 3, 4, 7], 5)  # shares 2 blocks: needs 1 more
    assert t2.blocks == t1.blocks[:2] and bm.refs[t1.blocks[0]] == 2 and bm.hit_tokens == 4
    bm.release(t1)
    bm.release(t2)
    assert bm.n_free == 4 and bm.reserved == 0 and bm.n_cached == 2
    assert bm._lookup([1, 2, 8, 8, 8]) != [] and bm._lookup([2, 1, 3, 4, 5]) == []  # exact, by position
    t3 = bm.admit([5, 6, 7, 8, 9], 8)  # needs every block: the cached ones are evicted
    bm.grow(t3, 8)
    assert bm.n_cached == 0 and bm._lookup([1, 2, 3, 4, 5]) == []
    with pytest.raises(LeanformerError, match="no free KV block"):  # the scheduler preempts first
        bm.grow(t3, 9)


def test_plan_blocks(stories):
    per_seq = 64 // 16
    assert plan_blocks(stories, 64, 16, None, None, max_batch=3) == 3 * per_seq
    assert plan_blocks(stories, 64, 16, None, 10, max_batch=3) == 10
    assert 4 <= plan_blocks(stories, 64, 16, 0.15, None, max_batch=3) < 3 * per_seq
    with pytest.raises(LeanformerError, match="kv-blocks 2 cannot hold one sequence"):
        plan_blocks(stories, 64, 16, None, 2, max_batch=3)
    with pytest.raises(LeanformerError, match="raise --kv-budget-mb"):
        plan_blocks(stories, 64, 16, 1e-6, None, max_batch=3)
