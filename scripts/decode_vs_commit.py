"""Batch-1 decode of GGUF files under two code trees, in alternating processes (docs/BENCHMARKS.md, issue
#12: a Q4_K_M file on today's code against the Q4_0 file on the code of the day the issue was filed).

    git worktree add --detach /tmp/old c7ad62e
    python scripts/decode_vs_commit.py /tmp/old/src OLD.gguf NEW.gguf [NEW2.gguf ...] [--rounds 4]

Runs `leanformer bench FILE --batch 1 --new-tokens 64 --prompt-tokens 64 --repeats 3` with one thread:
OLD.gguf on the old tree, then every NEW file on this tree (and OLD.gguf too), round after round, and
prints each row's median tok/s and its ratio to the first row, with /proc/loadavg before and after.
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

HERE = Path(__file__).resolve().parents[1] / "src"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def decode_rate(src: Path, model: str, old: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        args = ["leanformer", "bench", model, "--batch", "1", "--new-tokens", "64", "--prompt-tokens", "64"]
        args += ["--repeats", "3", "--json", str(out)] + (["--keep-quantized"] if old else [])
        entry = "leanformer.cli" if old else "leanformer.cli.main"  # the CLI's module before / after #11
        code = f"import sys; from {entry} import main; sys.argv = {args!r}; main()"
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        return json.loads(out.read_text())["results"][0]["decode_tok_s_b1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old_src", type=Path, help="the old tree's src/ folder")
    p.add_argument("old_model", help="the file the old code runs (and this code too)")
    p.add_argument("models", nargs="+", help="files this code runs")
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    rows = [(f"{Path(a.old_model).name}, old code", a.old_src, a.old_model, True)]
    rows += [(f"{Path(m).name}, this code", HERE, m, False) for m in [a.old_model, *a.models]]
    rates: list[list[float]] = [[] for _ in rows]
    before = loadavg()
    for _ in range(a.rounds):
        for i, (_, src, model, old) in enumerate(rows):
            rates[i].append(decode_rate(src, model, old))
    base = statistics.median(rates[0])
    for (name, *_), r in zip(rows, rates):
        med = statistics.median(r)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x | {', '.join(f'{x:.1f}' for x in r)} |")
    print(f"loadavg before {before}, after {loadavg()}")


if __name__ == "__main__":
    main()
