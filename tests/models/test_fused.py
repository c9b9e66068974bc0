"""The fused C++ decode step (models/fused.py, kernels/decode.cpp) against the module path."""

from __future__ import annotations

import copy

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.compress.structured import drop_layers
from leanformer.models.fused import set_decode_activations
from leanformer.models.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")


def decode_logits(
    model, fused: bool, prompts: list[list[int]], steps: int = 6, slots=None, cache=None
) -> torch.Tensor:
    """Prefill each prompt into its own slot (unequal lengths), then `steps` batched decode steps
    feeding back the greedy token; -> logits of every decode step [steps, B, vocab]."""
    model.fused_decode = fused
    b = len(prompts)
    slots = torch.arange(b) if slots is None else torch.tensor(slots)
    cache = KVCache.for_model(model, int(slots.max()) + 1, 64) if cache is None else cache
    out = []
    with torch.inference_mode():
        last = []
        for row, p in zip(slots.tolist(), prompts):
            logits = model(torch.tensor([p]), cache=cache, slots=torch.tensor([row]))
            cache.advance(torch.tensor([row]), len(p))
            last.append(logits[0, -1].argmax())
        ids = torch.stack(last)[:, None]
        for _ in range(steps):
            logits = model(ids, cache=cache, slots=slots)[:, -1]
            cache.advance(slots, 1)
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
    model.fused_decode = True
    return torch.stack(out)


PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38, 32, 79]]


def assert_fused_matches(model, prompts=PROMPTS, tol=1e-4, **kw):
    ref = decode_logits(model, False, prompts, **kw)
    got = decode_logits(model, True, prompts, **kw)
    assert model._decode_plan.stack is not None, "the fused step did not run"
    scale = ref.abs().max()
    assert ((got - ref).abs().max() / scale).item() <= tol


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # GQA 2:1, qkv bias + tied head, MQA
def test_fp32_matches_module_path(arch, tiny_dirs):
    model, _ = lf.load(tiny_dirs[arch])
    assert_fused_matches(model)
    assert_fused_matches(model, prompts=PROMPTS[:2], slots=[3, 1])  # rows in slots out of order


@pytest.mark.parametrize(
    "config",
    [
        lf.Int8WeightOnly(),
        lf.Int4WeightOnly(group_size=32),
        lf.Int4WeightOnly(group_size=64, pad=True),  # down_proj K = 96: codes padded to 128 columns
        lf.Int4WeightOnly(group_size=32, scale_bits=8),
        lf.Int8Dynamic(),
        lf.BF16WeightOnly(ignore=[]),  # the tied head and embedding too
    ],
    ids=repr,
)
def test_quantized_matches_module_path(config, tiny_dirs):
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, config)
    set_decode_activations(model, "fp32")  # the module path's math (int8 activations: test_fused_int8.py)
    assert_fused_matches(model)


@pytest.mark.parametrize("head_dim", [32, 64, 128])  # the register-tiled P.V paths of kernels/decode.cpp
def test_head_dims_with_long_context(head_dim, tmp_path):
    from tests.conftest import tiny_hf_model

    heads = 256 // head_dim
    tiny_hf_model(
        "llama", hidden_size=256, num_attention_heads=heads, num_key_value_heads=heads // 2 or 1
    ).save_pretrained(tmp_path)
    model, _ = lf.load(tmp_path)
    long = [[(7 * i) % 128 for i in range(45)], [3, 4, 5]]  # 45 + steps keys: 8-key blocks and a tail
    assert_fused_matches(model, prompts=long, steps=4)
    lf.quantize_(model, lf.KVCache(dtype="int8"))
    assert_fused_matches(model, prompts=long, steps=4, tol=1e-3)
    lf.quantize_(model, lf.KVCache(dtype="fp16"))
    assert_fused_matches(model, prompts=long, steps=4)


