"""Run a function on N local ranks (gloo on CPU, spawned processes) and the per-model checks they run.

The parent computes the reference on the single-process model; each rank saves what the sharded
model produced (torch.save), and the test compares. One spawn runs all of a test's models: starting
processes (importing torch) is the slow part.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPT = [1, 5, 9, 2, 7, 3, 11, 4]


def outputs(model, n_new: int = 12) -> dict:
    """Full-forward logits [1, T, V], prefill-with-cache + one decode step logits, greedy ids."""
    from leanformer.engine.generate import generate
    from leanformer.models.kv_cache import KVCache

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 1, 64)
        slots = torch.tensor([0])
        prefill = model(ids, cache, slots)
        cache.advance(slots, ids.shape[1])
        step = model(prefill[:, -1:].argmax(-1), cache, slots)
    greedy = generate(model, None, PROMPT, max_new_tokens=n_new, ignore_eos=True)
    heads, layers = cache.k[0].shape[1], len(cache.k)
    from leanformer.distributed.tensor_parallel import blocks_of

    block = blocks_of(model)[0]
    mlp = getattr(block, "layers", [block])[0].mlp  # a pipeline Stage holds its blocks
    down = getattr(mlp, "down_proj", None) or mlp.c_proj  # Llama / GPT-2
    kind = type(getattr(down, "linear", down)).__name__  # the module doing the math (inside AllReduceLinear)
    return (
        {"full": full, "step": step, "greedy": greedy, "cache_heads": heads, "cache_layers": layers}
        | {"kind": kind}
        | batched(model)
    )


def batched(model) -> dict:
    """Three rows at once (pipeline parallel runs them as micro-batches): a forward without a cache
    [3, T, V], and one decode step [3, 1, V] over slots at three different lengths, in slot order
    2, 0, 1 (the indexed cache path, per-row masks)."""
    from leanformer.models.kv_cache import KVCache

    rows = torch.tensor([PROMPT, PROMPT[::-1], [3] * len(PROMPT)])
    cache = KVCache.for_model(model, 3, 64)
    with torch.no_grad():
        full = model(rows)
        for slot, n in ((0, 8), (1, 5), (2, 3)):
            model(rows[slot : slot + 1, :n], cache, torch.tensor([slot]))
            cache.advance(torch.tensor([slot]), n)
        step = model(torch.tensor([[4], [5], [6]]), cache, torch.tensor([2, 0, 1]))
    return {"batch_full": full, "batch_step": step}


def load_as(path: str, dtype: str = "float32"):
    """The model at `path` in `dtype`; float64 takes away fp32 rounding (summation order) to show
    the sharded arithmetic itself is exact; "int8" / "int4" / "bf16" quantize it first (round-to-nearest:
    deterministic, so every process gets the same codes)."""
    from leanformer.compress import BF16WeightOnly, Int4WeightOnly, Int8WeightOnly, quantize_
    from leanformer.loading import load

    if dtype in ("int8", "int4", "bf16"):
        from leanformer.compress import set_activations

        model, _ = load(path)
        config = {"int8": Int8WeightOnly(), "int4": Int4WeightOnly(group_size=32), "bf16": BF16WeightOnly()}[
            dtype
        ]
        model = quantize_(model, config)
        # fp32 activations on both sides: a split Linear's int8 activation blocks would not be the whole
        # one's, and the one-process reference would otherwise take int8 where that is the default
        set_activations(model, "fp32")
        return model

    # plain Linears for float64: the oneDNN packed copies of the fast path are fp32-only
    model, _ = load(path, fast=dtype == "float32", keep_quantized=False)  # a GGUF as float weights
    return model.to(getattr(torch, dtype))


def _worker(rank: int, jobs: list[tuple], out: str) -> None:
    from leanformer.compress import qbase
    from leanformer.distributed import parallelize_, pipeline_
    from leanformer.errors import LeanformerError

    qbase.PREFILL_BF16 = False  # as the tests' references: see test_two_ranks_match_one_process

    for name, path, dtype, split in jobs:
        model = load_as(path, dtype)
        try:
            (parallelize_ if split == "tp" else pipeline_)(model)
        except LeanformerError as e:
            torch.save({"error": str(e)}, Path(out) / f"{name}-{rank}.pt")
            continue
        torch.save(outputs(model), Path(out) / f"{name}-{rank}.pt")


def _joined(rank: int, size: int, init: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)  # N ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=size, timeout=timedelta(seconds=60)
    )
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def on_ranks(size: int, tmp: Path, fn, *args) -> None:
    """Run fn(rank, *args) on `size` forked local ranks, each in the gloo group of all of them."""
    tmp.mkdir(parents=True, exist_ok=True)
    # fork, not spawn: the children inherit the imported torch and leanformer (spawning re-imported
    # them: ~9 s per run on this shared 2-core machine, the job itself well under a second); as in
    # DataLoader workers, each child sets one intra-op thread before its first op
    init = str(tmp / "rendezvous")
    mp.start_processes(_joined, args=(size, init, fn, args), nprocs=size, join=True, start_method="fork")


def run_ranks(size: int, jobs: list[tuple], tmp: Path) -> dict[str, list[dict]]:
    """name → [rank 0's results, rank 1's, ...] for every (name, model path, dtype, "tp" | "pp") job."""
    on_ranks(size, tmp, _worker, jobs, str(tmp))
    return {job[0]: [torch.load(tmp / f"{job[0]}-{r}.pt") for r in range(size)] for job in jobs}
