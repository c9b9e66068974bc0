"""KV policies (models/kv_policy.py): sliding window + sinks, H2O, SnapKV."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.engine.generate import generate
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache
from leanformer.models.kv_policy import HeavyHitters, PolicyCache, SinkWindow, SnapKV, observe_queries

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return lf.load(tiny_dirs["llama"])[0]


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    "policy", [SinkWindow(4, 200), SinkWindow(4, 66), HeavyHitters(200), HeavyHitters(70), SnapKV(0.999)]
)
def test_policy_that_holds_the_sequence_is_the_plain_cache(llama, policy):
    prompt = ids(40)
    plain = generate(llama, None, prompt, max_new_tokens=30, ignore_eos=True)
    assert generate(llama, None, prompt, max_new_tokens=30, ignore_eos=True, kv_policy=policy) == plain


def _stream(model, cache, tokens):
    with torch.inference_mode(), observe_queries(model, cache):
        for t in tokens:
            model(torch.tensor([[t]]), cache=cache, slots=torch.tensor([0]))
            cache.advance(torch.tensor([0]), 1)


@pytest.mark.parametrize("storage", [None, "int8"])
def test_window_keeps_sinks_and_recent_keys_at_cache_positions(llama, storage):
    """Layer-0 keys depend on their token and position only: after the window slid, the cache must hold
    exactly the keys a fresh forward over [sinks + the newest tokens] writes (moved and re-rotated)."""
    policy = SinkWindow(sinks=3, window=20, chunk=5)
    a = llama.args
    mk = dict(policy=policy, prompt_len=0, total=10_000, inv_freq=llama.rotary.inv_freq)
    cache = PolicyCache(a.num_hidden_layers, 1, policy.capacity(), a.num_key_value_heads, a.head_dim,
                        storage=storage, **mk)  # fmt: skip
    tokens = ids(123, 1)
    _stream(llama, cache, tokens)
    n = int(cache.lengths[0])
    assert cache.max_seq == 28 and 3 + 20 <= n <= 28  # bounded: sinks + window + chunk
    kept = tokens[:3] + tokens[len(tokens) - (n - 3) :]
    ref = KVCache(a.num_hidden_layers, 1, n, a.num_key_value_heads, a.head_dim, storage=storage)
    with torch.inference_mode():
        llama(torch.tensor([kept]), cache=ref)

    def keys(c):
        k = c.k[0][0, :, :n].float()
        return k * c.k_scale[0][0, :, :n] if c.quantized else k

    tol = 2e-5 if storage is None else 0.05
    assert (keys(cache) - keys(ref)).abs().max() <= tol * keys(ref).abs().max()
    v, v_ref = cache.v[0][0, :, :n].float(), ref.v[0][0, :, :n].float()
    if storage is None:
        assert (v - v_ref).abs().max() <= 1e-5 * v_ref.abs().max()
    else:  # values are moved, never requantized: the same int8 codes, ±1 where GEMV and GEMM round apart
        assert (v - v_ref).abs().max() <= 1


def test_window_generates_past_the_context_in_bounded_memory(llama, tiny_dirs):
    out = generate(llama, None, ids(10), max_new_tokens=300, ignore_eos=True, kv_policy=SinkWindow(4, 32))
    assert len(out) == 300  # the context is 256
    with pytest.raises(LeanformerError, match="context"):
        generate(llama, None, ids(10), max_new_tokens=300, ignore_eos=True)
    gpt2 = lf.load(tiny_dirs["gpt2"])[0]  # learned positions: positions in the cache
    assert (
        len(generate(gpt2, None, ids(300), max_new_tokens=20, ignore_eos=True, kv_policy=SinkWindow(4, 32)))
        == 20
    )
    with pytest.raises(LeanformerError, match="lower --window"):
        generate(llama, None, ids(10), max_new_tokens=300, kv_policy=SinkWindow(4, 250))


def test_fused_step_and_module_path_agree_under_a_window(llama):
    prompt, policy = ids(20, 2), SinkWindow(2, 16, 4)
    fused = generate(llama, None, prompt, max_new_tokens=60, ignore_eos=True, kv_policy=policy)
    llama.fused_decode = False
    try:
        modules = generate(llama, None, prompt, max_new_tokens=60, ignore_eos=True, kv_policy=policy)
    finally:
        llama.fused_decode = True
    assert fused == modules


@pytest.mark.parametrize("policy", [HeavyHitters(24, sinks=2, chunk=4), SnapKV(24, sinks=2, observe=8)])
def test_eviction_keeps_the_budget_and_the_sinks(llama, policy):
    a = llama.args
    prompt = ids(100, 3)
    cache = PolicyCache.for_model(llama, 1, policy, total=110, prompt_len=100)
    assert cache.may_evict and cache.scores
    with torch.inference_mode(), observe_queries(llama, cache):
        s = torch.tensor([0])
        for lo in range(0, 100, cache.piece):
            llama(torch.tensor([prompt[lo : lo + cache.piece]]), cache=cache, slots=s)
            cache.advance(s, min(cache.piece, 100 - lo))
        llama(torch.tensor([[5]]), cache=cache, slots=s)  # SnapKV compresses at the first decode step
        cache.advance(s, 1)
    assert int(cache.lengths[0]) <= 24 + 4 and int(cache.offsets[0]) + int(cache.lengths[0]) == 101
    # the sinks are the keys of tokens 0 and 1 at positions 0 and 1 in every layer and head
    ref = KVCache(a.num_hidden_layers, 1, 2, a.num_key_value_heads, a.head_dim)
    with torch.inference_mode():
        llama(torch.tensor([prompt[:2]]), cache=ref)
    assert torch.allclose(cache.k[0][0, :, :2], ref.k[0][0], atol=1e-5)
    out = generate(llama, None, prompt, max_new_tokens=8, ignore_eos=True, kv_policy=policy)
    assert len(out) == 8


def test_eviction_composes_with_int8_kv(tiny_dirs):
    model = lf.load(tiny_dirs["qwen2"])[0]
    lf.quantize_(model, lf.KVCache(dtype="int8"))
    for policy in (HeavyHitters(0.25), SnapKV(0.25), SinkWindow(4, 16)):
        cache = PolicyCache.for_model(model, 1, policy, total=130, prompt_len=120)
        assert cache.quantized
        out = generate(model, None, ids(120, 4), max_new_tokens=10, ignore_eos=True, kv_policy=policy)
        assert len(out) == 10


def test_bad_policies_are_one_line():
    for make in (lambda: SinkWindow(-1, 4), lambda: SinkWindow(4, 0), lambda: HeavyHitters(0),
                 lambda: HeavyHitters(1.5), lambda: SnapKV(float("nan")), lambda: HeavyHitters(True)):  # fmt: skip
        with pytest.raises(LeanformerError):
            make()
