"""`torchrun --standalone --nproc-per-node N -m leanformer bench MODEL --tp N`: bench under tensor parallel.

Plain `bench` runs each engine in a fresh process; under torchrun the N ranks ARE the engine, so the
split model is measured in place, with the same prompts and the same figures as runner.measure, but
every timed region starts after a barrier and counts the slowest rank (distributed/timing.py).
Weights and peak RSS are per rank (the largest); the footnote gives all the ranks together.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from leanformer.errors import LeanformerError

# bench flags that start other engines or processes: not under --tp (one model, split in place)
_REFUSED = {"peers": "--peers", "compare": "--compare", "recipe": "--recipe", "speculative": "--speculative"}


def check_args(args) -> None:
    """One line for flags --tp cannot honour, before any process group or model."""
    used = [flag for key, flag in _REFUSED.items() if getattr(args, key, None)]
    if used:
        raise LeanformerError(
            f"bench --tp measures MODEL split over the torchrun ranks only; drop {', '.join(used)} "
            "(run those without --tp)"
        )


def measure_split(model, cfg, load_s: float) -> dict:
    """runner.measure's figures for an already split `model`, on every rank (each rank calls it)."""
    from leanformer.distributed.timing import median_timed, slowest, timed_steps
    from leanformer.engine.generate import generate
    from leanformer.measure.bench.peer_worker import rss_mb
    from leanformer.measure.bench.runner import (
        _nbytes,
        _prompts,
        bandwidth_ceiling_tok_s,
        decode_rate,
        leanformer_decode_steps,
        variant_name,
    )

    vocab, size = model.args.vocab_size, _nbytes(model)  # this rank's shard (+ replicated parts)

    def prefill(ids: torch.Tensor) -> None:
        with torch.inference_mode():
            model(ids, logits_at=torch.full((len(ids),), ids.shape[1] - 1))

    def run(ids: torch.Tensor, n: int) -> None:
        generate(model, None, ids.tolist(), max_new_tokens=n, ignore_eos=True)

    out: dict = {
        "engine": "leanformer",
        "dtype": variant_name(cfg, "leanformer"),
        "activation_dtype": cfg.dtype,
    }
    out |= {"load_s": slowest([load_s])[0], "tp": dist.get_world_size()}
    one = _prompts(vocab, 1, cfg.prompt_tokens)
    out["prefill_ms"] = 1000 * median_timed(lambda: prefill(one), cfg.repeats)
    out["prefill_tok_s"] = cfg.prompt_tokens / out["prefill_ms"] * 1000
    out["ttft_ms"] = 1000 * median_timed(lambda: run(one, 1), cfg.repeats)
    n = max(cfg.new_tokens, 2)  # the first token comes with the prefill: 2 make one decode step
    for b in cfg.batches:
        ids = _prompts(vocab, b, cfg.prompt_tokens).tolist()
        leanformer_decode_steps(model, ids, n)  # warm-up
        runs = [
            timed_steps(lambda ids=ids: leanformer_decode_steps(model, ids, n)) for _ in range(cfg.repeats)
        ]
        out[f"decode_tok_s_b{b}"] = decode_rate(runs, b)
        out[f"decode_step_ms_b{b}"] = 1000 * b / out[f"decode_tok_s_b{b}"]
    rss = torch.tensor([rss_mb(), size / 2**20], dtype=torch.float64)
    top, total = rss.clone(), rss.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    out |= {"peak_rss_mb": float(top[0]), "size_mb": float(top[1])}
    out |= {"peak_rss_mb_all_ranks": float(total[0]), "size_mb_all_ranks": float(total[1])}
    # all ranks stream their shards at once, as in a decode step on one host: the slowest sets it
    dist.barrier()
    out["ceiling_tok_s"] = -slowest([-bandwidth_ceiling_tok_s(size, cfg.repeats)])[0]
    return out


def run_split(args):
    """Load MODEL split over the torchrun ranks and measure it on every rank → (BenchConfig, row) on
    rank 0, None on the others (cli/bench.py prints rank 0's table)."""
    from leanformer.cli.common import input_paths, load_model
    from leanformer.hub import resolve_model
    from leanformer.measure.bench.runner import BenchConfig
    from leanformer.outputs import check_output_file

    check_args(args)
    if args.json:
        check_output_file(args.json, input_paths(args))
    cfg = BenchConfig(
        resolve_model(args.model), args.dtype, args.prompt_tokens, args.new_tokens, args.batch, args.repeats
    )
    cfg.keep_quantized = args.keep_quantized
    t0 = time.perf_counter()
    model, _ = load_model(args)  # joins the torchrun group and splits; ranks > 0 print nothing
    row = measure_split(model, cfg, time.perf_counter() - t0)
    if dist.get_rank() != 0:
        return None
    kept = cfg.keep_quantized and cfg.model.endswith(".gguf")
    row["label"] = f"leanformer tp{args.tp}" + (" keep-quantized" if kept else "")
    return cfg, row


def footnote(row: dict) -> str:
    n = row["tp"]
    return (
        f"tp {n}: times are the slowest rank's; weights and peak RSS are per rank (the largest); "
        f"all {n} ranks together: weights {row['size_mb_all_ranks']:.1f} MB, "
        f"peak RSS {row['peak_rss_mb_all_ranks']:.1f} MB"
    )
