"""The speculative bench's --profile: each step's forward time apart from the rest, per row count."""

from __future__ import annotations

import pytest

import leanformer as lf
from leanformer.measure.bench import speculative as sb

pytestmark = pytest.mark.usefixtures("one_thread")


def test_profile_splits_forward_from_the_rest(shared):
    model, tok = lf.load(shared / "models" / "stories260K")
    cfg = sb.SpecBenchConfig(new_tokens=24, rounds=1, prompts=1, profile=True)
    cfg.methods = {"prompt-lookup": "prompt-lookup"}
    rows = sb.run(model, tok, cfg)
    assert {(r["workload"], r["method"]) for r in rows} == {
        (w, m) for w in ("input-grounded", "open-ended") for m in ("plain", "prompt-lookup")
    }
    for r in rows:
        assert r["forward_ms"] > 0 and r["other_us"] >= 0  # the forwards lie inside the timed steps
        counted = sum(n for n, _ in r["rows"].values())
        steps = r["new_tokens"] - 1  # one prompt, one round: every decode step is one forward
        assert counted <= steps and all(ms > 0 for _, ms in r["rows"].values())
    plain = [r for r in rows if r["method"] == "plain"]
    assert all(set(r["rows"]) == {1} for r in plain)  # plain decoding: one-row steps only
    assert not model._forward_hooks and not model._forward_pre_hooks  # the timer leaves no hook behind
