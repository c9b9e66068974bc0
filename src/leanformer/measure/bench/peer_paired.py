"""Decode speed against llama.cpp in ONE process, interleaved round by round: the ratio per round.

`leanformer bench --peers llama.cpp` now also lets the engines take turns (each in its own process, for
peak RSS: turns.py); this module predates that and keeps both in one process, with --prefill lengths. Here both engines load
once (llama.cpp through llama-cpp-python, as the peer worker drives it) and take turns, order alternating,
on the same random prompts; each round's ratio is ours / llama.cpp's decode tok/s (the median step of a
generation, as `bench` measures), and the table shows the median and range over rounds.

    python -m leanformer.measure.bench.peer_paired /tmp/h17/smollm2-Q4_0.gguf --recipe kv-fp16 \\
        --batch 1 8 --rounds 9
    python -m leanformer.measure.bench.peer_paired /tmp/h17/smollm2-Q4_0.gguf --batch 1 \\
        --prefill 17 40 128 512 --rounds 9

`--prefill N ...`: also the time to the first token of a batch-1 prompt of each length (prefill into the
KV cache plus the first greedy token: our `generate(..., max_new_tokens=1)`, llama.cpp's llama_decode of
the prompt and an argmax), as prompt tokens per second, in the same rounds.

The GGUF stays quantized on our side (Q4_0 → int4 modules, Q8_0 → int8); `--recipe kv-fp16` stores our
KV cache as float16 like llama.cpp's default (its K and V are f16 unless told otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from leanformer.engine.generate import generate
from leanformer.measure.bench.paired import decode_tok_s


def _llama_cpp(path: str, batches: list[int], prompt_tokens: int, new_tokens: int, threads: int):
    """llama.cpp's engine from bench's peer worker (loaded by file path there; imported here)."""
    import llama_cpp

    from leanformer.measure.bench import peer_worker

    cfg = {"batches": batches, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads}
    engine = peer_worker.LlamaCpp(path, cfg)
    engine.version = llama_cpp.__version__
    return engine, peer_worker.prompts


def _check(args, error) -> None:
    """Bad input → one error before any model loads."""
    path = Path(args.model)
    if path.suffix != ".gguf":
        raise error(f"{args.model}: llama.cpp reads .gguf files; give the model as one")
    if not path.is_file():
        raise error(f"{args.model}: no such file")
    least = {"--rounds": (args.rounds, 1), "--prompt-tokens": (args.prompt_tokens, 1),
             "--new-tokens": (args.new_tokens, 2), "--threads": (args.threads, 1)}  # fmt: skip
    for flag, (value, low) in least.items():
        if value < low:
            raise error(f"{flag} must be at least {low}, got {value}")
    if any(b < 1 for b in args.batch):
        raise error(f"--batch sizes must be at least 1, got {args.batch}")
    if any(n < 1 for n in args.prefill):
        raise error(f"--prefill lengths must be at least 1, got {args.prefill}")
    if not 0 <= args.gap < 60:  # also refuses nan
        raise error(f"--gap must be in [0, 60) seconds, got {args.gap}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .gguf file (both engines read it)")
    p.add_argument("--recipe", help="applied to our side, e.g. kv-fp16 ('none' or unset: the file as is)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gap", type=float, default=0.2, help="seconds between engines (idle threads settle)")
    p.add_argument("--prefill", nargs="*", type=int, default=[], help="prompt lengths to time prefill at")
    args = p.parse_args(argv)

    from leanformer.compress import apply, load_recipe
    from leanformer.errors import LeanformerError
    from leanformer.kernels import cpu
    from leanformer.loading import load

    _check(args, LeanformerError)
    recipe = load_recipe(args.recipe) if args.recipe and args.recipe != "none" else None  # bad names first
    try:
        peer, peer_prompts = _llama_cpp(
            args.model, args.batch, max([args.prompt_tokens, *args.prefill]), args.new_tokens, args.threads
        )
    except ImportError as e:
        raise LeanformerError(f"llama.cpp is not installed ({e}); pip install llama-cpp-python") from e
    except RuntimeError as e:  # the peer worker's own one-line reasons (file it cannot load, ...)
        raise LeanformerError(f"llama.cpp: {e}") from e
    torch.set_num_threads(args.threads)
    model, _ = load(args.model, keep_quantized=True)
    if recipe is not None:
        model = apply(model, recipe)
    n = max(args.new_tokens, 2)

    def theirs(b: int) -> float:
        ids = peer_prompts(peer.vocab, b, args.prompt_tokens)
        try:
            return b / statistics.median(peer.steps(ids, n))
        except RuntimeError as e:  # llama_decode refused: one line, not a traceback
            hint = (
                "; seen at --batch 8 beside --prefill 512 here: run them separately" if args.prefill else ""
            )
            raise LeanformerError(f"llama.cpp at batch {b}: {e}{hint}") from e

    def ours(b: int) -> float:
        with torch.inference_mode():
            return decode_tok_s(model, b, args.prompt_tokens, n)

    def prefill_ours(ids: list[int]) -> float:
        t = time.perf_counter()
        generate(model, None, ids, max_new_tokens=1, ignore_eos=True)
        return len(ids) / (time.perf_counter() - t)

    def prefill_theirs(ids: list[int]) -> float:
        t = time.perf_counter()
        try:
            peer.prefill([ids])
        except RuntimeError as e:
            raise LeanformerError(f"llama.cpp prefill of {len(ids)} tokens: {e}") from e
        return len(ids) / (time.perf_counter() - t)

    prompts = {n: peer_prompts(peer.vocab, 1, n)[0] for n in args.prefill}
    for b in args.batch:  # warm-up: kernels, decode plans, llama.cpp's graphs
        ours(b), theirs(b)
    for ids in prompts.values():
        prefill_ours(ids), prefill_theirs(ids)
    runs = {b: [] for b in args.batch}
    prefills = {n: [] for n in args.prefill}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for n, ids in prompts.items():
            pair = (prefill_ours, prefill_theirs) if r % 2 == 0 else (prefill_theirs, prefill_ours)
            got = {}
            for fn in pair:
                time.sleep(args.gap)
                got[fn] = fn(ids)
            prefills[n].append((got[prefill_ours], got[prefill_theirs]))
        for b in args.batch:
            got = {}
            for name, fn in (
                (("ours", ours), ("theirs", theirs)) if r % 2 == 0 else (("theirs", theirs), ("ours", ours))
            ):
                time.sleep(args.gap)
                got[name] = fn(b)
            runs[b].append((got["ours"], got["theirs"]))
    from leanformer import kernels

    isa = kernels.ext().act_isa() if kernels.available() else "no kernels"
    label = f" + {args.recipe}" if recipe is not None else ""
    print(f"{cpu.cpu_info()['model']} ({isa}); {args.threads} threads; ours: {Path(args.model).name} kept")
    print(f"quantized{label}; llama.cpp {peer.version}: the same file")
    print("| batch | ours tok/s | llama.cpp tok/s | ours / llama.cpp, median (range) | rounds |")
    print("|---|---|---|---|---|")
    rows = []
    for b in args.batch:
        ratios = [o / t for o, t in runs[b]]
        row = {
            "batch": b, "ours": statistics.median(o for o, _ in runs[b]),
            "llama.cpp": statistics.median(t for _, t in runs[b]), "ratio": statistics.median(ratios),
            "min": min(ratios), "max": max(ratios),
        }  # fmt: skip
        rows.append(row)
        print(
            f"| {b} | {row['ours']:.1f} | {row['llama.cpp']:.1f} | **{row['ratio']:.2f}×** "
            f"({row['min']:.2f}–{row['max']:.2f}) | {len(ratios)} |"
        )
    if prefills:
        print(
            "\n| prompt tokens | ours prefill tok/s | llama.cpp prefill tok/s | ours / llama.cpp, median (range) |"
        )
        print("|---|---|---|---|")
    for n, pairs in prefills.items():
        ratios = [o / t for o, t in pairs]
        row = {
            "prefill": n, "ours": statistics.median(o for o, _ in pairs),
            "llama.cpp": statistics.median(t for _, t in pairs), "ratio": statistics.median(ratios),
            "min": min(ratios), "max": max(ratios),
        }  # fmt: skip
        rows.append(row)
        print(
            f"| {n} | {row['ours']:.0f} | {row['llama.cpp']:.0f} | **{row['ratio']:.2f}×** "
            f"({row['min']:.2f}–{row['max']:.2f}) |"
        )
    return rows


if __name__ == "__main__":
    import sys

    from leanformer.errors import LeanformerError

    try:
        main()
    except LeanformerError as e:
        sys.exit(f"error: {e}")
