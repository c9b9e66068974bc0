"""Engines taking turns (measure/bench/turns.py): the order of turns, drift landing on every engine
alike, failures as rows, the memory guard, and the child-process protocol (peer_worker.serve)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from leanformer.measure.bench import turns
from leanformer.measure.bench.peer_worker import Engine
from leanformer.measure.bench.runner import BenchConfig
from leanformer.measure.bench.turns import Contender, EngineProcess, InProcess, take_turns


class Machine:
    """A fake host whose speed drifts: the k-th timed call runs at slowdown(k)."""

    def __init__(self, slowdown) -> None:
        self.calls: list[tuple[str, str]] = []
        self.slowdown = slowdown

    def engine(self, name: str, step_s: float) -> Engine:
        machine = self

        class Fake(Engine):
            vocab, size_bytes = 100, 1 << 20

            def prefill(self, ids):
                machine.calls.append((name, "prefill"))

            def steps(self, ids, n):
                machine.calls.append((name, f"decode{len(ids)}"))
                return [step_s * len(ids) ** 0.5 * machine.slowdown(len(machine.calls))] * (n - 1)

        return Fake()


def _contender(cfg: BenchConfig, name: str, make) -> Contender:
    from dataclasses import asdict

    def start():
        conn = InProcess(make, asdict(cfg))
        return conn, conn.ready

    return Contender({"engine": name, "label": name, "dtype": "x"}, start)


@pytest.fixture
def no_gap_or_ceiling(monkeypatch):
    monkeypatch.setattr(turns, "bandwidth_ceiling_tok_s", lambda nbytes, repeats, buf=None: 1000.0)
    monkeypatch.setattr(turns, "GAP_S", 0.0)


def test_engines_take_turns_in_rotating_order(no_gap_or_ceiling):
    machine = Machine(lambda k: 1.0)
    cfg = BenchConfig("m", prompt_tokens=4, new_tokens=3, batches=[1, 2], repeats=2)
    a = _contender(cfg, "a", lambda: machine.engine("a", 0.01))
    b = _contender(cfg, "b", lambda: machine.engine("b", 0.02))
    rows = take_turns(cfg, [a, b], gap_s=0.0)
    warm = [("a", "prefill"), ("a", "prefill"), ("a", "decode1"), ("a", "decode2")]
    warm += [("b", "prefill"), ("b", "prefill"), ("b", "decode1"), ("b", "decode2")]
    round0 = [("a", "prefill"), ("b", "prefill"), ("a", "prefill"), ("b", "prefill")]
    round0 += [("a", "decode1"), ("b", "decode1"), ("a", "decode2"), ("b", "decode2")]
    round1 = [(("b" if n == "a" else "a"), op) for n, op in round0]  # the other engine goes first
    assert machine.calls == warm + round0 + round1
    assert rows[0]["decode_tok_s_b1"] == pytest.approx(100) and rows[1]["decode_tok_s_b1"] == pytest.approx(
        50
    )
    assert rows[0]["rounds"]["decode_tok_s_b2"] == pytest.approx([2 / 0.01 / 2**0.5] * 2)
    assert rows[0]["ceiling_tok_s"] == 1000.0 and rows[0]["peak_rss_mb"] > 0 and rows[0]["group"] == 0


def test_drift_lands_on_every_engine_alike(no_gap_or_ceiling):
    """The host halves its speed after the first half of the calls: taking turns, both engines see
    both halves and their ratio stays 2; one at a time, the first engine gets all the fast spell."""

    def ratio(together: bool) -> float:
        machine = Machine(lambda k: 1.0 if k <= 26 else 2.0)
        cfg = BenchConfig("m", prompt_tokens=4, new_tokens=9, batches=[1], repeats=6)
        a = _contender(cfg, "a", lambda: machine.engine("a", 0.01))
        b = _contender(cfg, "b", lambda: machine.engine("b", 0.02))
        rows = take_turns(cfg, [a, b], together=together, gap_s=0.0)
        per_round = [
            x / y for x, y in zip(rows[0]["rounds"]["decode_tok_s_b1"], rows[1]["rounds"]["decode_tok_s_b1"])
        ]
        if together:
            assert per_round == pytest.approx([2.0] * 6)
        return rows[0]["decode_tok_s_b1"] / rows[1]["decode_tok_s_b1"]

    assert ratio(True) == pytest.approx(2.0)
    assert ratio(False) == pytest.approx(4.0)  # the bias the turns remove


def test_an_engine_failing_mid_run_is_a_row_and_the_others_finish(no_gap_or_ceiling):
    machine = Machine(lambda k: 1.0)
    cfg = BenchConfig("m", prompt_tokens=4, new_tokens=3, batches=[1, 8], repeats=2)

    def flaky():
        eng = machine.engine("flaky", 0.01)
        good = eng.steps

        def steps(ids, n):
            if len(ids) == 8:
                raise RuntimeError("llama_decode failed")
            return good(ids, n)

        eng.steps = steps
        return eng

    def unloadable():
        raise RuntimeError("could not load")

    ok = _contender(cfg, "ok", lambda: machine.engine("ok", 0.01))
    rows = take_turns(cfg, [_contender(cfg, "flaky", flaky), _contender(cfg, "bad", unloadable), ok])
    assert "decode failed: RuntimeError: llama_decode failed" in rows[0]["error"]
    assert "could not load" in rows[1]["error"]
    assert "error" not in rows[2] and rows[2]["decode_tok_s_b8"] > 0
    refused = Contender({"engine": "x", "label": "x", "dtype": "x", "error": "not installed"}, start=None)
    assert take_turns(cfg, [refused])[0]["error"] == "not installed"


def test_engines_memory_cannot_hold_together_run_in_groups(no_gap_or_ceiling, monkeypatch):
    from leanformer.cli.bench import round_notes

    monkeypatch.setattr(turns, "_mem_available_mb", lambda: 1.0)  # nothing fits beside a loaded engine
    machine = Machine(lambda k: 1.0)
    cfg = BenchConfig("m", prompt_tokens=4, new_tokens=3, batches=[1], repeats=2)
    cs = [_contender(cfg, n, lambda n=n: machine.engine(n, 0.01)) for n in ("leanformer", "peer")]
    rows = take_turns(cfg, cs)
    assert [r["group"] for r in rows] == [0, 1]
    assert machine.calls[:6] == [("leanformer", op) for op in ["prefill", "prefill", "decode1"] * 2]
    assert round_notes(rows, [1]) == []  # no per-round ratio across groups: they did not run together
    monkeypatch.setattr(turns, "_mem_available_mb", lambda: 1e9)
    machine.calls.clear()
    rows = take_turns(
        cfg, [_contender(cfg, n, lambda n=n: machine.engine(n, 0.01)) for n in ("leanformer", "peer")]
    )
    assert round_notes(rows, [1]) == [
        "leanformer / peer, decode batch 1, per round: median 1.00× (1.00–1.00× over 2 rounds)"
    ]


def _child(tmp_path, body: str, timeout_s: float = 60) -> EngineProcess:
    """A child serving peer_worker.serve's protocol around a fake engine defined in `body`."""
    from leanformer.measure.bench import peer_worker

    script = tmp_path / "child.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(peer_worker.__file__.rsplit('/', 1)[0])!r})\n"
        "from peer_worker import Engine, serve\n" + textwrap.dedent(body)
    )
    return EngineProcess([sys.executable, str(script)], timeout_s=timeout_s)


