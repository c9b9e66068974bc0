"""PruneHeads (compress/prune_heads.py): GQA-respecting attention-head pruning of Llama-family decoders.
Bad configs fail in one line before any work; the pruned model's cached decode (static, int8, paged
caches; fused C++ step and module path) equals a no-cache recompute; save -> load rebuilds the smaller
shapes (per-layer head counts too); int4 after pruning; KV-group pruning shrinks the KV cache; the
least-squares refit of o_proj beats dropping heads alone on real weights (stories260K)."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.compress.config import Int4WeightOnly, PruneFFN, PruneHeads, PruneLayers, QuantConfig
from leanformer.compress.recipe import apply, load_recipe, prune_
from leanformer.errors import LeanformerError
from leanformer.models.kv_cache import KVCache
from leanformer.models.paged_cache import PagedKVCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny(tiny_dirs):
    """(fresh qwen2 model: 4 query heads in 2 KV groups, qkv bias; 2 layers), calibration ids."""
    model, _ = lf.load(tiny_dirs["qwen2"])
    ids = torch.randint(0, model.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
        ({"kv_sparsity": 1.0}, r"kv_sparsity must be a number in \[0, 1\)"),
        ({}, "nothing to prune"),
        ({"heads": 0}, "heads must be a positive integer"),
        ({"heads": 3}, "heads=3 breaks the GQA ratio"),  # 2 KV heads: 2 or 4 query heads
        ({"heads": 2, "kv_heads": 2, "sparsity": 0.0}, None),  # valid: 1 per group
        ({"kv_heads": 3}, "keeps 3 KV heads; the model has 2"),
        ({"heads": 3, "kv_heads": 1}, "breaks the GQA ratio"),  # 1 KV group of 2 query heads
        ({"sparsity": 0.2}, "removes no head from groups of 2"),  # rounds to 0 of 2
        ({"kv_sparsity": 0.5, "targets": ["model.layers.0.*"]}, "KV groups go in every layer"),
        ({"sparsity": 0.5, "targets": ["mlp.*"]}, "no float Llama-family attention"),
    ],
)
def test_bad_configs_fail_in_one_line_before_any_work(tiny, kwargs, match):
    model, _ = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    want = match or "PruneHeads needs calibration"  # a valid config gets as far as asking for data
    with pytest.raises(LeanformerError, match=want) as e:
        prune_(model, PruneHeads(**kwargs), calibration=None)
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    with pytest.raises(LeanformerError, match=want):  # the same checks from a saved recipe
        apply(model, QuantConfig.from_dict({"type": "PruneHeads", **kwargs}))


def test_a_hand_edited_config_that_breaks_the_ratio_fails_to_load(tiny_dirs, tmp_path):
    model, _ = lf.load(tiny_dirs["llama"])
    lf.save(model, None, tmp_path / "m")
    cfg = (tmp_path / "m/config.json").read_text()
    (tmp_path / "m/config.json").write_text(cfg.replace("{", '{"num_attention_heads_per_layer": [4, 3], ', 1))
    with pytest.raises(LeanformerError, match="num_attention_heads_per_layer must list") as e:
        lf.load(tmp_path / "m")
    assert "\n" not in str(e.value)


@torch.no_grad()  # as the engine decodes (the fused step needs it)
def _greedy_cached(model, cache, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode of one row through `cache` (prefill, then one token per step): ids, logits [n, V]."""
    slots = torch.tensor([0])
    if isinstance(cache, PagedKVCache):  # every block to slot 0
        cache.block_tables[0] = torch.arange(cache.max_blocks)
    logits = model(torch.tensor([prompt]), cache=cache, slots=slots)[:, -1]
    cache.advance(slots, len(prompt))
    out, rows = [], []
    for _ in range(n):
        rows.append(logits[0])
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache, slots=slots)[:, -1]
        cache.advance(slots, 1)
    return out, torch.stack(rows)


def _check_cached_equals_recompute(model, prompt: list[int], n: int = 12) -> list[int]:
    """Static fp32 cache (fused step and module path), int8 storage, paged: each step's logits equal
    the no-cache forward over the whole sequence (fp32 to rounding; int8 KV within its quantization)."""
    with torch.no_grad():
        ids, got = _greedy_cached(model, KVCache.for_model(model, 1, 64), prompt, n)
        assert model._decode_plan.stack is not None  # the fused C++ step ran, per-layer heads and all
        full = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1]  # [n, V], no cache
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
        model.fused_decode = False
        assert _greedy_cached(model, KVCache.for_model(model, 1, 64), prompt, n)[0] == ids
        model.fused_decode = True
        paged = PagedKVCache.for_model(model, 1, 64, num_blocks=8, block_size=8)
        torch.testing.assert_close(_greedy_cached(model, paged, prompt, n)[1], full, atol=1e-4, rtol=1e-4)
        int8 = KVCache(
            model.args.num_hidden_layers,
            1,
            64,
            model.args.num_key_value_heads,
            model.args.head_dim,
            storage="int8",
        )
        ids8, got8 = _greedy_cached(model, int8, prompt, n)  # its own tokens (near-ties may differ)
        full8 = model(torch.tensor([prompt + ids8]))[0, len(prompt) - 1 : -1]
        assert (got8 - full8).abs().max() < 0.05 * full8.abs().max()
    return ids


