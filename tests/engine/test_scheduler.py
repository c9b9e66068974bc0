"""Continuous batching: outputs equal the same request served alone, slots and the queue stay bounded,
short requests overtake long ones, cancellation / timeouts free slots, the engine thread shuts down."""

from __future__ import annotations

import threading
import time

import pytest

import leanformer as lf
from leanformer.engine.cache import plan_cache
from leanformer.engine.runner import Engine
from leanformer.engine.scheduler import QueueFull, Request, Scheduler, ShuttingDown

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tiny_dirs):
    return lf.load(tiny_dirs[request.param])[0]


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return lf.load(tiny_dirs["llama"])[0]


@pytest.fixture(scope="module")
def stories(shared):
    return lf.load(shared / "models/stories260K")


class Sink:
    """Collects a request's outputs the way the server does (via its emit callback)."""

    def __init__(self) -> None:
        self.outs = []

    def __call__(self, out) -> None:
        self.outs.append(out)

    @property
    def done(self) -> bool:
        return bool(self.outs) and self.outs[-1].finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outs)

    @property
    def reason(self) -> str | None:
        return self.outs[-1].finish_reason if self.outs else None


def make(prompt, max_tokens, **kw) -> tuple[Request, Sink]:
    sink = Sink()
    return Request(list(prompt), max_tokens, emit=sink, **kw), sink


def run(sched: Scheduler, max_steps: int = 2000) -> int:
    steps = 0
    while sched.has_work() and steps < max_steps:
        sched.step()
        steps += 1
    assert not sched.has_work(), "scheduler did not drain"
    return steps


PROMPTS = [[1, 5, 7, 9, 11], [2, 3], [4] * 9, [8, 6, 4, 2], [3, 1, 4, 1, 5, 9, 2, 6], [7] * 20]


