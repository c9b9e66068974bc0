"""How the Scheduler (engine/scheduler.py) hands out tokens and ends requests: a chosen token is
appended and emitted (or ends the request on a stop id, a stop string or max_tokens), a failure ends its
request alone with finish_reason "error", and every request ends exactly once: its slot and KV memory
freed (the `_release` hook), its last Output sent, the in-flight count and /metrics counters updated.

`Finishing` is a mixin of Scheduler: it reads the Scheduler's state (running, prefilling, free, _lock,
_in_flight, finished, errors, generation_tokens_total) and its `_release` hook.
"""

from __future__ import annotations

import logging

from leanformer.engine.request import Output, Request, SeqState, TokenLogprob, one

log = logging.getLogger("leanformer.engine")


class Finishing:
    """Token acceptance, outputs and request endings of the Scheduler."""

    def _accept(self, s: SeqState, token: int, lp: TokenLogprob | None) -> None:
        req = s.req
        s.out.append(token)
        s.next_token = token
        self.generation_tokens_total += 1
        if s.seen is not None:
            s.seen[token] = True
        if token in req.stop_ids:
            return self._finish(s, "stop")
        text, stopped = s.detok.add(token) if s.detok is not None else ("", False)
        reason = "stop" if stopped else ("length" if len(s.out) >= req.max_tokens else None)
        if reason is None:
            self._safe_emit(
                req,
                Output(req.id, req.index, [token], text, one(lp), None, len(req.prompt), len(s.out)),
            )
        else:
            self._finish(s, reason, [token], text, one(lp))

    def _fail(self, s: SeqState, stage: str, e: BaseException) -> None:
        if s.req.ended:
            return
        self.errors[stage] += 1
        log.error("request %s failed in %s", s.req.id, stage, exc_info=e)
        self._finish(s, "error", error=_message(e))

    def _finish(
        self,
        s: SeqState,
        reason: str,
        tokens: list[int] = (),
        text: str = "",
        lps: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> None:
        """Free the slot now and send the request's last output (once: a second call does nothing)."""
        if s.req.ended:
            return
        if s in self.running:
            self.running.remove(s)
        if s in self.prefilling:
            self.prefilling.remove(s)
        self.free.append(s.slot)
        try:
            self._release(s)
        except Exception:  # never let bookkeeping keep a request from ending
            log.exception("could not release the KV memory of request %s", s.req.id)
        if reason in ("length", "stop") and s.detok is not None:
            try:
                text += s.detok.flush()  # what was held back (after a stop string: nothing)
            except Exception:
                log.exception("could not flush the text of request %s", s.req.id)
        self._emit_final(s.req, reason, len(s.out), error, list(tokens), text, lps)

    def _emit_final(
        self,
        req: Request,
        reason: str,
        n_out: int,
        error: str | None = None,
        tokens: list[int] | None = None,
        text: str = "",
        lps: list[TokenLogprob] | None = None,
    ) -> None:
        if req.ended:
            return
        req.ended = True
        with self._lock:
            self._in_flight -= 1
        self.finished[reason] += 1
        out = Output(req.id, req.index, tokens or [], text, lps, reason, len(req.prompt), n_out, error)
        self._safe_emit(req, out)

    def _safe_emit(self, req: Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop working for it
            log.exception("could not deliver output of request %s; cancelling it", req.id)
            req.cancelled = True

    def fail_all(self, message: str) -> None:
        """After an unexpected error outside any one request: end every admitted request with it."""
        for s in self.prefilling + self.running:
            self.errors["step"] += 1
            self._finish(s, "error", error=message)


def _message(e: BaseException) -> str:
    return f"internal error: {type(e).__name__}: {e}"
