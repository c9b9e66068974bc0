"""Long-input encoder benchmark: local / LSH attention vs dense on 2,048-token (and longer) inputs.

    python -m leanformer.measure.bench.encoders_long [MODEL] [--docs 12] [--lengths 2048,4096]
        [--attention-repeats 5] [--json bench-results/encoders_long.json]

Inputs: consecutive stretches of wikitext-2 (test) of exactly `length` tokens. all-MiniLM-L6-v2 has 512
learned positions, so every long run reads them past the end (positions="interpolate", and "repeat" for
comparison); "chunks" is the usual alternative: pieces of the trained limit (254 + 2 tokens for MiniLM:
sentence-transformers caps it at 256) embedded within the trained length and
their mean-pooled embeddings averaged by token count.
Measured per mode: seconds per document (median over the documents, one thread, modes interleaved), cosine of
the document embedding to dense attention's with the same positions, and a retrieval check that needs
the far end of the document: a 128-token passage from the document's last quarter (embedded within the
trained length) must find its document among `docs` (top-1 accuracy, MRR). Within the trained length:
STS-B Spearman with local windows and LSH buckets vs dense. The attention alone (--attention-repeats):
ms per call at the model's heads and head size, batch 1, random q/k/v, modes interleaved: what the
attention kind changes, without the Linears every mode shares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from leanformer.encoders.embed import embed
from leanformer.encoders.quality import _shared_data, eval_stsb, glue_path, read_tsv, spearman
from leanformer.models.bert import _attention
from leanformer.models.bert_attention import LongAttention, long_attention

LONG_MODES = {  # name → LongAttention keywords (None: chunks of the trained length)
    "dense": dict(attention="dense"),
    "local w=256": dict(attention="local", window=256),
    "local w=128": dict(attention="local", window=128),
    "lsh b=64 x1": dict(attention="lsh", bucket_size=64, hashes=1),
    "lsh b=64 x2": dict(attention="lsh", bucket_size=64, hashes=2),
    "dense, repeat positions": dict(attention="dense", positions="repeat"),
    "local w=256, repeat positions": dict(attention="local", window=256, positions="repeat"),
    "chunks (trained limit)": None,
}
STS_MODES = {
    "dense": dict(attention="dense"),
    "local w=128": dict(attention="local", window=128),
    "local w=64": dict(attention="local", window=64),
    "local w=16": dict(attention="local", window=16),
    "local w=8": dict(attention="local", window=8),
    "lsh b=16 x1": dict(attention="lsh", bucket_size=16, hashes=1),
    "lsh b=8 x2": dict(attention="lsh", bucket_size=8, hashes=2),
}


def wikitext_docs(tok, count: int, length: int) -> list[list[int]]:
    """`count` consecutive stretches of wikitext-2 test, `length` token ids each (no special tokens)."""
    text = (_shared_data() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = length - 2  # [CLS] ... [SEP]
    if len(ids) < count * body:
        raise SystemExit(f"wikitext-2 test has {len(ids)} tokens: fewer than {count} x {body}")
    return [ids[i * body : (i + 1) * body] for i in range(count)]


def _embed_ids(model, tok, docs: list[list[int]], mode: dict | None) -> np.ndarray:
    """Embed token-id documents [N, D] (normalized). mode None: chunks of the trained length, averaged."""
    cls, sep = tok.cls_token_id, tok.sep_token_id
    out = []
    with torch.inference_mode():
        for body in docs:
            if mode is None:
                step = model.args.max_length - 2
                pieces = [body[i : i + step] for i in range(0, len(body), step)]
                embs = [model.embed(torch.tensor([[cls, *p, sep]]), normalize=False)[0] for p in pieces]
                weights = torch.tensor([len(p) + 2.0 for p in pieces])
                e = (torch.stack(embs) * weights[:, None]).sum(0) / weights.sum()
            else:
                e = model.embed(torch.tensor([[cls, *body, sep]]), normalize=False, attention=_spec(mode))[0]
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.stack(out)


def _spec(mode: dict) -> LongAttention:
    kw = dict(mode)
    return LongAttention.make(kw.pop("attention"), **kw)


def bench_long(model, tok, docs: int, lengths: list[int], repeats: int, modes: list[str]) -> dict:
    results: dict = {}
    for length in lengths:
        bodies = wikitext_docs(tok, docs, length)
        # queries: a 128-token passage from each document's last quarter, embedded within 512 tokens
        queries = [b[len(b) * 3 // 4 : len(b) * 3 // 4 + 128] for b in bodies]
        q = _embed_ids(model, tok, queries, dict(attention="dense"))
        run = {name: LONG_MODES[name] for name in modes}
        embs = {name: [] for name in run}
        secs: dict[str, list[float]] = {name: [] for name in run}
        _embed_ids(model, tok, bodies[:1], run["dense"])  # warm-up
        for i in range(docs):  # document by document, modes interleaved: load hits every mode alike
            for name, mode in run.items():
                t0 = time.perf_counter()
                embs[name].append(_embed_ids(model, tok, bodies[i : i + 1], mode)[0])
                secs[name].append(time.perf_counter() - t0)
        for _ in range(repeats):  # more timings on the first document
            for name, mode in run.items():
                t0 = time.perf_counter()
                _embed_ids(model, tok, bodies[:1], mode)
                secs[name].append(time.perf_counter() - t0)
        embs = {name: np.stack(e) for name, e in embs.items()}
        rows = {}
        for name in run:
            ref = embs[
                "dense, repeat positions"
                if "repeat" in name and "dense, repeat positions" in embs
                else "dense"
            ]
            sims = q @ embs[name].T  # [docs, docs]: query i against every document
            rank = (sims > np.diag(sims)[:, None]).sum(1)  # 0 = its own document first
            rows[name] = {
                "seconds_per_doc": statistics.median(secs[name]),
                "cosine_to_dense": float((embs[name] * ref).sum(1).mean()),
                "cosine_to_dense_min": float((embs[name] * ref).sum(1).min()),
                "retrieval_top1": float((rank == 0).mean()),
                "retrieval_mrr": float((1.0 / (rank + 1)).mean()),
            }
            rows[name]["speedup_vs_dense"] = rows["dense"]["seconds_per_doc"] / rows[name]["seconds_per_doc"]
        results[str(length)] = rows
    return results


def bench_attention(model, lengths: list[int], modes: list[str], repeats: int) -> dict:
    """{length: {mode: {"ms", "speedup_vs_dense"}}}: one attention call [1, H, T, D] per mode (medians of
    `repeats`, modes interleaved); dense is the model's own path (the fused C++ kernel)."""
    a = model.args
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    for length in lengths:
        q, k, v = (torch.randn(1, a.num_attention_heads, length, a.head_dim, generator=g) for _ in range(3))
        specs = {n: _spec(LONG_MODES[n]) for n in modes if LONG_MODES[n] and "repeat" not in n}
        secs: dict[str, list[float]] = {n: [] for n in specs}
        with torch.inference_mode():
            for i in range(repeats + 1):  # the first round warms up
                for name, spec in specs.items():
                    t0 = time.perf_counter()
                    long_attention(q, k, v, None, spec, lambda *x: _attention(*x, None))
                    if i:
                        secs[name].append(time.perf_counter() - t0)
        dense = statistics.median(secs["dense"])
        out[str(length)] = {
            n: {"ms": 1e3 * statistics.median(s), "speedup_vs_dense": dense / statistics.median(s)}
            for n, s in secs.items()
        }
    return out


