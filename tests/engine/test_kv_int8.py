"""int8 / fp16 KV-cache storage: small error, 4x / 2x less memory, survives save/reload."""

from __future__ import annotations

import torch

import leanformer as lf
from leanformer.measure.evaluate import evaluate
from leanformer.models.kv_cache import KVCache, cast


def stored_kv_logits(model, kv: str):
    """(logits without a cache, logits through a cache of `kv` storage, that cache) for fixed ids."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids)
        lf.quantize_(model, lf.KVCache(dtype=kv))
        cache = KVCache.for_model(model, 1, 64)
        return exact, model(ids, cache=cache), cache


def test_int8_cache_is_close_and_smaller(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    exact, approx, cache = stored_kv_logits(model, "int8")
    assert cache.quantized and cache.k[0].dtype == torch.int8
    full = KVCache(2, 1, 64, 2, 16, torch.float32)
    # int8 values + one fp32 scale per 16-value head row: (16 + 4) / 64 bytes of fp32 (0.27 at head_dim 64)
    assert cache.nbytes() <= 0.32 * full.nbytes()
    rel = (approx - exact).abs().max() / exact.abs().max()
    assert 0 < rel.item() < 0.05  # random tiny weights are harsh; real-model ΔPPL is in docs/BENCHMARKS.md
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_int8_cache_generation_and_reload(tiny_dirs, tmp_path, monkeypatch):
    model, _ = lf.load(tiny_dirs["qwen2"])
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(1))
    fp32_ppl = evaluate(model, ids, window=32, progress=False).perplexity
    prompt = [5, 6, 7, 8]
    lf.quantize_(model, lf.KVCache(dtype="int8"))
    out = lf.generate(model, None, prompt, max_new_tokens=10, ignore_eos=True)
    again, _ = lf.load(lf.save(model, None, tmp_path / "kv"))
    assert again.kv_cache_dtype == "int8"
    assert lf.generate(again, None, prompt, max_new_tokens=10, ignore_eos=True) == out
    # evaluate() must score the reloaded model through its int8 cache, as generation reads it
    made = []
    for_model = KVCache.for_model.__func__

    def spy(cls, *args, **kwargs):
        made.append(for_model(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(KVCache, "for_model", classmethod(spy))
    ppl = evaluate(again, ids, window=32, progress=False).perplexity
    assert made and all(c.quantized and c.k[0].dtype == torch.int8 for c in made)
    # int8 keys/values: a real but small change from the fp32-cache perplexity (0.29% on these ids)
    assert 1e-4 < abs(ppl / fp32_ppl - 1) < 0.01


def test_fp16_cache_is_closer_and_half_the_bytes(tiny_dirs, tmp_path):
    model, _ = lf.load(tiny_dirs["llama"])
    exact, approx, cache = stored_kv_logits(model, "fp16")
    assert not cache.quantized and cache.k[0].dtype == torch.float16 and not cache.k_scale
    assert cache.nbytes() * 2 == KVCache(2, 1, 64, 2, 16, torch.float32).nbytes()
    rel = (approx - exact).abs().max() / exact.abs().max()
    assert 0 < rel.item() < 2e-3  # fp16 keeps ~3 decimal digits: far closer than int8
    prompt = [5, 6, 7, 8]
    out = lf.generate(model, None, prompt, max_new_tokens=10, ignore_eos=True)
    again, _ = lf.load(lf.save(model, None, tmp_path / "kv"))
    assert again.kv_cache_dtype == "fp16"
    assert lf.generate(again, None, prompt, max_new_tokens=10, ignore_eos=True) == out


def test_fp16_and_bf16_cast_through_fp32_as_directly():
    """kv_cache.cast (a bf16 model's fp16 cache: written and read back every step) converts between the
    16-bit types through fp32, faster than torch's direct loop and with the same bits for every value."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for src, dst in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        x = every.view(src)
        got, want = cast(x, dst), x.to(dst)
        assert got.dtype == dst
        assert bool(((got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())).all())


def test_fp16_cache_of_a_bf16_model_gives_what_direct_casts_gave(tiny_dirs, monkeypatch):
    from leanformer.models import kv_cache

    model, _ = lf.load(tiny_dirs["llama"], dtype="bfloat16")
    lf.quantize_(model, lf.KVCache(dtype="fp16"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, 16)
        want = model(ids, cache=cache)
        assert cache.k[0].dtype == torch.float16
        monkeypatch.setattr(kv_cache, "cast", lambda x, dtype: x.to(dtype))
        assert torch.equal(model(ids, cache=KVCache.for_model(model, 1, 16)), want)
