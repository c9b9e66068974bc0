"""Structured pruning of an encoder (heads + FFN channels, encoders/prune_encoder.py): STS-B and speed.

    python -m leanformer.measure.bench.encoders_prune [MODEL] --fraction 0.3 [--head-fraction F]
        [--no-refit] [--json bench-results/encoders_prune.json]

Prunes a copy of the model on 512 SST-2 train sentences (never the STS-B data it is scored on), then
reports the removed share of the block weights, STS-B dev Spearman of both models, and embeddings/s on
the 3,000 STS-B dev sentences at batch 32, the two models interleaved `repeats` times (medians; the
machine's load average is written next to them). Also checks that the pruned model saves and reloads
to the same embeddings.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leanformer.encoders.embed import embed
from leanformer.encoders.prune_encoder import prune_encoder_
from leanformer.encoders.quality import eval_stsb, glue_path, read_tsv


def main(argv: list[str] | None = None) -> int:
    from leanformer.encoders.build import load_encoder
    from leanformer.hub import resolve_model
    from leanformer.loading import save

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="all-minilm-l6-v2")
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--head-fraction", type=float, default=None)
    p.add_argument("--multiple", type=int, default=32)
    p.add_argument("--no-refit", action="store_true")
    p.add_argument("--limit", type=int, default=512, help="calibration sentences (SST-2 train)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="bench-results/encoders_prune.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    base, tok = load_encoder(resolve_model(a.model))
    pruned = copy.deepcopy(base)
    calib = [r["sentence"] for r in read_tsv(glue_path("sst2", "train"), a.limit)]
    t0 = time.perf_counter()
    report = prune_encoder_(pruned, tok, calib, a.fraction, a.head_fraction, a.multiple, refit=not a.no_refit)
    report["prune_seconds"] = round(time.perf_counter() - t0, 1)
    report["stsb_base"] = eval_stsb(base, tok)["stsb_spearman"]
    report["stsb_pruned"] = eval_stsb(pruned, tok)["stsb_spearman"]
    report["stsb_delta"] = report["stsb_pruned"] - report["stsb_base"]
    rows = read_tsv(glue_path("stsb"))
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    with tempfile.TemporaryDirectory() as d:  # save → reload gives the same model
        save(pruned, tok, Path(d) / "m")
        again, _ = load_encoder(Path(d) / "m")
        report["reload_max_abs_diff"] = float(
            np.abs(embed(again, tok, texts[:64]) - embed(pruned, tok, texts[:64])).max()
        )
    secs: dict[str, list[float]] = {"base": [], "pruned": []}
    load_before = Path("/proc/loadavg").read_text().strip()
    embed(base, tok, texts[:64]), embed(pruned, tok, texts[:64])  # warm-up
    for rep in range(a.repeats):  # interleaved, alternating order: load hits both alike
        for name in ("base", "pruned") if rep % 2 == 0 else ("pruned", "base"):
            m = base if name == "base" else pruned
            t = time.perf_counter()
            embed(m, tok, texts, 32)
            secs[name].append(time.perf_counter() - t)
    report["embeddings_per_s"] = {n: len(texts) / statistics.median(s) for n, s in secs.items()}
    report["speedup"] = report["embeddings_per_s"]["pruned"] / report["embeddings_per_s"]["base"]
    report["loadavg"] = [load_before, Path("/proc/loadavg").read_text().strip()]
    report["settings"] = vars(a)
    print(json.dumps(report, indent=1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