@pytest.mark.parametrize("kv", ["int8", "fp16"])
def test_stored_kv_cache_matches_module_path(kv, tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    lf.quantize_(model, lf.KVCache(dtype=kv))
    # int8: scales rounded in another order, a code may flip by one; fp16: the same rounding (RNE)
    assert_fused_matches(model, tol=1e-3 if kv == "int8" else 1e-5)


def test_awq_input_scale_is_applied(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    lf.quantize_(model, lf.Int8WeightOnly())
    set_decode_activations(model, "fp32")
    down = model.model.layers[1].mlp.down_proj
    down.set_input_scale(torch.linspace(0.5, 2.0, down.in_features))
    assert_fused_matches(model)


def test_rebuilt_after_quantize_and_moves(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    set_decode_activations(model, "fp32")
    prompt = [5, 6, 7, 8]
    fp32 = lf.generate(model, None, prompt, max_new_tokens=8, ignore_eos=True)
    first = model._decode_plan.stack
    assert first is not None
    lf.quantize_(model, lf.Int4WeightOnly(group_size=32))  # swaps the Linears: the stack must follow
    int4 = lf.generate(model, None, prompt, max_new_tokens=8, ignore_eos=True)
    assert model._decode_plan.stack is not first
    model.fused_decode = False
    assert lf.generate(model, None, prompt, max_new_tokens=8, ignore_eos=True) == int4
    model.fused_decode = True
    model.to(torch.bfloat16)  # not fp32: the module path runs, no stale fp32 stack
    lf.generate(model, None, prompt, max_new_tokens=4, ignore_eos=True)
    model.to(torch.float32)
    assert lf.generate(model, None, prompt, max_new_tokens=8, ignore_eos=True) == int4
    twin = copy.deepcopy(model)  # the C++ stack is not copied; the copy builds its own
    assert lf.generate(twin, None, prompt, max_new_tokens=8, ignore_eos=True) == int4
    assert twin._decode_plan.stack is not model._decode_plan.stack
    assert len(fp32) == 8


def test_rebuilt_after_the_layer_list_is_replaced(tiny_dirs):
    """PruneLayers (compress/structured.py drop_layers) puts a new ModuleList in place of the old one,
    whose entries are all still there: the plan must see the new list, not decode the old layers (it
    failed with "one K and one V cache per layer")."""
    model, _ = lf.load(tiny_dirs["llama"])
    prompt = [5, 6, 7, 8]
    lf.generate(model, None, prompt, max_new_tokens=4, ignore_eos=True)  # builds the plan
    twin = copy.deepcopy(model)
    for m in (model, twin):
        drop_layers(m, [0])
    assert len(model.model.layers) == model.args.num_hidden_layers
    got = lf.generate(model, None, prompt, max_new_tokens=8, ignore_eos=True)
    twin.fused_decode = False
    assert got == lf.generate(twin, None, prompt, max_new_tokens=8, ignore_eos=True)


def test_real_smollm2_greedy_identical(smollm2):
    model, tok = lf.load(smollm2, keep_quantized=True)  # int4 g32 + Q8_0 embedding/head
    set_decode_activations(model, "fp32")
    prompt = "The capital of France is"
    fused = lf.generate(model, tok, prompt, max_new_tokens=24)
    model.fused_decode = False
    assert lf.generate(model, tok, prompt, max_new_tokens=24) == fused
    assert "Paris" in fused


@pytest.mark.skipif("avx512" not in kernels.isas(), reason="only one instruction set here")
def test_avx2_kernels_match_too(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    lf.quantize_(model, lf.Int4WeightOnly(group_size=32))
    set_decode_activations(model, "fp32")
    kernels.set_isa("avx2")
    try:
        assert_fused_matches(model)
    finally:
        kernels.set_isa(None)


def test_extreme_activations(tiny_dirs):
    """SiLU of gate values far beyond exp's range (±300) and large attention scores stay finite and equal."""
    model, _ = lf.load(tiny_dirs["llama"])
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.gate_up_proj.weight.mul_(60.0)
            block.self_attn.qkv_proj.weight.mul_(8.0)
    assert_fused_matches(model, tol=1e-4)


@pytest.mark.parametrize("kv", [None, "int8", "fp16"])
def test_paged_pools_read_in_place_match_module_path(kv, tiny_dirs):
    """A paged cache (blocks of 4 from a shuffled pool): the C++ step reads and writes the pool rows
    the cache lists (PagedKVCache.fused_rows), as the module path's update() does."""
    from leanformer.models.paged_cache import PagedKVCache

    model, _ = lf.load(tiny_dirs["llama"])
    if kv:
        lf.quantize_(model, lf.KVCache(dtype=kv))

    def run(fused: bool) -> torch.Tensor:
        cache = PagedKVCache.for_model(model, 3, 32, num_blocks=24, block_size=4)
        order = torch.randperm(24, generator=torch.Generator().manual_seed(0))  # blocks out of order
        cache.block_tables[:, :8] = order.view(3, 8)
        return decode_logits(model, fused, PROMPTS, steps=5, cache=cache)

    ref, got = run(False), run(True)
    assert model._decode_plan.stack is not None
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= (1e-3 if kv == "int8" else 1e-5)


def test_paged_rows_outside_the_pool_are_refused(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    stack = model._decode_plan.get(model)
    a = model.args
    pool = [torch.zeros(3, a.num_key_value_heads, 4, a.head_dim) for _ in range(a.num_hidden_layers)]
    x, cs = torch.zeros(1, a.hidden_size), torch.zeros(1, a.head_dim)
    read = torch.zeros(1, a.num_key_value_heads, 2, dtype=torch.long)
    rows = 3 * a.num_key_value_heads * 4  # the pool seen as [rows, head_dim]: 0..rows-1
    write = torch.full((1, a.num_key_value_heads), rows, dtype=torch.long)
    with pytest.raises(RuntimeError, match="KV rows outside the pool"):
        stack.forward(x, cs, cs, pool, pool, [], [], torch.zeros(1), torch.ones(1), read, write)
