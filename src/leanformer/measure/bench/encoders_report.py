"""Ratios, issue-target checks and the printed tables of the encoder benchmark (bench/encoders.py)."""

from __future__ import annotations

import json

from leanformer.measure.bench.encoders_engines import BF16, F16, FP32, INT8, ORT8, ST

INT8_SPEEDUP = 1.8  # issue #4: Int8Dynamic embeddings/s vs our fp32, every workload
INT8_SPEARMAN_DROP = 0.002  # issue #4: STS-B Spearman drop vs fp32, at most
INT8_MIN_COSINE = 0.97  # issue #4: every embedding's cosine to fp32, at least
PRUNE_SPEEDUP = {0.5: {"long128": 1.1, "long256": 1.2}}  # issue #3: fraction → workload → × unpruned
ST_SPEEDUP = 2.0  # issue #17: embeddings/s vs sentence-transformers fp32, every workload
ST_MIN_COSINE = 0.9999  # issue #17: ... with every embedding's cosine to sentence-transformers' at least


def _label(workload: str) -> str:
    return "STS-B" if workload == "stsb" else f"{workload.removeprefix('long')}-tok"


def add_ratios(results: dict, workloads: list[str]) -> None:
    """Per engine: × sentence-transformers and × leanformer fp32 (wall and CPU time), Spearman drop vs
    leanformer fp32 (positive = worse) and the minimum cosine to the fp32 reference over every workload."""
    st, ours = results[ST], results[FP32]
    for r in results.values():
        for w in workloads:
            for key, base in (("speedup", st), ("vs_fp32", ours)):
                r[f"{w}_{key}"] = round(r[f"{w}_sentences_per_s"] / base[f"{w}_sentences_per_s"], 2)
                cpu = r[f"{w}_sentences_per_cpu_s"] / base[f"{w}_sentences_per_cpu_s"]
                r[f"{w}_cpu_{key}"] = round(cpu, 2)
        r["stsb_spearman_drop"] = round(ours["stsb_spearman"] - r["stsb_spearman"], 4)
        r["cosine_min"] = min(r[f"{w}_cosine_min"] for w in workloads)


def _check(issue, check, engine, value, target=None, cpu_value=None) -> dict:
    """target: (op, bound) with op "≥" or "≤", or None for a figure reported without a target."""
    ok = None
    if target is not None:
        op, bound = target
        ok = bool(value >= bound if op == "≥" else value <= bound)
    row = {"issue": issue, "check": check, "engine": engine, "value": value, "cpu_value": cpu_value}
    return row | {"target": f"{target[0]} {target[1]}" if target else None, "ok": ok}


def target_checks(results: dict, workloads: list[str]) -> list[dict]:
    """The figures issues #3 (head pruning), #4 (int8 dynamic quantization) and #17 (vs
    sentence-transformers at its quality) ask for, with pass/fail."""

    def at_least(issue: str, what: str, name: str, key: str, bound: float) -> list[dict]:
        """One check a workload: results[name]'s wall-time ratio `key` (and its CPU-time twin) ≥ bound."""
        r = results[name]
        return [
            _check(issue, f"{what}, {_label(w)}", name, r[f"{w}_{key}"], ("≥", bound), r[f"{w}_cpu_{key}"])
            for w in workloads
        ]

    out = []
    for name in (FP32, BF16, F16):
        if name in results:
            out += at_least("#17", "× ST", name, "speedup", ST_SPEEDUP)
            cos = ("≥", ST_MIN_COSINE)
            out.append(
                _check(
                    "#17", "min cosine vs ST, all workloads", name, round(results[name]["cosine_min"], 6), cos
                )
            )
    if INT8 in results:
        r = results[INT8]
        out += at_least("#4", "× fp32", INT8, "vs_fp32", INT8_SPEEDUP)
        if ORT8 in results:
            o = results[ORT8]
            for w in workloads:
                wall = round(r[f"{w}_sentences_per_s"] / o[f"{w}_sentences_per_s"], 2)
                cpu = round(r[f"{w}_sentences_per_cpu_s"] / o[f"{w}_sentences_per_cpu_s"], 2)
                out.append(_check("#4", f"× ONNX Runtime int8, {_label(w)}", INT8, wall, None, cpu))
    for name in (INT8, ORT8):
        if name in results:
            r = results[name]
            drop = ("≤", INT8_SPEARMAN_DROP)
            out.append(_check("#4", "STS-B Spearman drop vs fp32", name, r["stsb_spearman_drop"], drop))
            cos = ("≥", INT8_MIN_COSINE)
            out.append(
                _check("#4", "min cosine vs fp32, all workloads", name, round(r["cosine_min"], 6), cos)
            )
    for name, r in results.items():
        frac = r.get("heads_pruned")
        if frac is None:
            continue
        for w in workloads:
            if w == "stsb":
                continue
            bound = PRUNE_SPEEDUP.get(frac, {}).get(w)
            t = ("≥", bound) if bound else None
            out.append(
                _check("#3", f"× unpruned, {_label(w)}", name, r[f"{w}_vs_fp32"], t, r[f"{w}_cpu_vs_fp32"])
            )
        out.append(_check("#3", "STS-B Spearman (drop vs unpruned)", name, r["stsb_spearman"]))
        out[-1]["check"] += f": {r['stsb_spearman_drop']:+.4f}"
    return out


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def print_table(report: dict) -> None:
    results = report["results"]
    workloads = list(report["meta"]["workloads"])
    labels = [_label(w) for w in workloads]
    cols = ["engine"]
    for lab in labels:
        cols += [f"{lab} sent/s", "× ST", "× fp32"]
    print("Speed (median wall time; × ST = vs sentence-transformers fp32, × fp32 = vs leanformer fp32)\n")
    print(_row(cols) + "\n|" + "---|" * len(cols))
    for name, r in results.items():
        cells = [name]
        for w in workloads:
            cells += [
                f"{r[f'{w}_sentences_per_s']:.1f}",
                f"{r[f'{w}_speedup']:.2f}",
                f"{r[f'{w}_vs_fp32']:.2f}",
            ]
        print(_row(cells))
    slash = " / ".join(labels)
    cols = ["engine", f"× ST CPU-time {slash}", f"× fp32 CPU-time {slash}", "STS-B Spearman", "Δ vs fp32"]
    cols += [f"min cos vs ST fp32, {slash}"]
    print("\nCPU-time ratios and quality\n\n" + _row(cols) + "\n|" + "---|" * len(cols))
    for name, r in results.items():
        cells = [name, " / ".join(f"{r[f'{w}_cpu_speedup']:.2f}" for w in workloads)]
        cells += [" / ".join(f"{r[f'{w}_cpu_vs_fp32']:.2f}" for w in workloads)]
        cells += [f"{r['stsb_spearman']:.4f}", f"{-r['stsb_spearman_drop']:+.4f}"]
        cells += [" / ".join(f"{r[f'{w}_cosine_min']:.6f}" for w in workloads)]
        print(_row(cells))
    if report.get("targets"):
        cols = ["issue", "engine", "figure", "value", "CPU-time value", "target", "met"]
        print("\nIssue targets\n\n" + _row(cols) + "\n|" + "---|" * len(cols))
        for c in report["targets"]:
            met = {True: "yes", False: "**no**", None: ""}[c["ok"]]
            cpu = "" if c["cpu_value"] is None else c["cpu_value"]
            print(_row([c["issue"], c["engine"], c["check"], c["value"], cpu, c["target"] or "—", met]))
    print("\n" + json.dumps(report["meta"]))