@pytest.mark.parametrize(
    ("cfg", "heads", "kv"),
    [
        (PruneHeads(sparsity=0.5), [2, 2], 2),  # 1 query head per group, both groups
        (PruneHeads(kv_sparsity=0.5), [2, 2], 1),  # 1 whole KV group (+ its 2 query heads)
        (PruneHeads(sparsity=0.5, targets=["model.layers.1.*"]), [4, 2], 2),  # per-layer counts
    ],
)
def test_pruned_model_decodes_saves_reloads_and_quantizes(tiny, tmp_path, cfg, heads, kv):
    model, calib = tiny
    prune_(model, cfg, calib, progress=False)
    a = model.model.layers
    assert [layer.self_attn.n_heads for layer in a] == heads and model.args.num_key_value_heads == kv
    assert [layer.self_attn.qkv_proj.out_features for layer in a] == [(h + 2 * kv) * 16 for h in heads]
    assert [layer.self_attn.o_proj.in_features for layer in a] == [h * 16 for h in heads]
    assert model.config["num_key_value_heads"] == kv and model.config["head_dim"] == 16
    assert model.config.get("num_attention_heads_per_layer") == (heads if len(set(heads)) > 1 else None)
    assert KVCache.for_model(model, 1, 8).k[0].shape[1] == kv  # KV groups pruned: a smaller cache
    prompt = [5, 17, 33, 2, 9, 60, 7]
    ids = _check_cached_equals_recompute(model, prompt)
    lf.save(model, None, tmp_path / "p")
    again, _ = lf.load(tmp_path / "p")
    x = torch.tensor([prompt + ids])
    assert torch.equal(model(x), again(x))
    assert _greedy_cached(again, KVCache.for_model(again, 1, 64), prompt, 12)[0] == ids
    apply(again, Int4WeightOnly(group_size=32))  # quantize after pruning: the smaller Linears
    lf.save(again, None, tmp_path / "q")
    q, _ = lf.load(tmp_path / "q")
    assert [layer.self_attn.o_proj.in_features for layer in q.model.layers] == [h * 16 for h in heads]
    assert torch.equal(q(x), again(x))
    _greedy_cached(q, KVCache.for_model(q, 1, 64), prompt, 4)
    assert q._decode_plan.stack is not None  # the fused int4 step runs


def test_uniform_pruning_saves_a_plain_hf_config(tiny_dirs, tmp_path):
    """Equal counts in every layer: num_attention_heads / num_key_value_heads / head_dim only, which
    HF transformers loads to the same logits (the reference, not our own loader)."""
    transformers = pytest.importorskip("transformers")
    model, _ = lf.load(tiny_dirs["llama"])
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    prune_(model, PruneHeads(kv_sparsity=0.5), calib, progress=False)
    lf.save(model, None, tmp_path / "p")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "p")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ours = model.state_dict()
    for i in range(cfg.num_hidden_layers):  # our fused q|k|v and gate|up back to HF's names
        p, d = f"model.layers.{i}.", cfg.head_dim
        q, k, v = ours.pop(p + "self_attn.qkv_proj.weight").split([2 * d, d, d])
        g, u = ours.pop(p + "mlp.gate_up_proj.weight").chunk(2)
        ours |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k}
        ours |= {p + "self_attn.v_proj.weight": v, p + "mlp.gate_proj.weight": g, p + "mlp.up_proj.weight": u}
    hf.load_state_dict(ours, strict=False)
    assert not set(hf.state_dict()) - set(ours)  # every HF weight came from the pruned model
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_presets_and_layer_drop_keep_the_counts(tiny, tmp_path):
    """heads-33+ffn-25 applies as one recipe; PruneLayers after a per-layer head pruning keeps the
    counts of the layers that remain, and the folder reloads."""
    model, calib = tiny
    assert [type(c).__name__ for c in load_recipe("heads-33+ffn-25").stages] == ["PruneHeads", "PruneFFN"]
    prune_(model, PruneHeads(sparsity=0.5, targets=["model.layers.0.*"]), calib, progress=False)
    assert model.config["num_attention_heads_per_layer"] == [2, 4]
    prune_(model, PruneFFN(sparsity=0.5, multiple=8), calib, progress=False)
    prune_(model, PruneLayers(n_layers=1), calib, progress=False)
    kept = model.model.layers[0].self_attn.n_heads
    assert model.config.get("num_attention_heads_per_layer") is None  # one layer left: uniform again
    assert model.config["num_attention_heads"] == kept
    lf.save(model, None, tmp_path / "p")
    again, _ = lf.load(tmp_path / "p")
    x = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model(x), again(x))


