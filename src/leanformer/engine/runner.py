"""Runs a Scheduler on its own thread, so the server's event loop never waits on the model."""

from __future__ import annotations

import logging
import threading
import time

from .scheduler import Request, Scheduler

log = logging.getLogger("leanformer.engine")


class Engine:
    """Runs a Scheduler on its own thread: torch releases the GIL inside ops, so the server's event loop
    stays responsive while the model computes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

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

    def _loop(self) -> None:
        sched = self.scheduler
        while not self._stop:
            if not sched.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                sched.step()
            except Exception as e:  # a bug or OOM in one step must not kill the server
                log.exception("engine step failed")
                sched.fail_all(f"internal error: {type(e).__name__}: {e}")

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
