"""/metrics for app.py in the Prometheus text format: hand-written, a few counters and histograms."""

from __future__ import annotations

import threading
import time
from collections import Counter


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float, times: int = 1) -> None:
        with self._lock:
            i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            self.counts[i] += times
            self.sum += value * times
            self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            total = 0
            for b, c in zip((*self.buckets, float("inf")), self.counts):
                total += c
                le = "+Inf" if b == float("inf") else f"{b:g}"
                lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
            lines += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


_STAGES = ("admit", "prefill", "decode", "sample", "output", "step")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status) → count
        self.ttft = Histogram(
            "leanformer_time_to_first_token_seconds", "Request arrival to first token.", _LATENCY
        )
        self.itl = Histogram(
            "leanformer_inter_token_latency_seconds", "Time between a request's tokens.", _LATENCY
        )
        self.e2e = Histogram(
            "leanformer_request_duration_seconds", "Request arrival to last token.", _LATENCY
        )
        self.started = time.time()

    def render(self, scheduler) -> str:
        lines = [
            "# HELP leanformer_requests_total HTTP requests by endpoint and status.",
            "# TYPE leanformer_requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'leanformer_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        if scheduler is not None:
            s = scheduler
            lines += _counter(
                "leanformer_prompt_tokens_total", "Prompt tokens prefilled.", s.prompt_tokens_total
            )
            lines += _counter(
                "leanformer_generation_tokens_total", "Tokens generated.", s.generation_tokens_total
            )
            lines += _counter("leanformer_decode_steps_total", "Batched decode steps.", s.steps_total)
            lines += ["# HELP leanformer_finished_total Requests ended, by reason."]
            lines += ["# TYPE leanformer_finished_total counter"]
            lines += [f'leanformer_finished_total{{reason="{r}"}} {n}' for r, n in sorted(s.finished.items())]
            # the failures behind finished_total{reason="error"}, by where they happened (admit, prefill,
            # decode, sample, output, step): each failed only its own request, except "step"
            lines += ["# HELP leanformer_request_errors_total Requests failed by an engine error, by stage."]
            lines += ["# TYPE leanformer_request_errors_total counter"]
            stages = sorted(set(_STAGES) | set(s.errors))  # all listed from the start, at 0
            lines += [f'leanformer_request_errors_total{{stage="{k}"}} {s.errors[k]}' for k in stages]
            lines += _gauge("leanformer_queue_depth", "Requests waiting for a slot.", s.n_waiting)
            lines += _gauge("leanformer_running_requests", "Requests holding a slot.", s.n_running)
            lines += _gauge("leanformer_kv_slots", "KV-cache slots (the batch limit).", s.cache.n_slots)
            lines += _gauge("leanformer_kv_cache_bytes", "KV-cache memory.", s.cache.nbytes())
            blocks = getattr(s, "blocks", None)  # a paged KV cache (engine/paged.py)
            if blocks is not None:
                lines += _blocks(blocks)
                lines += _counter(
                    "leanformer_preemptions_total",
                    "Requests preempted for KV blocks (freed, recomputed later).",
                    getattr(s, "preemptions_total", 0),
                )
            if getattr(s, "spec", None) is not None:
                lines += _speculation(s.spec)
            batch = Histogram("leanformer_batch_size", "Requests per decode step.", (1, 2, 4, 8, 16, 32, 64))
            for size, n in list(s.batch_sizes.items()):
                batch.observe(size, n)
            lines += batch.render()
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"


def _blocks(bm) -> list[str]:
    """Paged KV cache: block usage and prefix-cache hits (in tokens, as vLLM counts them)."""
    lines = _gauge("leanformer_kv_blocks_total", "KV-cache blocks.", bm.num_blocks)
    lines += _gauge("leanformer_kv_blocks_used", "KV blocks held by running requests.", bm.n_used)
    lines += _gauge("leanformer_kv_blocks_free", "KV blocks no request holds (some cached).", bm.n_free)
    lines += _gauge(
        "leanformer_kv_blocks_reserved", "Free KV blocks promised to running requests.", bm.reserved
    )
    lines += _gauge("leanformer_kv_blocks_cached", "KV blocks findable by prefix.", bm.n_cached)
    lines += _gauge("leanformer_kv_block_size", "Tokens per KV block.", bm.block_size)
    lines += _counter(
        "leanformer_prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache.",
        bm.query_tokens,
    )
    lines += _counter(
        "leanformer_prefix_cache_hits_total",
        "Prompt tokens found in the prefix cache (not prefilled).",
        bm.hit_tokens,
    )
    return lines


def _speculation(spec) -> list[str]:
    """Per-request speculative decoding (engine/spec_batch.py): drafts verified and kept."""
    lines = _counter(
        "leanformer_spec_draft_tokens_total",
        "Draft tokens verified (speculative decoding).",
        spec.drafted_total,
    )
    lines += _counter(
        "leanformer_spec_accepted_tokens_total", "Draft tokens the model kept.", spec.accepted_total
    )
    lines += _counter(
        "leanformer_spec_verifications_total", "Verifications (one request, one step).", spec.rounds_total
    )
    lines += _counter(
        "leanformer_spec_fallbacks_total",
        "Times a request stopped drafting (acceptance too low for drafts to pay).",
        spec.fallbacks_total,
    )
    rate = spec.accepted_total / spec.drafted_total if spec.drafted_total else 0.0
    lines += _gauge("leanformer_spec_acceptance_rate", "Accepted / drafted tokens so far.", round(rate, 6))
    return lines


def _counter(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]


def _gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
