"""Engines taking turns: how `leanformer bench` measures ours and the peers in one run.

Each engine loads once in its own process (so its peak RSS is its own) and then they take turns round
by round, the order rotating each round: round r times a prefill, a time to first token and one
generation per batch size from every engine, one engine after the other, and the memory-bandwidth
ceiling once (one pass's rate; each row's ceiling = that rate / its weight bytes). A shared VM's drift
(its bandwidth moved by a third between two processes minutes apart) then lands on every engine alike
instead of on whichever ran during the slow spell. Figures pool the rounds: decode tokens/s = batch /
the median step of all rounds' generations, prefill and TTFT the median over rounds, the ceiling the
median of the rounds' ceilings; each row also keeps its per-round decode rates and ceilings, so a ratio
can be read round by round.

An engine that fails to load, crashes or answers an error becomes a row with the reason; the others go
on. When memory would not hold the next engine beside the ones already loaded, the loaded ones finish
their rounds first and the rest take turns afterwards (each row says which group it ran in).
"""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from leanformer.models.huge_pages import huge_empty

TIMEOUT_S = 1800  # one answer (a load, a generation); a hung engine must not hang the run
GAP_S = 0.2  # between two engines' turns: the previous one's idle threads stop spinning
MEMORY_HEADROOM = 1.5  # the next engine starts beside the loaded ones if MemAvailable > this × largest RSS


def decode_rate(step_times: Sequence[Sequence[float]], batch: int) -> float:
    """Decode tokens/s from per-step timings (seconds) of one or more runs: `batch` tokens per step over
    the median step of all runs pooled, so a slow warm-up run or a few stalled steps leave it alone."""
    steps = [t for run in step_times for t in run]
    if not steps:
        raise ValueError("no decode steps were timed: generate at least 2 tokens")
    return batch / statistics.median(steps)


CEILING_BUFFER_BYTES = 1 << 30  # far past any last-level cache; a 30 GB model needs no 30 GB buffer


