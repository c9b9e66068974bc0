"""The server-scheduler A/B on a CPU-time clock (measure/bench/spec_serve_ab.py), on stories260K."""

from __future__ import annotations

import pytest

from leanformer.measure.bench.spec_serve_ab import lengths, main, measure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_pairs_rounds_per_workload(shared):
    from leanformer.loading import load

    model, tok = load(shared / "models/stories260K")
    res = measure(model, tok, concurrency=2, requests=2, max_tokens=12, rounds=2)
    assert set(res) == {"input-grounded", "open-ended"}
    for r in res.values():
        assert len(r["ratios"]) == 2 and all(x > 0 for x in r["ratios"])
        assert r["speedup"] > 0 and 0.0 <= r["acceptance"] <= 1.0 and r["off_tok_per_cpu_s"] > 0


def test_staggered_lengths_spread_around_max_tokens():
    assert lengths(3, 96, False) == [96, 96, 96]
    assert lengths(5, 96, True) == [72, 84, 96, 108, 120]
    assert lengths(1, 96, True) == [96]


def test_staggered_run(shared):
    from leanformer.loading import load

    model, tok = load(shared / "models/stories260K")
    res = measure(model, tok, concurrency=2, requests=3, max_tokens=8, rounds=1, stagger=True)
    assert all(len(r["ratios"]) == 1 and r["off_tok_per_cpu_s"] > 0 for r in res.values())


def test_bad_counts_are_refused_at_parse_time():
    with pytest.raises(SystemExit):
        main(["stories260K", "--rounds", "0"])
