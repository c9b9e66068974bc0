"""`leanformer report`: a Markdown report with PNG plots from a sweep (measure/sweep.py).

    DIR/report.md          tables + the plots, with the machine and the protocol
    DIR/results.json       the sweep itself (`report --from DIR/results.json` re-renders it)
    DIR/pareto_ppl.png     decode tok/s (b=1) vs ΔPPL %, Pareto front marked, peers as vertical lines
    DIR/pareto_kld.png     the same against mean KLD
    DIR/memory.png         peak RSS and weight size per recipe (peers too)

The folder is built beside DIR and renamed in (outputs.replace_dir): never half a report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from leanformer.measure.sweep import pareto_front
from leanformer.outputs import check_output_dir, new_temp_dir, replace_dir, write_file_atomic

FILES = ("report.md", "results.json")


def is_report(path: Path) -> bool:
    """An earlier report folder (safe to replace without --overwrite)."""
    return all((path / f).is_file() for f in FILES)


def check_report_dir(out: str, overwrite: bool, inputs: list[str]) -> Path:
    return check_output_dir(out, overwrite, inputs, ours=is_report, kind="leanformer report")


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def _speed_plot(results: dict, loss: str, label: str, path: Path, decode: str = "decode_tok_s_b1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _ok(results["recipes"]) if decode in r and loss in r]
    pts = [(r[decode], r[loss]) for r in rows]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.scatter(
        [p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3, label="leanformer recipe"
    )
    if front:
        ax.plot(
            [pts[i][0] for i in front], [pts[i][1] for i in front], "-o", color="tab:red", zorder=4,
            label="Pareto front",
        )  # fmt: skip
    for r, (x, y) in zip(rows, pts):
        ax.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, p in enumerate(_ok(results.get("peers", []))):
        if decode in p:
            ax.axvline(p[decode], ls="--", color=f"C{(i + 2) % 10}", label=f"{p['label']} ({p['dtype']})")
    ax.set_xlabel(f"decode tokens/s, batch {decode.rsplit('b', 1)[-1]} (higher is better)")
    ax.set_ylabel(f"{label} (lower is better)")
    if loss == "kld" and all(p[1] > 0 for p in pts if p[1] == p[1]) and pts:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{Path(results['config']['model']).name}: speed vs quality", fontsize=10)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _memory_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r["recipe"], r) for r in _ok(results["recipes"])]
    rows += [(f"{p['label']} ({p['dtype']})", p) for p in _ok(results.get("peers", []))]
    names = [n for n, _ in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.5), dpi=120)
    y = list(range(len(rows)))
    ax.barh([v - 0.2 for v in y], [r.get("peak_rss_mb", 0) for _, r in rows], 0.4, label="peak RSS (MB)")
    ax.barh([v + 0.2 for v in y], [r.get("size_mb", 0) for _, r in rows], 0.4, label="weights (MB)")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MB")
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _fmt(v, spec: str = ".1f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(results: dict) -> str:
    cfg, machine = results["config"], results["machine"]
    batches = cfg.get("batches", [1])
    rows = results["recipes"]
    ok = _ok(rows)
    front = {
        ok[i]["recipe"]
        for i in pareto_front([(r.get("decode_tok_s_b1", math.nan), r["delta_ppl_pct"]) for r in ok])
    }
    cpu = machine["cpu"]
    flags = cpu["flags"] if isinstance(cpu["flags"], list) else [f for f, on in cpu["flags"].items() if on]
    where = (
        machine.get("summary") or f"{cpu['model']} [{','.join(flags)}]; kernels {machine.get('kernel_isa')}"
    )
    lines = [
        f"# leanformer report: {Path(cfg['model']).name}",
        "",
        f"CPU: {where}. Load average at the start: {results.get('loadavg', '?')}.",
        "",
        f"Quality: {cfg['data']} (first {cfg['max_chars'] or 'all'} characters, {cfg.get('eval_tokens', '?')} "
        f"tokens), non-overlapping windows of {cfg['window']}, each recipe against the uncompressed model "
        f"(PPL {_fmt(cfg.get('base_ppl'), '.3f')}). Speed: `leanformer bench`, each recipe and peer in its own "
        f"process, all taking turns for {cfg['repeats']} rounds, {cfg['prompt_tokens']}-token prompt, "
        f"{cfg['new_tokens']} new tokens, median decode step over the rounds. ★ = on the Pareto front "
        f"(decode b=1 vs ΔPPL).",
        "",
        "![speed vs ΔPPL](pareto_ppl.png)",
        "",
    ]
    head = ["recipe", "ΔPPL %", "KLD", "top-1", *(f"decode b={b}" for b in batches), "prefill tok/s"]
    head += ["% ceiling", "peak RSS MB", "weights MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        pct = 100 * r["decode_tok_s_b1"] / r["ceiling_tok_s"] if "decode_tok_s_b1" in r else None
        cells = [
            ("★ " if r["recipe"] in front else "") + r["recipe"], _fmt(r["delta_ppl_pct"], "+.2f"),
            _fmt(r["kld"], ".4f"), _fmt(100 * r["top1"], ".1f") + "%",
            *(_fmt(r.get(f"decode_tok_s_b{b}")) for b in batches), _fmt(r.get("prefill_tok_s")),
            _fmt(pct, ".0f"), _fmt(r.get("peak_rss_mb"), ".0f"), _fmt(r.get("size_mb")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    peers = results.get("peers", [])
    if peers:
        lines += ["", "## Peers (same weights, each in its own process; quality not measured here)", ""]
        ph = ["peer", "weights", *(f"decode b={b}" for b in batches), "prefill tok/s", "peak RSS MB"]
        lines += ["| " + " | ".join(ph) + " |", "|" + "---|" * len(ph)]
        for p in peers:
            if "error" in p:
                lines.append(
                    f"| {p['label']} | {p['dtype']} | not measured: {p['error']} |" + " |" * (len(ph) - 3)
                )
                continue
            cells = [p["label"], p["dtype"], *(_fmt(p.get(f"decode_tok_s_b{b}")) for b in batches)]
            lines.append(
                "| "
                + " | ".join([*cells, _fmt(p.get("prefill_tok_s")), _fmt(p.get("peak_rss_mb"), ".0f")])
                + " |"
            )
    lines += ["", "![speed vs KLD](pareto_kld.png)", "", "![memory](memory.png)", ""]
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> Path:
    """Render `results` (run_sweep's dict) into the folder `out` (checked by check_report_dir)."""
    tmp = new_temp_dir(out)
    try:
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        _speed_plot(results, "delta_ppl_pct", "ΔPPL % vs the uncompressed model", tmp / "pareto_ppl.png")
        _speed_plot(results, "kld", "mean KLD vs the uncompressed model", tmp / "pareto_kld.png")
        _memory_plot(results, tmp / "memory.png")
        (tmp / "report.md").write_text(markdown(results))
        replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.md"


def read_results(path: str) -> dict:
    """A results.json written by an earlier report (or its folder)."""
    from leanformer.errors import LeanformerError

    p = Path(path).expanduser()
    p = p / "results.json" if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LeanformerError(f"cannot read sweep results {p}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), list) or "config" not in data:
        raise LeanformerError(f"{p} is not a report's results.json (no 'recipes' / 'config')")
    return data
