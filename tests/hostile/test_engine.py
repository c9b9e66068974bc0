"""Engine faults in one request end that request alone (issue #10): a seed torch refuses at admission,
a batched forward or a sampling step that raises for one row, extreme sampling values that made NaN
probabilities; the engine's health report; SamplingParams refusing NaN / inf and bad seeds."""

from __future__ import annotations

import time

import pytest

import leanformer as lf
from leanformer.engine.runner import Engine
from leanformer.engine.scheduler import Scheduler
from tests.engine.test_scheduler import make, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return lf.load(tiny_dirs["llama"])[0]


def _drain(sched: Scheduler, sinks, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(s.done for s in sinks):
            return
        sched.step()
    raise AssertionError("requests did not finish")


def test_a_seed_torch_refuses_fails_only_that_request(llama):
    """A seed that passed validation but that torch refuses at admission (here a SamplingParams whose
    seed was changed after it was checked) ends that request with an error and gives its slot back."""
    sched = Scheduler(llama, None, n_slots=1, max_seq=64)
    bad_params = lf.SamplingParams(temperature=1.0, seed=1)
    bad_params.seed = 2**70  # as if validation had been skipped
    bad, bad_sink = make([1, 2, 3], 5, params=bad_params)
    good, good_sink = make([1, 2, 3], 5)
    sched.submit(bad)
    sched.submit(good)
    _drain(sched, [bad_sink, good_sink])
    assert bad_sink.reason == "error" and "internal error" in bad_sink.outs[-1].error
    assert good_sink.tokens == lf.generate(llama, None, [1, 2, 3], max_new_tokens=5, ignore_eos=True)
    assert sched.errors["admit"] == 1 and sched.free == [0] and not sched.has_work()


def test_a_failing_row_in_a_batched_forward_fails_only_its_request(llama, monkeypatch):
    """The batched forward raises whenever token 77 is in it: retried row by row, only the request
    with that token fails; the other rows' outputs equal generate() alone."""
    forward = llama.forward

    def picky(ids, *args, **kwargs):
        if bool((ids == 77).any()):
            raise RuntimeError("bad row")
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(llama, "forward", picky)
    sched = Scheduler(llama, None, n_slots=3, max_seq=64)
    jobs = [make([1, 2, 3], 6), make([5, 77, 9], 6), make([4, 4], 6)]
    for req, _ in jobs:
        sched.submit(req)
    _drain(sched, [sink for _, sink in jobs])
    monkeypatch.undo()
    (_, a), (_, bad), (_, c) = jobs
    assert bad.reason == "error" and "bad row" in bad.outs[-1].error
    assert a.tokens == lf.generate(llama, None, [1, 2, 3], max_new_tokens=6, ignore_eos=True)
    assert c.tokens == lf.generate(llama, None, [4, 4], max_new_tokens=6, ignore_eos=True)
    assert sched.errors["prefill"] == 1 and sorted(sched.free) == [0, 1, 2]


def test_a_failing_sample_fails_only_its_row(llama, monkeypatch):
    import leanformer.engine.scheduler as scheduler_module

    real = scheduler_module.sample

    def sample(logits, params, generator, seen):
        if params.seed == 13:
            raise RuntimeError("sampling exploded")
        return real(logits, params, generator, seen)

    monkeypatch.setattr(scheduler_module, "sample", sample)
    sched = Scheduler(llama, None, n_slots=3, max_seq=64)
    kw = dict(temperature=0.8, top_k=5)
    jobs = [make([1, 2], 6), make([1, 2], 6, params=lf.SamplingParams(**kw, seed=13))]
    jobs.append(make([3, 4], 6, params=lf.SamplingParams(**kw, seed=2)))
    for req, _ in jobs:
        sched.submit(req)
    _drain(sched, [sink for _, sink in jobs])
    (_, greedy), (_, bad), (_, seeded) = jobs
    assert bad.reason == "error" and "sampling exploded" in bad.outs[-1].error
    assert greedy.tokens == lf.generate(llama, None, [1, 2], max_new_tokens=6, ignore_eos=True)
    expected = lf.generate(llama, None, [3, 4], max_new_tokens=6, ignore_eos=True, seed=2, **kw)
    assert seeded.tokens == expected
    assert sched.errors["sample"] == 1 and sorted(sched.free) == [0, 1, 2]


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1e-45),
        dict(temperature=1.0, top_p=1e-300),
        dict(temperature=1.0, repetition_penalty=1e-300),
        dict(temperature=1.0, repetition_penalty=1e300),
        dict(temperature=2.0, top_k=10**12, top_p=1e-300, repetition_penalty=1e-300),
    ],
)
def test_extreme_sampling_values_run_in_the_scheduler(llama, kw):
    sched = Scheduler(llama, None, n_slots=2, max_seq=64)
    odd, odd_sink = make([1, 2, 3], 8, params=lf.SamplingParams(**kw, seed=3))
    plain, plain_sink = make([1, 2, 3], 8)
    sched.submit(odd)
    sched.submit(plain)
    run(sched)
    assert odd_sink.reason == "length" and len(odd_sink.tokens) == 8
    assert plain_sink.tokens == lf.generate(llama, None, [1, 2, 3], max_new_tokens=8, ignore_eos=True)
    assert odd_sink.tokens == lf.generate(
        llama, None, [1, 2, 3], max_new_tokens=8, ignore_eos=True, seed=3, **kw
    )