@pytest.mark.parametrize("chunk", [256, 3])
def test_batched_greedy_equals_alone(model, chunk):
    """More requests than slots, unequal prompts and lengths, chunked prefill: each equals generate()."""
    sched = Scheduler(model, None, n_slots=3, max_seq=64, prefill_chunk=chunk)
    jobs = [make(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]
    for req, _ in jobs:
        sched.submit(req)
    run(sched)
    for (req, sink), p in zip(jobs, PROMPTS):
        alone = lf.generate(model, None, p, max_new_tokens=req.max_tokens, ignore_eos=True)
        assert sink.tokens == alone and sink.reason == "length"
        assert sink.outs[-1].completion_tokens == req.max_tokens
    assert sorted(sched.free) == [0, 1, 2]


def test_seeded_sampling_equals_alone(model):
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    sched = Scheduler(model, None, n_slots=4, max_seq=64)
    jobs = [make(p, 10, params=lf.SamplingParams(**kw, seed=i)) for i, p in enumerate(PROMPTS[:4])]
    jobs.append(make(PROMPTS[4], 10))  # a greedy neighbour in the same batch
    for req, _ in jobs:
        sched.submit(req)
    run(sched)
    for i, ((_, sink), p) in enumerate(zip(jobs[:4], PROMPTS)):
        assert sink.tokens == lf.generate(model, None, p, max_new_tokens=10, ignore_eos=True, seed=i, **kw)


def test_short_request_overtakes_long(llama):
    sched = Scheduler(llama, None, n_slots=2, max_seq=128)
    long_req, long_sink = make([1, 2, 3], 100)
    sched.submit(long_req)
    sched.step()
    sched.step()
    short_req, short_sink = make([4, 5], 5)
    sched.submit(short_req)  # admitted between decode steps of the long one
    steps = 0
    while not short_sink.done:
        sched.step()
        steps += 1
    assert steps <= 6 and not long_sink.done
    assert sched.n_running == 1 and len(sched.free) == 1  # the short one's slot is free at once
    run(sched)


def test_slots_and_queue_are_bounded(llama):
    """Capacity is slots + queue: 2 slots and a queue of 3 take 5 requests even before the engine has
    admitted any (counting only the queue refused requests that arrived together while slots were
    free), refuse the 6th, and take one again as soon as one ends."""
    sched = Scheduler(llama, None, n_slots=2, max_seq=64, max_waiting=3)
    sinks = []
    for p in PROMPTS[:5]:
        req, sink = make(p, 20)
        sched.submit(req)
        sinks.append(sink)
    assert sched.capacity == 5 and sched.n_waiting == 5
    with pytest.raises(QueueFull):
        sched.submit(make([1], 5)[0])
    sched.step()  # admits 2: the other 3 still wait, the capacity is still full
    with pytest.raises(QueueFull):
        sched.submit(make([1], 5)[0])
    peak = 0
    while sched.has_work():
        sched.step()
        peak = max(peak, sched.n_running)
        assert sched.n_running + len(sched.free) == 2
    assert peak == 2 and all(s.reason == "length" for s in sinks)
    late, late_sink = make([1], 3)
    sched.submit(late)  # everything ended: room again
    run(sched)
    assert late_sink.reason == "length"


def test_context_overflow_is_refused(llama):
    sched = Scheduler(llama, None, n_slots=1, max_seq=32)
    with pytest.raises(lf.LeanformerError, match="context is 32 tokens.*30 in the prompt"):
        sched.submit(make([1] * 30, 5)[0])
    with pytest.raises(lf.LeanformerError, match="empty prompt"):
        sched.submit(make([], 5)[0])


def test_plan_cache_respects_budget(llama):
    a = llama.args
    per_slot = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 64 * 4
    assert plan_cache(llama, 16, 64, None) == (16, 64)
    assert plan_cache(llama, 16, 64, 3.5 * per_slot / 2**20) == (3, 64)
    assert plan_cache(llama, 16, 10**6, None)[1] == a.max_position_embeddings
    with pytest.raises(lf.LeanformerError, match="holds no sequence"):
        plan_cache(llama, 16, 64, 0.5 * per_slot / 2**20)


def test_cancel_and_timeout_free_slots(llama):
    sched = Scheduler(llama, None, n_slots=2, max_seq=128)
    a, a_sink = make([1, 2], 100)
    b, b_sink = make([3, 4], 100, timeout=0.05)
    c, c_sink = make([5, 6], 100)  # waits for a slot
    for r in (a, b, c):
        sched.submit(r)
    sched.step()
    sched.step()
    a.cancelled = True
    time.sleep(0.06)
    sched.step()
    assert a_sink.reason == "cancelled" and b_sink.reason == "timeout"
    assert not c_sink.done and sched.n_running == 1  # c took a freed slot in the same step
    c.cancelled = True
    sched.step()
    assert c_sink.reason == "cancelled" and not sched.has_work()


def test_logprobs(llama):
    sched = Scheduler(llama, None, n_slots=1, max_seq=64)
    req, sink = make([1, 2, 3], 4, logprobs=3)
    sched.submit(req)
    run(sched)
    for out in sink.outs:
        (lp,) = out.logprobs
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy: the chosen one is the top
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0


def test_text_stop_strings_and_eos(stories):
    model, tok = stories
    prompt = tok.encode("Once upon a time")
    expected = lf.generate(model, tok, "Once upon a time", max_new_tokens=60)
    stop = expected.split()[5]  # a word in the middle of the continuation
    sched = Scheduler(model, tok, n_slots=2, max_seq=256)
    plain, plain_sink = make(prompt, 60, stop_ids=frozenset({tok.eos_token_id}))
    stopped, stop_sink = make(prompt, 60, stop=[stop])
    sched.submit(plain)
    sched.submit(stopped)
    run(sched)
    assert plain_sink.text == expected
    assert stop_sink.text == lf.generate(model, tok, "Once upon a time", max_new_tokens=60, stop=stop)
    assert stop_sink.reason == "stop" and stop not in stop_sink.text


def test_engine_thread_and_shutdown(llama):
    engine = Engine(Scheduler(llama, None, n_slots=2, max_seq=256)).start()
    done = threading.Event()
    quick, quick_sink = make([1, 2, 3], 8)
    quick.emit = lambda out: (quick_sink(out), out.finish_reason and done.set())
    engine.submit(quick)
    assert done.wait(10) and quick_sink.reason == "length"
    endless, endless_sink = make([1, 2, 3], 250)
    engine.scheduler.model.forward = _slow(engine.scheduler.model.forward)
    try:
        engine.submit(endless)
        engine.shutdown(timeout=0.05)  # drains for 50 ms, then aborts what is left
    finally:
        del engine.scheduler.model.forward
    assert endless_sink.reason == "abort"
    with pytest.raises(ShuttingDown):
        engine.submit(make([1], 1)[0])


def _slow(forward):
    def slowed(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    return slowed


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_engine_survives_a_failing_step(llama):
    engine = Engine(Scheduler(llama, None, n_slots=1, max_seq=64)).start()
    try:
        bad, bad_sink = make([1, 2, 3], 5)
        good, good_sink = make([1, 2, 3], 5)
        llama.forward = _boom
        engine.submit(bad)
        deadline = time.monotonic() + 10
        while not bad_sink.done and time.monotonic() < deadline:
            time.sleep(0.01)
        del llama.forward
        engine.submit(good)
        while not good_sink.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bad_sink.reason == "error" and "boom" in bad_sink.outs[-1].error
        assert good_sink.reason == "length"
    finally:
        engine.shutdown(timeout=1)


def test_detokenizer_holds_back_partial_characters(stories):
    from leanformer.engine.detokenize import Detokenizer

    _, tok = stories
    ids = tok.encode("Émile ate ü and 日本", add_bos=False)
    d = Detokenizer(tok, [1], [])
    text = "".join(d.add(t)[0] for t in ids) + d.flush()
    assert text == tok.decode([1] + ids) and "\ufffd" not in text


def test_cache_memory_is_fixed(llama):
    sched = Scheduler(llama, None, n_slots=2, max_seq=64)
    before = sched.cache.nbytes()
    for p in PROMPTS:
        sched.submit(make(p, 10)[0])
    run(sched)
    assert sched.cache.nbytes() == before


def test_plan_cache_rejects_zero_batch_with_the_right_reason(tiny_dirs):
    from leanformer.errors import LeanformerError

    model, _ = lf.load(tiny_dirs["llama"])
    with pytest.raises(LeanformerError, match="--max-batch must be ≥ 1"):
        plan_cache(model, 0, 64, 2048)
