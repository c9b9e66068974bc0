"""One engine measured in its own process: `python peer_worker.py PEER MODEL_PATH CONFIG_JSON`.

Run by file path, not as `leanformer.…`: importing the leanformer package imports torch (~200 MB of
RSS), which llama.cpp, ONNX Runtime and CTranslate2 never load, so the peer's peak RSS would be ours.
Only the standard library and numpy are imported here; each engine's package inside its function.

The process loads its engine once, then answers requests (turns.py's protocol, one JSON line each way:
a prefill, a time to first token, one generation's decode steps, the peak RSS) until told to end, so
`leanformer bench` can let every engine take turns round by round. Our own engines (runner.py) answer
through the same `serve` loop. Prompts are the same random ids everywhere; a failure is an
{"error": "..."} answer, which the parent makes a row with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    """The same random ids every engine gets (runner.py's _prompts uses this too)."""
    rng = random.Random(1234 + batch)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(batch)]


def rss_mb() -> float:
    """Peak RSS of this process (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Engine:
    """What each peer provides: prefill(ids [B][T]) and steps(ids, n) → seconds of each decode step."""

    vocab: int
    size_bytes: int

    def prefill(self, ids: list[list[int]]) -> None:
        raise NotImplementedError

    def steps(self, ids: list[list[int]], n: int) -> list[float]:
        raise NotImplementedError

    def first_token(self, ids: list[list[int]]) -> None:
        """Prompt in, first greedy token out (the time to first token); the prefill's argmax here."""
        self.prefill(ids)


def _argmax(row) -> int:
    import numpy as np

    return int(np.argmax(row))


class LlamaCpp(Engine):
    """llama.cpp through llama-cpp-python's C API: a batch of B rows is B sequences in one llama_batch
    (its own parallel-decoding path), so batch 8 is one llama_decode per step, like ours."""

    def __init__(self, path: str, cfg: dict) -> None:
        import llama_cpp as L

        # llama-cpp-python prints every llama.cpp log line (tensor repacks, graph reservations) to stderr
        # unless its logger's level says otherwise; its Llama class sets that, the C API used here does not
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.size_bytes = os.path.getsize(path)
        b = max(cfg["batches"] + [1])
        n_ctx = b * (cfg["prompt_tokens"] + max(cfg["new_tokens"], 2) + 8)
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max = b
        cp.n_threads = cp.n_threads_batch = cfg.get("threads") or os.cpu_count() or 1
        cp.kv_unified = True  # every row shares one KV buffer of n_ctx cells (else n_ctx / n_seq_max each)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(n_ctx, 0, b)

    def _decode(self, rows: list[list[int]], start: list[int]) -> list[int]:
        """Append rows[s] to sequence s at positions start[s]...; greedy next token of each row."""
        L, bt = self.L, self.batch
        i, last = 0, []
        for s, toks in enumerate(rows):
            for j, t in enumerate(toks):
                bt.token[i], bt.pos[i], bt.n_seq_id[i] = t, start[s] + j, 1
                bt.seq_id[i][0] = s
                bt.logits[i] = j == len(toks) - 1
                i += 1
            last.append(i - 1)
        bt.n_tokens = i
        if L.llama_decode(self.ctx, bt) != 0:
            raise RuntimeError("llama_decode failed")
        import numpy as np

        return [
            _argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, k), shape=(self.vocab,)))
            for k in last
        ]

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def prefill(self, ids):
        self._clear()
        self._decode(ids, [0] * len(ids))

    def steps(self, ids, n):
        self._clear()
        nxt = self._decode(ids, [0] * len(ids))
        pos, stamps = [len(r) for r in ids], [time.perf_counter()]
        for _ in range(n - 1):
            nxt = self._decode([[t] for t in nxt], pos)
            pos = [p + 1 for p in pos]
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]