def test_refit_beats_dropping_on_stories260k(shared):
    """Real weights (stories260K: 8 query heads in 4 KV groups): half of each group's query heads go;
    the o_proj least-squares refit keeps perplexity far closer to the dense model (measured: dense
    5.34, dropped 8.52, refit 6.37; whole KV groups at 50% with refit 10.6)."""
    from leanformer.measure.evaluate import evaluate, read_text, tokenize

    path = shared / "models/stories260K"
    _, tok = lf.load(path, fast=False)
    ids = tokenize(tok, read_text(shared / "data/tinystories/sample.txt"))
    calib, held = torch.tensor(ids[:1024]).view(8, 128), ids[1024:3072]
    ppl = {}
    for refit in (False, True):
        model, _ = lf.load(path)
        prune_(model, PruneHeads(sparsity=0.5, refit=refit), calib, progress=False)
        ppl[refit] = evaluate(model, held, 256, progress=False).perplexity
    assert [layer.self_attn.n_heads for layer in model.model.layers] == [4] * 5
    assert ppl[True] < 0.85 * ppl[False], ppl


def test_eval_per_layer_ranks_the_pruned_attention_blocks(tiny_dirs):
    """measure/diagnose (eval --per-layer) on a head-pruned model: each shrunk attention is ranked as
    one block (its Linears changed shape), with whole KV groups gone too."""
    from leanformer.measure.diagnose import per_layer_errors

    reference, _ = lf.load(tiny_dirs["llama"])
    model, _ = lf.load(tiny_dirs["llama"])
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    prune_(model, PruneHeads(kv_sparsity=0.5), calib, progress=False)  # whole KV groups: every layer
    prune_(model, PruneHeads(sparsity=0.5, targets=["model.layers.1.*"]), calib, progress=False)  # then one
    rows = per_layer_errors(model, reference, calib, top=4, progress=False)
    assert {r.name for r in rows} == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(r.kld_alone > 0 and r.local_rel_error > 0 for r in rows)


@pytest.mark.parametrize("cfg", [PruneHeads(sparsity=0.5), PruneHeads(kv_heads=1)])
def test_streaming_equals_in_memory(tiny_dirs, cfg):
    """A lazily loaded model (`compress` streams by default) prunes heads on the layer walk (qkv bias,
    KV groups too), bit for bit as in memory (compress/stream.py; stories260K in test_stream_prune)."""
    import copy

    whole, _ = lf.load(tiny_dirs["qwen2"])
    ids = torch.randint(0, whole.args.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    apply(whole, copy.deepcopy(cfg), ids, progress=False)
    lazy, _ = lf.load(tiny_dirs["qwen2"], lazy=True)
    apply(lazy, copy.deepcopy(cfg), ids, progress=False)
    a, b = whole.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert whole.config == lazy.config
    assert torch.equal(whole(ids[:1]), lazy(ids[:1]))


def test_student_layers_and_tensor_parallel_respect_per_layer_counts(tiny, tmp_path):
    """distill's keep_layers_ keeps the per-layer head list in step with the layers it keeps; tensor
    parallel refuses an unevenly head-pruned model in one line instead of splitting it wrong."""
    import torch.distributed as dist

    from leanformer.distributed.tensor_parallel import parallelize_
    from leanformer.train.student import keep_layers_

    model, calib = tiny
    prune_(model, PruneHeads(sparsity=0.5, targets=["model.layers.0.*"]), calib, progress=False)
    assert model.config["num_attention_heads_per_layer"] == [2, 4]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        with pytest.raises(LeanformerError, match="same attention-head count in every layer") as e:
            parallelize_(model)
    finally:
        dist.destroy_process_group()
    assert "\n" not in str(e.value)
    student = keep_layers_(model, [1, 0])
    assert [layer.self_attn.n_heads for layer in student.model.layers] == [4, 2]
    assert student.config["num_attention_heads_per_layer"] == [4, 2]