def sum_buffer(nbytes: int) -> torch.Tensor:
    """float32 ones over min(nbytes, 1 GiB), in huge pages where the kernel offers them, as our weights
    lie (models/huge_pages.py): a sum over 4 KB pages read 10-30% slower on Zen 4, a ceiling our own
    decode could then pass."""
    n = max(min(nbytes, CEILING_BUFFER_BYTES) // 4, 1)
    raw = huge_empty(4 * n)
    return raw.view(torch.float32).fill_(1.0) if raw is not None else torch.ones(n)


def bandwidth_ceiling_tok_s(nbytes: int, repeats: int, buf: torch.Tensor | None = None) -> float:
    """Batch-1 decode reads every weight once per token, so tokens/s can't beat streaming `nbytes`
    from memory: the best of max(repeats, 7) timed torch.sum passes over sum_buffer(nbytes) (or the
    first min(nbytes, 1 GiB) bytes of `buf`, one kept across calls), in this process (other tenants only
    slow a pass down, so the best one is the ceiling)."""
    n = max(min(nbytes, CEILING_BUFFER_BYTES) // 4, 1)
    buf = sum_buffer(nbytes) if buf is None or buf.numel() < n else buf[:n]
    buf.sum()  # warm-up: first touch
    times = []
    for _ in range(max(repeats, 7)):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / min(times) / max(nbytes, 1)


class Connection(Protocol):
    def ask(self, request: dict) -> dict: ...  # raises RuntimeError with the reason

    def close(self) -> None: ...


def last_line(text: str) -> str:
    """The last non-blank line (progress bars redraw with \r: the last redraw counts)."""
    lines = [ln.split("\r")[-1] for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    return lines[-1] if lines else "no output"


class EngineProcess:
    """A child process serving peer_worker.serve's protocol; every failure a RuntimeError saying why."""

    def __init__(self, argv: list[str], timeout_s: float = TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process: close())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _failed(self) -> RuntimeError:
        rc = self.proc.wait()
        if rc < 0:
            return RuntimeError(f"killed by signal {-rc}")
        self._err.seek(0)
        return RuntimeError(last_line(self._err.read())[:300] if rc else "exited without answering")

    def answer(self) -> dict:
        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"no answer in {self.timeout_s:.0f} s") from None
        if line is None:
            raise self._failed()
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            self.close()
            raise RuntimeError(f"unreadable answer ({e}): {line.strip()[:100]}") from None
        if "error" in doc:
            raise RuntimeError(doc["error"])
        return doc

    def ask(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failed() from None
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()


class InProcess:
    """The same protocol answered in this process (tests; a caller that already holds the engine)."""

    def __init__(self, make: Callable[[], object], cfg: dict) -> None:
        from leanformer.measure.bench import peer_worker

        self.cfg, self._worker = cfg, peer_worker
        t0 = time.perf_counter()
        try:
            self.engine = make()
        except Exception as e:  # as serve() answers it: a row with the reason
            raise RuntimeError(peer_worker.reason(e)) from e
        self.ready = {"load_s": time.perf_counter() - t0, "size_mb": self.engine.size_bytes / 2**20}
        self.ready["rss_mb"] = peer_worker.rss_now_mb()

    def ask(self, request: dict) -> dict:
        try:
            return self._worker.handle(self.engine, self.cfg, request)
        except Exception as e:
            raise RuntimeError(self._worker.reason(e)) from e

    def close(self) -> None:
        pass


@dataclass
class Contender:
    """One engine of a run: its row (engine, label, dtype, ... and at the end the figures or "error")
    and how to start it: a callable returning (connection, its load answer)."""

    row: dict
    start: Callable[[], tuple[Connection, dict]] | None  # None: the row already says why not
    conn: Connection | None = None
    times: dict = field(default_factory=dict)  # "prefill" / "ttft" / batch → per-round values

    def fail(self, reason: str) -> None:
        self.row["error"] = reason
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _turn(c: Contender, request: dict) -> dict | None:
    try:
        return c.conn.ask(request)
    except RuntimeError as e:
        c.fail(f"{request['op']} failed: {e}")
        return None


def _requests(batches: list[int]) -> list[tuple[object, dict]]:
    return [("prefill", {"op": "prefill"}), ("ttft", {"op": "ttft"})] + [
        (b, {"op": "decode", "batch": b}) for b in batches
    ]


def _rounds(group: list[Contender], batches: list[int], repeats: int, gap_s: float, ceiling) -> None:
    """Warm-up, then `repeats` rounds in rotating order, then each engine's peak RSS."""
    for c in group:
        for _, request in _requests(batches):
            if c.conn is not None:
                _turn(c, request)
    pause = gap_s if len(group) > 1 else 0.0
    for r in tqdm(range(repeats), desc="rounds", disable=None):
        k = r % len(group)
        for key, request in _requests(batches):
            for c in group[k:] + group[:k]:
                if c.conn is None:
                    continue
                time.sleep(pause)
                if (got := _turn(c, request)) is not None:
                    c.times.setdefault(key, []).append(got.get("s", got.get("steps")))
        # one bandwidth figure per round for every row (a pass over the largest row's bytes), so two
        # rows' ceilings differ by their sizes only
        sizes = {id(c): max(int(c.row["size_mb"] * 2**20), 1) for c in group if c.conn is not None}
        if sizes:
            largest = max(sizes.values())
            bytes_per_s = ceiling(largest) * largest
            for c in group:
                if id(c) in sizes:
                    c.times.setdefault("ceiling", []).append(bytes_per_s / sizes[id(c)])
    for c in group:
        if c.conn is not None and (got := _turn(c, {"op": "end"})) is not None:
            c.row["peak_rss_mb"] = got["peak_rss_mb"]
            c.conn.close()
            c.conn = None


def _figures(c: Contender, cfg) -> None:
    if "error" in c.row:
        return
    row, t = c.row, c.times
    row["prefill_ms"] = 1000 * statistics.median(t["prefill"])
    row["prefill_tok_s"] = cfg.prompt_tokens / row["prefill_ms"] * 1000
    row["ttft_ms"] = 1000 * statistics.median(t["ttft"])
    row["rounds"] = {}
    for b in cfg.batches:
        row[f"decode_tok_s_b{b}"] = decode_rate(t[b], b)
        row[f"decode_step_ms_b{b}"] = 1000 * b / row[f"decode_tok_s_b{b}"]
        row["rounds"][f"decode_tok_s_b{b}"] = [decode_rate([steps], b) for steps in t[b]]
    row["ceiling_tok_s"] = statistics.median(t["ceiling"])
    row["rounds"]["ceiling_tok_s"] = t["ceiling"]


def take_turns(
    cfg, contenders: list[Contender], *, together: bool = True, gap_s: float | None = None
) -> list[dict]:
    """Measure every contender (see the module's docstring) → their rows, in order. `together=False`:
    each engine alone, all its rounds, then the next (the old back-to-back scheme)."""
    gap_s = GAP_S if gap_s is None else gap_s

    kept: list[torch.Tensor] = []  # the sum's buffer, made once (up to 1 GiB of pages to fault in)

    def ceiling(nbytes: int) -> float:
        if not kept or kept[0].numel() * 4 < min(nbytes, CEILING_BUFFER_BYTES):
            kept[:] = [sum_buffer(nbytes)]
        return bandwidth_ceiling_tok_s(nbytes, 7, kept[0])

    pending, group_no = list(contenders), 0
    while pending:
        group: list[Contender] = []
        while pending:
            largest = max((c.row.get("rss_mb", 0.0) for c in group), default=0.0)
            if group and (not together or _mem_available_mb() < MEMORY_HEADROOM * largest):
                break
            c = pending.pop(0)
            if "error" in c.row:  # refused before it could start (package missing, conversion failed)
                continue
            try:
                c.conn, ready = c.start()
            except Exception as e:  # an engine that cannot start is a row with the reason
                c.row["error"] = str(e)
                continue
            c.row |= {"load_s": ready["load_s"], "size_mb": ready["size_mb"], "rss_mb": ready["rss_mb"]}
            c.row["group"] = group_no
            group.append(c)
        if group:
            _rounds(group, cfg.batches, cfg.repeats, gap_s, ceiling)
            group_no += 1
    for c in contenders:
        c.row.pop("rss_mb", None)
        _figures(c, cfg)
    return [c.row for c in contenders]


def start_process(argv: list[str], what: str) -> Callable[[], tuple[Connection, dict]]:
    """A Contender.start that launches `argv` (a peer_worker.serve loop) and waits for its load answer."""

    def start() -> tuple[Connection, dict]:
        proc = EngineProcess(argv)
        try:
            return proc, proc.answer()
        except RuntimeError as e:
            proc.close()
            raise RuntimeError(f"{what} failed: {e}") from None

    return start
