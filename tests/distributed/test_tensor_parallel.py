"""Tensor parallel on 2 local ranks (gloo) gives the single-process model's logits and greedy text."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanformer.distributed import check_tp, parallelize_
from leanformer.distributed.tensor_parallel import _share
from leanformer.errors import LeanformerError
from leanformer.loading import load
from tests.conftest import tiny_hf_model
from tests.distributed.ranks import load_as, outputs, run_ranks


def _same(ref: dict, got: dict, kv_heads: int, size: int, tol: float = 1e-4) -> None:
    assert "error" not in got, got.get("error")
    assert (got["full"] - ref["full"]).abs().max() < tol
    assert (got["step"] - ref["step"]).abs().max() < tol
    assert (got["batch_full"] - ref["batch_full"]).abs().max() < tol
    assert (got["batch_step"] - ref["batch_step"]).abs().max() < tol
    assert got["greedy"] == ref["greedy"]
    assert got["cache_heads"] == kv_heads // size  # each rank caches only its KV heads


def test_two_ranks_match_one_process(tiny_dirs, shared, tmp_path, monkeypatch):
    from leanformer.compress import qbase

    # quantized prefill in fp32 on both sides: on CPUs with native bf16 it would run in bf16, whose
    # rounding of each rank's partial sums differs from the whole sum's by ~0.05 on these logits
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    biased = tmp_path / "llama-bias"
    # o_proj and down_proj biases: added once after the all-reduce, not once per rank
    tiny_hf_model("llama", attention_bias=True, mlp_bias=True).save_pretrained(biased)
    stories = shared / "models" / "stories260K" / "stories260K.bin"
    models = {
        "llama": tiny_dirs["llama"],  # 4 heads, 2 KV heads
        "llama-bias": biased,
        "qwen2": tiny_dirs["qwen2"],  # qkv bias, tied embeddings
        "stories260K": stories,  # 8 heads, 4 KV heads, 172 MLP channels
        "mistral": tiny_dirs["mistral"],  # 1 KV head: cannot be split in 2
        "gpt2": tiny_dirs["gpt2"],  # 4 heads (MHA), c_fc / c_proj with biases, learned positions
    }
    jobs = [(k, str(v), "float32", "tp") for k, v in models.items()]
    # quantized shards: int8 per channel (columns keep their row scales), int4 cut at group boundaries
    # (the tiny llama's 96 MLP channels in groups of 32: 64 + 32)
    quantized = {
        "llama-int8": "llama",
        "llama-int4": "llama",
        "llama-bf16": "llama",
        "stories260K-int8": "stories260K",
    }
    quantized |= {"gpt2-int8": "gpt2", "gpt2-int4": "gpt2"}  # GPT-2's 256 MLP channels: 128 + 128
    jobs += [(k, str(models[v]), k.rsplit("-", 1)[1], "tp") for k, v in quantized.items()]
    results = run_ranks(2, jobs, tmp_path / "out")
    for name, path in [*models.items(), *((k, models[v]) for k, v in quantized.items())]:
        if name == "mistral":
            continue
        model = load_as(str(path), name.rsplit("-", 1)[1] if name in quantized else "float32")
        ref = outputs(model)
        for got in results[name]:
            _same(ref, got, model.args.num_key_value_heads, 2)
            assert got["kind"] == ref["kind"]  # int8 / int4 / bf16 stayed so through the sharding
    for got in results["mistral"]:
        assert got["error"].startswith("tensor parallel size 2 does not divide this model's 1 KV heads")
        assert "\n" not in got["error"]


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(LeanformerError, match="allowed: 1, 3$"):
        check_tp(3, 2)
    with pytest.raises(LeanformerError, match="process group"):
        parallelize_(nn.Linear(2, 2))


def test_shares_cover_every_channel_once():
    for n, size in ((172, 2), (1536, 3), (7, 3)):
        spans = [_share(n, r, size) for r in range(size)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


@pytest.mark.slow
def test_smollm2_three_ranks(smollm2, tmp_path):
    """SmolLM2-135M: 9 heads, 3 KV heads → TP 3 (~2 min on the shared 2-core machine).

    In fp32 its 30 layers turn the partial sums' other summation order into up to ~3e-4 on logits of
    magnitude ~30 (measured; the fused C++ step vs the module path differ by ~1.5e-5 on one step):
    greedy is identical, logits within 1e-3. In float64 the same shards agree within 1e-4 with room
    to spare, so the difference is rounding, not the sharding.
    """
    jobs = [("fp32", str(smollm2), "float32", "tp"), ("fp64", str(smollm2), "float64", "tp")]
    results = run_ranks(3, jobs, tmp_path / "out")
    for name, dtype, tol in (("fp32", "float32", 1e-3), ("fp64", "float64", 1e-4)):
        ref = outputs(load_as(str(smollm2), dtype))
        for got in results[name]:
            _same(ref, got, 3, 3, tol)


def test_sharded_cache_is_smaller(shared):
    """Without ranks: the head counts the sharded args report size the KV cache (local check of the
    mechanism the multi-rank test relies on)."""
    import dataclasses

    from leanformer.models.kv_cache import KVCache

    model, _ = load(shared / "models" / "stories260K" / "stories260K.bin")
    model.args = dataclasses.replace(model.args, num_key_value_heads=2)
    assert KVCache.for_model(model, 1, 16).k[0].shape == torch.Size([1, 2, 16, 8])


@pytest.mark.slow
def test_gpt2_real_weights_two_ranks(shared, tmp_path):
    """A real GPT-2 (an HF folder under ../shared/models whose name has gpt2), when there is one: 12
    heads split 6 + 6, 3072 MLP channels 1536 + 1536; fp32 over 12 layers, so 1e-3 as for SmolLM2."""
    found = sorted(p for p in (shared / "models").glob("*gpt2*") if (p / "config.json").exists())
    if not found:
        pytest.skip("no GPT-2 weights in ../shared/models")
    results = run_ranks(2, [("gpt2", str(found[0]), "float32", "tp")], tmp_path / "out")
    ref = outputs(load_as(str(found[0])))
    for got in results["gpt2"]:
        _same(ref, got, ref["cache_heads"], 2, 1e-3)


def test_int5_linears_are_refused_in_one_line(tiny_dirs, tmp_path):
    """GGUF Q5_0 kept 5-bit (Int5Linear) packs its 5th bits per 64-column chunk: the column slicer cannot
    cut it, so parallelize_ refuses it before splitting anything."""
    import torch.distributed as dist

    from leanformer.compress.int5 import Int5Linear

    model, _ = load(tiny_dirs["llama"])
    proj = model.model.layers[0].self_attn.o_proj
    n, k = proj.weight.shape
    codes = torch.randint(0, 32, (n, k), dtype=torch.uint8)
    model.model.layers[0].self_attn.o_proj = Int5Linear.from_codes(codes, torch.rand(n, -(-k // 32)), None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        with pytest.raises(LeanformerError, match="o_proj is a Int5Linear") as e:
            parallelize_(model)
    finally:
        dist.destroy_process_group()
    assert "\n" not in str(e.value)