def test_engine_health_reports_a_dead_thread_and_a_stuck_step(llama):
    engine = Engine(Scheduler(llama, None, n_slots=1, max_seq=64))
    assert engine.problem(1.0) is None  # not started yet: nothing to report
    engine.start()
    try:
        assert engine.problem(1.0) is None and not engine.dead
        engine.step_started = time.monotonic() - 5  # as if one step had been running for 5 s
        assert "running for 5 s" in engine.problem(1.0)
        engine.step_started = None
    finally:
        engine.shutdown(timeout=1)
    assert not engine.dead  # stopped on purpose
    engine._stop = False  # as if the thread had died on its own
    assert engine.dead and "not running" in engine.problem(1.0)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(seed=2**63), "seed"),
        (dict(seed=-1), "seed"),
        (dict(seed=True), "seed"),
        (dict(top_k=2.5), "top_k"),
    ],
)
def test_sampling_params_refuse_non_finite_values_and_bad_seeds(kw, field):
    with pytest.raises(lf.LeanformerError, match=f"^{field} must be"):
        lf.SamplingParams(**kw)


def test_max_new_tokens_below_zero_is_refused_and_zero_generates_nothing(llama):
    model = llama
    with pytest.raises(lf.LeanformerError, match="max_new_tokens must be >= 0, got -1"):
        lf.generate(model, None, [3, 14, 15], max_new_tokens=-1)
    with pytest.raises(lf.LeanformerError, match="max_new_tokens must be >= 0"):
        list(lf.stream_generate(model, None, [3, 14, 15], max_new_tokens=-3))
    assert lf.generate(model, None, [3, 14, 15], max_new_tokens=0) == []


@pytest.mark.parametrize(
    "prompt, message",
    [
        (None, "got NoneType"),
        ([1.5, 2.0], "got float"),  # floats were taken for a batch of prompts
        ([3, 1.5], "got 1.5 in it"),  # int(1.5) would have truncated silently
        ([3, True], "got True in it"),
        ([[3], None], "got NoneType"),
    ],
)
def test_prompts_that_are_not_text_chats_or_ids_are_refused_in_one_line(llama, prompt, message):
    with pytest.raises(lf.LeanformerError, match=message):
        lf.generate(llama, None, prompt, max_new_tokens=2)


def test_numpy_ids_are_prompts_like_lists(llama):
    np = pytest.importorskip("numpy")
    want = lf.generate(llama, None, [[3, 14, 15], [3, 4, 5]], max_new_tokens=3, ignore_eos=True)
    assert lf.generate(llama, None, np.array([3, 14, 15]), max_new_tokens=3, ignore_eos=True) == want[0]
    assert lf.generate(llama, None, list(np.array([3, 14, 15])), max_new_tokens=3, ignore_eos=True) == want[0]
    assert (
        lf.generate(llama, None, np.array([[3, 14, 15], [3, 4, 5]]), max_new_tokens=3, ignore_eos=True)
        == want
    )


def test_stream_generate_checks_its_prompt_like_generate(llama):
    np = pytest.importorskip("numpy")
    want = lf.generate(llama, None, [3, 14, 15], max_new_tokens=3, ignore_eos=True)
    assert (
        list(lf.stream_generate(llama, None, np.array([3, 14, 15]), max_new_tokens=3, ignore_eos=True))
        == want
    )
    for prompt, message in (
        (None, "got NoneType"),
        ([3, 1.5], "got 1.5 in it"),
        ([[3], [4]], "takes one prompt"),
    ):
        with pytest.raises(lf.LeanformerError, match=message):
            list(lf.stream_generate(llama, None, prompt, max_new_tokens=2))


def test_what_is_not_a_decoder_is_refused_in_one_line():
    from torch import nn

    for f in (lf.generate, lambda m, t, p: list(lf.stream_generate(m, t, p))):
        with pytest.raises(
            lf.LeanformerError, match="generate takes a decoder model from lf.load, got a Linear"
        ):
            f(nn.Linear(4, 4), None, [1, 2])
