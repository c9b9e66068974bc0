"""The fused decode step's attention (kernels/decode_attend.h): rows that read the same keys (one
sequence's chained rows, as speculative verification sends them) and the query heads of one KV head go
through the keys together, and every row's logits equal, bit for bit, the same row's as a one-row step,
on every KV storage, slot-major or paged, whatever the thread count."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.engine.spec_chain import Chain
from leanformer.models.kv_cache import KVCache
from leanformer.models.paged_cache import PagedKVCache
from tests.conftest import tiny_hf_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71], [2, 7, 18, 28, 18],
           [1, 41, 42, 13, 56, 23, 73, 9, 30, 8, 81, 2, 99, 100, 4, 5, 66, 7, 12, 101, 3, 9, 27, 44]]  # fmt: skip
CHAINS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20], [30, 31, 32]]  # tokens fed to each slot, in order
BLOCK = 4


# head_dim 64 with 2 query heads per KV head, head_dim 128 with 3 (the AVX-512 loops' widths), 16 (AVX2);
# int4 blocks and an int8 head, as SmolLM2 is served, or fp32 weights (fp32 GEMVs, rows 2 at a time)
@pytest.fixture(
    scope="module",
    params=[(256, 4, 2, "int4"), (384, 3, 1, "int4"), (64, 4, 2, "int4"), (256, 4, 2, "fp32")],
    ids=["d64", "d128", "d16", "d64-fp32"],
)
def model(tmp_path_factory, request):
    hidden, heads, kv, weights = request.param
    d = tmp_path_factory.mktemp(f"llama{hidden}")
    cfg = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
    )
    tiny_hf_model("llama", **cfg).save_pretrained(d)
    m, _ = lf.load(d)
    assert m.args.head_dim == hidden // heads
    if weights == "int4":
        lf.quantize_(m, lf.Int4WeightOnly(group_size=32))
        lf.quantize_(m, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))
    return m


def new_cache(model, paged: bool, max_seq: int = 64):
    if not paged:
        return KVCache.for_model(model, len(PROMPTS), max_seq)
    per = max_seq // BLOCK  # blocks per slot, scattered over the pool
    cache = PagedKVCache.for_model(model, len(PROMPTS), max_seq, num_blocks=3 * per, block_size=BLOCK)
    order = torch.randperm(3 * per, generator=torch.Generator().manual_seed(0))
    cache.block_tables[:, :per] = order.view(3, per)
    return cache


def prefilled(model, paged: bool, prompts=PROMPTS, max_seq: int = 64):
    cache = new_cache(model, paged, max_seq)
    for s, p in enumerate(prompts):
        slot = torch.tensor([s])
        model(torch.tensor([p]), cache=cache, slots=slot)
        cache.advance(slot, len(p))
    return cache


def one_row_steps_and_chains(
    model, paged: bool, prompts, max_seq: int, chains=CHAINS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of `chains` fed token by token, one-row steps; the same rows in one chained forward)."""
    ref, cache = [], prefilled(model, paged, prompts, max_seq)
    assert model._decode_plan.get(model) is not None, "the fused decode step must run"
    for s, toks in enumerate(chains):
        slot = torch.tensor([s])
        for t in toks:
            ref.append(model(torch.tensor([[t]]), cache=cache, slots=slot)[0, -1])
            cache.advance(slot, 1)
    cache = prefilled(model, paged, prompts, max_seq)
    slots = [s for s, toks in enumerate(chains) for _ in toks]
    positions = [len(prompts[s]) + i for s, toks in enumerate(chains) for i in range(len(toks))]
    ids = torch.tensor([t for toks in chains for t in toks])[:, None]
    chain = Chain(cache, slots, positions, max_fused_rows=len(slots))
    got = model(ids, cache=chain, slots=torch.arange(len(slots)))[:, -1]
    return torch.stack(ref), got


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
@pytest.mark.parametrize("kv", [None, "fp16", "int8"])
@torch.inference_mode()
def test_chained_rows_equal_one_row_steps(model, kv, paged, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.kv_cache_dtype = kv
    try:
        ref, got = one_row_steps_and_chains(model, paged, PROMPTS, 64)
    finally:
        model.kv_cache_dtype = None
        torch.set_num_threads(before)
    assert torch.equal(got, ref)


# the keys go in chunks of 128 whose softmax partials are merged (kKeyChunk): slot 0's chain crosses
# from 4 chunks to 5, slot 2 reads 9
LONG = [[(7 * i) % 120 + 1 for i in range(505)], [2, 7, 18], [(5 * i) % 110 + 3 for i in range(1030)]]


@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
@pytest.mark.parametrize("kv", [None, "int8"])
@torch.inference_mode()
def test_rows_across_key_chunks_equal_one_row_steps(model, kv, paged, isa):
    """Each ISA's loops (the prefetches past a chunk's keys reach into the next chunk's rows)."""
    model.kv_cache_dtype = kv
    try:
        ref, got = one_row_steps_and_chains(model, paged, LONG, 1056)
    finally:
        model.kv_cache_dtype = None
    assert torch.equal(got, ref)


# from 16 rows on, a sequence's chained rows go in row blocks whose tasks run all their key chunks and
# merge them themselves (kRowBlock; a chained prefill's shape): the same logits as one-row steps, whose
# chunks are separate tasks merged after them. 16 rows, the most whose Linears still take the GEMV pass
# (past it the GEMM sums in another order): slot 0's cross from 4 key chunks to 5, slot 2's from 8 to 9.
LONG_CHAINS = {
    "slot0": [[(3 * i) % 97 + 2 for i in range(16)], [], []],
    "slot2": [[], [], [(11 * i) % 89 + 5 for i in range(16)]],
}


@pytest.mark.parametrize("chains", list(LONG_CHAINS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
@pytest.mark.parametrize("kv", [None, "int8"])
@torch.inference_mode()
def test_row_block_tasks_equal_one_row_steps(model, kv, paged, threads, chains):
    prompts = [LONG[0][:505], LONG[1], LONG[2][:1020]]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.kv_cache_dtype = kv
    try:
        ref, got = one_row_steps_and_chains(model, paged, prompts, 1056, LONG_CHAINS[chains])
    finally:
        model.kv_cache_dtype = None
        torch.set_num_threads(before)
    assert torch.equal(got, ref)


@torch.inference_mode()
def test_key_chunks_merge_to_the_module_paths_attention(tmp_path):
    """fp32 weights: the fused step (fp32 GEMVs, keys in chunks) against the modules' SDPA over all keys."""
    d = tmp_path / "llama"
    cfg = dict(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    )
    tiny_hf_model("llama", **cfg).save_pretrained(d)
    m, _ = lf.load(d)
    out = {}
    for fused in (True, False):
        m.fused_decode = fused
        cache = KVCache.for_model(m, 1, 1100)
        m(torch.tensor([LONG[2]]), cache=cache)
        cache.advance(torch.tensor([0]), len(LONG[2]))
        out[fused] = m(torch.tensor([[9]]), cache=cache, slots=torch.tensor([0]))[0, -1]
    m.fused_decode = True
    torch.testing.assert_close(out[True], out[False], atol=2e-4, rtol=0)