class OnnxRuntime(Engine):
    """An exported decoder (export/decoder.py's graph: input_ids, attention_mask, position_ids,
    past_key_values.{i}.key/.value → logits, present.*) stepped with numpy, greedy."""

    def __init__(self, path: str, cfg: dict) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = cfg.get("threads") or 0
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        mc = json.loads((Path(path).parent / "config.json").read_text())
        self.vocab = mc["vocab_size"]
        heads = mc["num_attention_heads"]
        self.kv, self.hd = (
            mc.get("num_key_value_heads", heads),
            mc.get("head_dim") or mc["hidden_size"] // heads,
        )
        self.past_names = [i.name for i in self.sess.get_inputs()[3:]]
        self.size_bytes = sum(f.stat().st_size for f in Path(path).parent.iterdir() if "onnx" in f.name)

    def _run(self, ids, mask, pos, past):
        import numpy as np

        feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": mask, "position_ids": pos}
        logits, *present = self.sess.run(None, feed | dict(zip(self.past_names, past)))
        return logits[:, -1].argmax(-1), present

    def _start(self, ids):
        import numpy as np

        b, t = len(ids), len(ids[0])
        past = [np.zeros((b, self.kv, 0, self.hd), np.float32) for _ in self.past_names]
        pos = np.tile(np.arange(t, dtype=np.int64), (b, 1))
        return self._run(ids, np.ones((b, t), np.int64), pos, past)

    def prefill(self, ids):
        self._start(ids)

    def steps(self, ids, n):
        import numpy as np

        nxt, past = self._start(ids)
        b, t = len(ids), len(ids[0])
        stamps = [time.perf_counter()]
        for k in range(n - 1):
            mask = np.ones((b, t + k + 1), np.int64)
            pos = np.full((b, 1), t + k, np.int64)
            nxt, past = self._run(nxt[:, None], mask, pos, past)
            stamps.append(time.perf_counter())
        return [b2 - a for a, b2 in zip(stamps, stamps[1:])]


class CTranslate2(Engine):
    """A CTranslate2 model folder; ids go in as its vocabulary's token strings (its API takes strings)."""

    def __init__(self, path: str, cfg: dict) -> None:
        import ctranslate2

        threads = cfg.get("threads") or os.cpu_count() or 1
        self.gen = ctranslate2.Generator(path, device="cpu", intra_threads=threads, inter_threads=1)
        folder = Path(path)
        vocab_file = folder / "vocabulary.json"
        if vocab_file.exists():
            self.tokens = json.loads(vocab_file.read_text())
        else:
            self.tokens = (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        self.vocab = len(self.tokens)
        self.size_bytes = sum(f.stat().st_size for f in folder.iterdir())

    def _gen(self, ids, n, callback=None):
        strs = [[self.tokens[i] for i in row] for row in ids]
        return self.gen.generate_batch(
            strs, max_length=n, min_length=n, sampling_topk=1, end_token=[], include_prompt_in_result=False,
            callback=callback,
        )  # fmt: skip

    def prefill(self, ids):
        self._gen(ids, 1)

    def steps(self, ids, n):
        stamps: dict[int, float] = {}

        def note(step) -> bool:
            stamps.setdefault(step.step, time.perf_counter())  # the first row of each step
            return False

        self._gen(ids, n, note)
        times = [stamps[k] for k in sorted(stamps)]
        return [b - a for a, b in zip(times, times[1:])]


ENGINES: dict[str, type[Engine]] = {
    "llama.cpp": LlamaCpp,
    "onnxruntime": OnnxRuntime,
    "ctranslate2": CTranslate2,
}


def rss_now_mb() -> float:
    """Current RSS of this process (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return rss_mb()


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def handle(eng: Engine, cfg: dict, request: dict) -> dict:
    """One request: {"op": "prefill" | "ttft"} → {"s": seconds} (a batch-1 prompt),
    {"op": "decode", "batch": B} → {"steps": [seconds of each decode step]} (one generation of
    max(new_tokens, 2) tokens: the first comes with the prefill), {"op": "end"} → {"peak_rss_mb"}."""
    op, length = request.get("op"), cfg["prompt_tokens"]
    if op in ("prefill", "ttft"):
        one = prompts(eng.vocab, 1, length)  # made before the clock starts
        return {"s": _timed(lambda: eng.prefill(one) if op == "prefill" else eng.first_token(one))}
    if op == "decode":
        return {
            "steps": eng.steps(prompts(eng.vocab, int(request["batch"]), length), max(cfg["new_tokens"], 2))
        }
    if op == "end":
        return {"peak_rss_mb": rss_mb()}
    raise ValueError(f"unknown request {request!r}")


def reason(e: BaseException) -> str:
    """An engine's failure as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def serve(make: Callable[[], Engine], cfg: dict) -> None:
    """Load the engine, answer {"load_s", "size_mb", "rss_mb"} (or {"error"}), then one answer per
    request line on stdin until "end". The answers go to the stdout this process started with; anything
    an engine's library prints goes to stderr, so it cannot garble an answer."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(doc: dict) -> None:
        answers.write(json.dumps(doc) + "\n")

    t0 = time.perf_counter()
    try:
        eng = make()
    except Exception as e:  # any failure of the engine is a row with its reason, not a traceback
        return answer({"error": reason(e)})
    answer({"load_s": time.perf_counter() - t0, "size_mb": eng.size_bytes / 2**20, "rss_mb": rss_now_mb()})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer(handle(eng, cfg, request))
        except Exception as e:
            answer({"error": reason(e)})
        if request.get("op") == "end":
            return None
    return None


if __name__ == "__main__":
    config = json.loads(sys.argv[3])
    serve(lambda: ENGINES[sys.argv[1]](sys.argv[2], config), config)
