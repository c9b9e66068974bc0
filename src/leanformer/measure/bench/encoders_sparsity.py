"""Unstructured / N:M weight pruning of an encoder (encoders/prune_weights.py): STS-B, bytes, speed.

    python -m leanformer.measure.bench.encoders_sparsity [MODEL] [--points 0.3 0.5 0.7 2:4]
        [--methods magnitude wanda sparsegpt] [--json bench-results/encoders_sparsity.json]
        [--plot docs/encoder_pruning_stsb.png]
    python -m leanformer.measure.bench.encoders_sparsity --merge A.json B.json ... --json ALL.json --plot P.png

Each method prunes a copy of the model at each point (a sparsity, or an N:M pattern) of the block
Linears, calibrated on 512 SST-2 train sentences (never the STS-B data it is scored on). Per point:
STS-B dev Spearman of the pruned fp32 model, of it after Int8Dynamic (the fast int8 path) and after
Int8WeightOnly (the int8 that sparse storage packs); the saved size of fp32 + SparseStorage, int8 weights
+ SparseStorage and Int8Dynamic; embeddings/s of the dense fp32, pruned fp32 and pruned Int8Dynamic
models on STS-B sentences at batch 32, interleaved in rounds (medians; load average written next to them).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leanformer.compress.config import Int8Dynamic, Int8WeightOnly, Magnitude, SparseGPT, Wanda
from leanformer.compress.recipe import quantize_
from leanformer.compress.sparse import SparseStorage
from leanformer.encoders.embed import embed
from leanformer.encoders.prune_weights import prune_weights_
from leanformer.encoders.quality import eval_stsb, glue_path, read_tsv
from leanformer.outputs import write_file_atomic

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def _config(method: str, point: str):
    if ":" in point:
        return METHODS[method](pattern=point)
    return METHODS[method](sparsity=float(point))


def _saved_mb(model, tok) -> float:
    from leanformer.loading import save

    with tempfile.TemporaryDirectory() as d:
        out = save(model, tok, Path(d) / "m")
        return sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 1e6


def _with(model, *stages):
    q = copy.deepcopy(model)
    for s in stages:
        quantize_(q, s, progress=False)
    return q


def _speeds(models: dict, tok, texts: list[str], repeats: int) -> dict[str, float]:
    """Embeddings/s per model: rounds of all models, order rotated each round; medians."""
    secs: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for m in models.values():
        embed(m, tok, texts[:64], 32)  # warm-up
    for rep in range(repeats):
        for n in names[rep % len(names) :] + names[: rep % len(names)]:
            t = time.perf_counter()
            embed(models[n], tok, texts, 32)
            secs[n].append(time.perf_counter() - t)
    return {n: len(texts) / statistics.median(s) for n, s in secs.items()}


def measure_point(base, tok, calib, cfg, speed_texts, repeats) -> dict:
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    zeros = prune_weights_(m, tok, calib, cfg, progress=False)
    row = {"prune_seconds": round(time.perf_counter() - t0, 1)}
    row["sparsity"] = sum(zeros.values()) / len(zeros)
    row["stsb_fp32"] = eval_stsb(m, tok)["stsb_spearman"]
    dyn, w8 = _with(m, Int8Dynamic()), _with(m, Int8WeightOnly(), SparseStorage())
    row["stsb_int8_dynamic"] = eval_stsb(dyn, tok)["stsb_spearman"]
    row["stsb_int8_weights"] = eval_stsb(w8, tok)["stsb_spearman"]
    row["mb_fp32_sparse"] = _saved_mb(_with(m, SparseStorage()), tok)
    row["mb_int8_weights_sparse"] = _saved_mb(w8, tok)
    row["mb_int8_dynamic"] = _saved_mb(dyn, tok)
    row["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
    speed = _speeds({"dense": base, "fp32": m, "int8_dynamic": dyn}, tok, speed_texts, repeats)
    row["emb_per_s"] = speed
    row["fp32_vs_dense"] = speed["fp32"] / speed["dense"]
    row["int8_dynamic_vs_dense"] = speed["int8_dynamic"] / speed["dense"]
    return row


def plot(results: dict, path: str) -> None:
    """STS-B Spearman vs sparsity, one line per method (unstructured), N:M points as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(results["dense"]["stsb_fp32"], color="gray", ls="--", label="dense fp32")
    for i, (method, rows) in enumerate(results["methods"].items()):
        pts = [(0.0, results["dense"]["stsb_fp32"])]  # every line starts at the dense model
        pts += sorted((r["sparsity"], r["stsb_fp32"]) for p, r in rows.items() if ":" not in p)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{method} (unstructured)")
        for p, r in rows.items():
            if ":" in p:
                ax.scatter(r["sparsity"], r["stsb_fp32"], marker="s", facecolors="none", edgecolors=f"C{i}")
                ax.annotate(f"{method} {p}", (r["sparsity"], r["stsb_fp32"]), xytext=(5, -3),
                            textcoords="offset points", fontsize=7, color=f"C{i}")  # fmt: skip
    ax.set_xlabel("sparsity of the block Linears")
    ax.set_ylabel("STS-B dev Spearman (higher is better)")
    ax.set_title(f"{results['settings']['model']}: weight pruning of the block Linears, fp32", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def table(results: dict) -> str:
    """A markdown table: one row per method and point, dense first."""
    d = results["dense"]
    head = (
        "| method | point | sparsity | STS-B fp32 | STS-B int8 dyn | STS-B int8 w | MB fp32 sparse | "
        "MB int8 w sparse | MB int8 dyn | emb/s fp32 (x dense) | emb/s int8 dyn (x dense) | load |\n"
        + "|---" * 12
        + "|\n"
    )
    rows = [
        f"| dense | - | 0 | {d['stsb_fp32']:.4f} | {d['stsb_int8_dynamic']:.4f} | - | {d['mb_fp32']:.1f} "
        f"(dense) | - | {d['mb_int8_dynamic']:.1f} | {d['emb_per_s']['dense']:.0f} | "
        f"{d['emb_per_s']['int8_dynamic']:.0f} ({d['emb_per_s']['int8_dynamic'] / d['emb_per_s']['dense']:.2f}x)"
        f" | {d['loadavg']} |"
    ]
    for method, points in results["methods"].items():
        for point, r in points.items():
            e = r["emb_per_s"]
            rows.append(
                f"| {method} | {point} | {r['sparsity']:.3f} | {r['stsb_fp32']:.4f} | "
                f"{r['stsb_int8_dynamic']:.4f} | {r['stsb_int8_weights']:.4f} | {r['mb_fp32_sparse']:.1f} | "
                f"{r['mb_int8_weights_sparse']:.1f} | {r['mb_int8_dynamic']:.1f} | "
                f"{e['fp32']:.0f} ({r['fp32_vs_dense']:.2f}x) | {e['int8_dynamic']:.0f} "
                f"({r['int8_dynamic_vs_dense']:.2f}x) | {r['loadavg']} |"
            )
    return head + "\n".join(rows)


def merge(paths: list[str]) -> dict:
    """Results of runs with different --methods (same model) as one: the first run's dense row."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {**runs[0], "methods": {}, "runs": [r["settings"] for r in runs]}
    for r in runs:
        out["methods"].update(r["methods"])
    return out


def main(argv: list[str] | None = None) -> int:
    from leanformer.encoders.build import load_encoder
    from leanformer.hub import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="all-minilm-l6-v2")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--points", nargs="+", default=["0.3", "0.5", "0.7", "2:4"])
    p.add_argument("--limit", type=int, default=512, help="calibration sentences (SST-2 train)")
    p.add_argument("--speed-sentences", type=int, default=500, help="STS-B sentences per speed round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="bench-results/encoders_sparsity.json")
    p.add_argument("--plot", default=None, help="write the STS-B vs sparsity PNG here")
    p.add_argument("--merge", nargs="+", default=None, help="JSONs of earlier runs: merge, table, plot")
    a = p.parse_args(argv)
    if a.merge:
        results = merge(a.merge)
        write_file_atomic(a.json, json.dumps(results, indent=2))
        print(table(results))
        if a.plot:
            plot(results, a.plot)
        return 0
    torch.set_num_threads(a.threads)
    base, tok = load_encoder(resolve_model(a.model))
    calib = [r["sentence"] for r in read_tsv(glue_path("sst2", "train"), a.limit)]
    rows = read_tsv(glue_path("stsb"))
    speed_texts = [r["sentence1"] for r in rows][: a.speed_sentences]
    dyn = _with(base, Int8Dynamic())
    results = {"model": resolve_model(a.model), "settings": vars(a), "methods": {}}
    results["dense"] = {
        "stsb_fp32": eval_stsb(base, tok)["stsb_spearman"],
        "stsb_int8_dynamic": eval_stsb(dyn, tok)["stsb_spearman"],
        "mb_fp32": _saved_mb(base, tok),
        "mb_int8_dynamic": _saved_mb(dyn, tok),
        "emb_per_s": _speeds({"dense": base, "int8_dynamic": dyn}, tok, speed_texts, a.repeats),
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
    }
    print(json.dumps(results["dense"]), flush=True)
    for method in a.methods:
        results["methods"][method] = {}
        for point in a.points:
            row = measure_point(base, tok, calib, _config(method, point), speed_texts, a.repeats)
            results["methods"][method][point] = row
            print(method, point, json.dumps(row), flush=True)
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(a.json, json.dumps(results, indent=2))  # partial results survive a stop
    print(table(results))
    if a.plot:
        plot(results, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