def bench_stsb(model, tok) -> dict:
    rows = read_tsv(glue_path("stsb"))
    s1, s2 = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    gold = np.array([float(r["score"]) for r in rows])
    out = {"dense": eval_stsb(model, tok)["stsb_spearman"]}
    for name, mode in STS_MODES.items():
        if name == "dense":
            continue
        e = embed(model, tok, s1 + s2, 32, normalize=True, attention=_spec(mode))
        out[name] = spearman((e[: len(rows)] * e[len(rows) :]).sum(-1), gold)
    lens = [len(x) for x in tok(s1 + s2)["input_ids"]]
    out["tokens_mean"], out["tokens_max"] = float(np.mean(lens)), int(max(lens))
    return out


def main(argv: list[str] | None = None) -> int:
    from leanformer.encoders.build import load_encoder
    from leanformer.hub import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="all-minilm-l6-v2")
    p.add_argument("--docs", type=int, default=12)
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--repeats", type=int, default=0, help="extra timings of the first document per mode")
    p.add_argument("--modes", default=",".join(LONG_MODES), help=f"comma list of: {', '.join(LONG_MODES)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-stsb", action="store_true")
    p.add_argument(
        "--attention-repeats", type=int, default=5, help="timings of the attention alone (0: none)"
    )
    p.add_argument("--json", default="bench-results/encoders_long.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_encoder(resolve_model(a.model))
    report = {"model": a.model, "threads": a.threads, "loadavg_before": Path("/proc/loadavg").read_text()}
    modes = ["dense", *(m for m in a.modes.split(",") if m != "dense")]
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.attention_repeats > 0:
        report["attention"] = bench_attention(model, lengths, modes, a.attention_repeats)
    report["long"] = bench_long(model, tok, a.docs, lengths, a.repeats, modes) if a.docs > 0 else {}
    if not a.no_stsb:
        report["stsb"] = bench_stsb(model, tok)
    report["loadavg_after"] = Path("/proc/loadavg").read_text()
    for length, rows in report["long"].items():
        print(f"\n{length} tokens: mode | s/doc | x dense | cos to dense (min) | top-1 | MRR")
        for name, r in rows.items():
            print(
                f"  {name:30s} {r['seconds_per_doc']:7.3f} {r['speedup_vs_dense']:5.2f}x "
                f"{r['cosine_to_dense']:.4f} ({r['cosine_to_dense_min']:.4f}) "
                f"{r['retrieval_top1']:.3f} {r['retrieval_mrr']:.3f}"
            )
    for length, rows in report.get("attention", {}).items():
        print(f"\nattention alone, {length} tokens: mode | ms per call | x dense")
        for name, r in rows.items():
            print(f"  {name:30s} {r['ms']:9.1f} {r['speedup_vs_dense']:5.2f}x")
    for name, v in report.get("stsb", {}).items():
        print(f"STS-B {name:14s} {v:.4f}" if isinstance(v, float) else f"STS-B {name} {v}")
    print("load:", report["loadavg_before"].strip(), "->", report["loadavg_after"].strip())
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
