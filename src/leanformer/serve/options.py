"""The server's long-context and speculation options (kept out of app.py, which is only control flow).

- `--window W --sinks S`: every request keeps its first S tokens and its newest W (StreamingLLM,
  engine/windowed.py), so a request may run past the model's context, up to --max-seq tokens, in a
  fixed slot of S + W + W/8 tokens. Runs on static slots (the paged cache does not slide).
- `--speculative prompt-lookup`: the default of the request field `"speculative"` ("prompt-lookup" or
  "off"; engine/spec_batch.py). Greedy requests draft by prompt lookup and verify in the batch.
"""

from __future__ import annotations

from leanformer.engine.spec_batch import SpecDecoder, check_method
from leanformer.errors import LeanformerError
from leanformer.models.kv_policy import SinkWindow
from leanformer.serve.schemas import ApiError


def check_options(window: int | None, sinks: int | None, speculative: str | None) -> None:
    """ServeConfig's window / sinks / speculative, checked before the model loads (one line each)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise LeanformerError(f"--window must be an integer ≥ 1, got {window!r}")
    if sinks is not None:
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise LeanformerError(f"--sinks must be an integer ≥ 0, got {sinks!r}")
        if window is None:
            raise LeanformerError("--sinks goes with --window N (the sliding window)")
    check_method(speculative)
    if window is not None and check_method(speculative) is not None:
        raise LeanformerError("--speculative does not combine with --window: give one of them")


def kv_policy(window: int | None, sinks: int | None) -> SinkWindow | None:
    return None if window is None else SinkWindow(4 if sinks is None else sinks, window)


def attach_speculation(sched, policy) -> None:
    """Requests may ask for speculation unless the server slides a window (its slots move under drafts)
    or its model is split over tensor-parallel ranks (serve/tp.py: they follow slot and paged steps
    only, and a forward timed by one rank alone would wait forever in its all-reduce)."""
    if policy is None and getattr(sched.model, "tp", None) is None:
        sched.spec = SpecDecoder()
        sched.spec.calibrate(sched)  # the forward's cost per row count, timed now: no request waits for it


def request_speculation(body, default: str | None, sched) -> str | None:
    """The request's `"speculative"` (else the server's --speculative) → the method, or None."""
    asked = getattr(body, "speculative", None)
    method = check_method(default if asked is None else asked)
    if method is not None and sched.spec is None:
        if asked is None:
            return None
        raise ApiError(
            400,
            "speculative decoding is off on this server: it does not combine with --window or --tp",
            "speculative",
            "invalid_value",
        )
    return method