def test_child_protocol_survives_library_prints_on_stdout(tmp_path):
    proc = _child(
        tmp_path,
        """
        class Noisy(Engine):
            vocab, size_bytes = 50, 2**20
            def __init__(self):
                print("loading... (a library writing to stdout)")
            def prefill(self, ids):
                import os; os.write(1, b"C-level chatter on fd 1\\n")
            def steps(self, ids, n):
                print("step!")
                return [0.001] * (n - 1)
        serve(Noisy, {"prompt_tokens": 4, "new_tokens": 5})
        """,
    )
    try:
        ready = proc.answer()
        assert ready["size_mb"] == 1.0 and ready["load_s"] >= 0 and ready["rss_mb"] > 0
        assert proc.ask({"op": "prefill"})["s"] >= 0
        assert proc.ask({"op": "decode", "batch": 3})["steps"] == [0.001] * 4
        with pytest.raises(RuntimeError, match="unknown request"):
            proc.ask({"op": "dance"})
        assert proc.ask({"op": "end"})["peak_rss_mb"] > 0
    finally:
        proc.close()


@pytest.mark.parametrize(
    "body, reason",
    [
        ("import os; os.abort()", "killed by signal 6"),
        ("import time; time.sleep(30)", "no answer in 1 s"),
        (
            'print(\'{"load_s": 0, "size_mb": 1, "rss_mb": 1}\'); import sys; sys.stdin.readline(); raise SystemExit(\'gone\')',
            "gone",
        ),
        ("print('not json', flush=True)", "unreadable answer"),
    ],
)
def test_child_failures_say_why(tmp_path, body, reason):
    proc = _child(tmp_path, body, timeout_s=1)
    try:
        with pytest.raises(RuntimeError, match=reason):
            proc.answer()
            proc.ask({"op": "prefill"})
    finally:
        proc.close()


def test_process_contender_end_to_end(tmp_path, no_gap_or_ceiling):
    """start_process → a real child through the whole schedule; its row has every figure."""
    script = tmp_path / "serve.py"
    from leanformer.measure.bench import peer_worker

    script.write_text(
        f"import sys; sys.path.insert(0, {str(peer_worker.__file__.rsplit('/', 1)[0])!r})\n"
        "import json; from peer_worker import Engine, serve\n"
        "class E(Engine):\n    vocab, size_bytes = 50, 2**20\n    def prefill(self, ids): pass\n"
        "    def steps(self, ids, n): return [0.002] * (n - 1)\n"
        "serve(E, json.loads(sys.argv[1]))\n"
    )
    cfg = BenchConfig("m", prompt_tokens=4, new_tokens=3, batches=[1, 4], repeats=2)
    from dataclasses import asdict

    argv = [sys.executable, str(script), json.dumps(asdict(cfg))]
    row = take_turns(
        cfg, [Contender({"engine": "e", "label": "e", "dtype": "x"}, turns.start_process(argv, "e"))]
    )[0]
    assert row["decode_tok_s_b1"] == pytest.approx(500) and row["decode_tok_s_b4"] == pytest.approx(2000)
    assert row["prefill_ms"] >= 0 and row["peak_rss_mb"] > 0 and "error" not in row


def test_ceiling_reads_a_kept_buffer_or_its_own():
    buf = turns.sum_buffer(8 << 20)
    assert buf.numel() == 2 << 20 and float(buf[:4].sum()) == 4.0
    assert turns.bandwidth_ceiling_tok_s(4 << 20, 1, buf) > 0  # the first 4 MB of the kept buffer
    assert turns.bandwidth_ceiling_tok_s(16 << 20, 1, buf) > 0  # larger than the kept one: its own
