"""Saved pruned / factorised models against their original: bytes on disk, peak RSS after load, decode.

    python -m leanformer.measure.bench.pruned BASE FOLDER [FOLDER ...] [--sparse-memory]
        [--new-tokens 32] [--rounds 5] [--json bench-results/pruned.json]

BASE is the original (a folder or a known name such as smollm2, read dequantized to fp32), each FOLDER a
`leanformer compress` output. For each: the weight file's bytes; the peak RSS of a fresh process that
only loads it (`ru_maxrss`, load-independent); greedy decode tokens/s at batch 1 (64-token prompt,
median timed step), every model in one process, interleaved over `rounds` rounds, reported as the
ratio to BASE in the same round (median over rounds) with /proc/loadavg before and after.
--sparse-memory also runs each folder holding a SparseStorage with memory "sparse" (compress/sparse.py);
--module-path each folder without the fused C++ decode step (what a LowRankLinear cost before it fused).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RSS_SNIPPET = """
import resource, sys
from leanformer.loading import load
from leanformer.hub import resolve_model
model, _ = load(resolve_model(sys.argv[1]), keep_quantized=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _file_mb(path: Path) -> float | None:
    files = list(path.glob("*.safetensors")) if path.is_dir() else []  # a GGUF original: not its fp32 size
    return sum(f.stat().st_size for f in files) / 1e6 if files else None


def sparse_view(folder: Path, into: Path) -> Path:
    """A folder reading the same weight file with the recipe's SparseStorage memory set to "sparse",
    so the load builds SparseLinear modules straight from the file (never a dense copy)."""
    into.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json":
            (into / f.name).symlink_to(f.resolve())
    cfg = json.loads((folder / "config.json").read_text())
    for stage in cfg["leanformer"]["recipe"]["stages"]:
        if stage.get("type") == "SparseStorage":
            stage["memory"] = "sparse"
    (into / "config.json").write_text(json.dumps(cfg))
    return into


def peak_rss_mb(model: str) -> float:
    """Peak RSS (MB) of a fresh one-thread process that loads `model` and nothing else."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SNIPPET, model],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def _load(name: str):
    from leanformer.hub import resolve_model
    from leanformer.loading import load

    return load(resolve_model(name), keep_quantized=False)[0]


def main(argv: list[str] | None = None) -> int:
    from leanformer.cli.compress import decode_speed
    from leanformer.hub import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("folders", nargs="+")
    p.add_argument("--sparse-memory", action="store_true")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--module-path", action="store_true", help="also each FOLDER without the fused decode step"
    )
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="lf-pruned-"))
    variants = [(args.base, "dense", args.base)] + [(f, "dense", f) for f in args.folders]
    if args.sparse_memory:
        variants += [
            (f, "sparse", str(sparse_view(Path(f), tmp / str(i))))
            for i, f in enumerate(args.folders)
            if _has_sparse_storage(Path(f))
        ]
    if args.module_path:
        variants += [(f, "module path", f) for f in args.folders]
    rows = {}
    for name, memory, path in variants:
        key = f"{name} [{memory}]"
        rows[key] = {"file_mb": _file_mb(Path(resolve_model(name)))}
        if not args.no_rss and memory != "module path":  # the same load as dense
            rows[key]["peak_rss_mb"] = peak_rss_mb(path)
        print(key, rows[key], flush=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    models = {f"{n} [{m}]": _load(path) for n, m, path in variants}
    for key, model in models.items():
        model.fused_decode = not key.endswith("[module path]")
    vocab = next(iter(models.values())).args.vocab_size
    rates: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for k, model in models.items():
            rates[k].append(decode_speed(model, vocab, args.new_tokens))
        print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.1f}" for v in rates.values()), flush=True)
    base = next(iter(rates))
    for k in rates:
        ratios = [a / b for a, b in zip(rates[k], rates[base])]
        rows[k] |= {"decode_tok_s": statistics.median(rates[k]), "vs_base": statistics.median(ratios)}
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    print("| model | memory | file MB | peak RSS after load MB | decode tok/s | vs base |")
    print("|---|---|---|---|---|---|")
    for k, row in rows.items():
        name, memory = k.rsplit(" [", 1)
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        print(
            f"| {name} | {memory[:-1]} | {fmt(row['file_mb'], '.1f')} | {fmt(row.get('peak_rss_mb'), '.0f')} "
            f"| {row['decode_tok_s']:.1f} | {row['vs_base']:.2f}x |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"load": [load_before, load_after], "rows": rows}, indent=2))
    return 0


def _has_sparse_storage(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    stages = json.loads(cfg.read_text()).get("leanformer", {}).get("recipe", {}).get("stages", [])
    return any(s.get("type") == "SparseStorage" for s in stages)


if __name__ == "__main__":
    raise SystemExit(main())
