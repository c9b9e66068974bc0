"""Runs a Scheduler on its own thread, so the server's event loop never waits on the model."""

from __future__ import annotations

import logging
import threading
import time

from leanformer.engine.scheduler import Request, Scheduler

log = logging.getLogger("leanformer.engine")


class Engine:
    """Runs a Scheduler on its own thread: torch releases the GIL inside ops, so the server's event loop
    stays responsive while the model computes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.step_started: float | None = None  # monotonic start of the step in progress; None when idle

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="leanformer-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        self.scheduler.submit(req)
        self._wake.set()

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # the engine frees its slot at the next step
        self._wake.set()

    @property
    def dead(self) -> bool:
        """Started, not asked to stop, and yet the thread is gone: nothing will ever answer."""
        return self._thread is not None and not self._stop and not self._thread.is_alive()

    def problem(self, stall_s: float) -> str | None:
        """Why the engine cannot make progress (for /health), or None when it can."""
        if self.dead:
            return "the engine thread is not running"
        started = self.step_started
        if started is not None and (busy := time.monotonic() - started) > stall_s:
            return f"one engine step has been running for {busy:.0f} s (limit {stall_s:g} s)"
        return None

    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException:  # (SystemExit, a C-level error surfacing as one): /health now says 503
            log.critical("the engine thread stopped", exc_info=True)
            raise

    def _steps(self) -> None:
        sched = self.scheduler
        while not self._stop:
            if not sched.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self.step_started = time.monotonic()
            try:
                sched.step()  # failures of one request are handled inside: they end that request
            except Exception as e:  # a bug outside any one request must not kill the server
                log.exception("engine step failed")
                try:
                    sched.fail_all(f"internal error: {type(e).__name__}: {e}")
                except Exception:
                    log.exception("could not fail the running requests")
            finally:
                self.step_started = None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to `timeout` s, abort the rest."""
        sched = self.scheduler
        with sched._lock:
            sched.closed = True
        deadline = time.monotonic() + timeout
        while sched.has_work() and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        sched.abort_all("abort")
