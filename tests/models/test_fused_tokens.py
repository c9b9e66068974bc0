"""A decode step from token ids to logits in one C++ call (fused.py run_tokens, DecodeStack.forward_tokens):
the same logits, bit for bit, as the fused layers with the embedding, final norm and head in torch."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.compress.layout import QuantEmbedding
from leanformer.kernels.modules import FastLinear
from leanformer.models import fused
from leanformer.models.fused import set_decode_activations
from leanformer.models.kv_cache import KVCache
from leanformer.models.paged_cache import PagedKVCache

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")

PROMPTS = [[3, 14, 15, 92, 65], [32, 38], [7, 1, 100, 5, 9, 11, 2]]  # rows of different lengths


def decode(model, monkeypatch, tokens_path: bool, paged: bool = False) -> torch.Tensor:
    """Prefill three prompts of different lengths, then 5 greedy steps of all three rows -> [B, 5, V]."""
    with monkeypatch.context() as mp:
        if not tokens_path:
            mp.setattr(fused.DecodePlan, "usable_tokens", staticmethod(lambda *a: False))
        b = len(PROMPTS)
        if paged:  # blocks of 4 from a shuffled pool
            cache = PagedKVCache.for_model(model, b, 32, num_blocks=24, block_size=4)
            cache.block_tables[:, :8] = torch.randperm(24, generator=torch.Generator().manual_seed(0)).view(
                b, 8
            )
        else:
            cache = KVCache.for_model(model, b, 32)
        slots = torch.arange(b)
        last = []
        with torch.inference_mode():
            for s, p in enumerate(PROMPTS):
                logits = model(torch.tensor([p]), cache=cache, slots=slots[s : s + 1])
                cache.advance(slots[s : s + 1], len(p))
                last.append(logits[0, -1].argmax())
            ids, out = torch.stack(last)[:, None], []
            for _ in range(5):
                logits = model(ids, cache=cache, slots=slots)
                cache.advance(slots, 1)
                out.append(logits[:, 0])
                ids = logits[:, 0].argmax(-1, keepdim=True)
        return torch.stack(out, 1)


@pytest.mark.parametrize("activations", ["int8", "fp32"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: tied, the int8 head is the embedding too
def test_int8_head_logits_equal_the_module_path(tiny_dirs, monkeypatch, arch, activations):
    model, _ = lf.load(tiny_dirs[arch])
    lf.quantize_(model, lf.Int4WeightOnly(group_size=32))
    lf.quantize_(model, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))
    assert isinstance(model.model.embed_tokens, QuantEmbedding) == (arch == "qwen2")
    set_decode_activations(model, activations)
    ref = decode(model, monkeypatch, tokens_path=False)
    got = decode(model, monkeypatch, tokens_path=True)
    assert model._decode_plan.stack.has_ends
    assert torch.equal(got, ref)


def test_paged_cache_logits_equal(tiny_dirs, monkeypatch):
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))
    ref = decode(model, monkeypatch, tokens_path=False, paged=True)
    got = decode(model, monkeypatch, tokens_path=True, paged=True)
    assert model._decode_plan.stack.has_ends and torch.equal(got, ref)


def plain_head(model) -> None:
    """Replace the head with a plain nn.Linear on the same weights (its forward is F.linear)."""
    head = model.lm_head
    plain = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    plain.weight, plain.bias = head.weight, head.bias
    model.lm_head = plain


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: tied, the head's weight is the embedding's
def test_an_fp32_fastlinear_head_runs_in_the_ends(tiny_dirs, monkeypatch, arch):
    """load() makes fp32 Linears FastLinears: the head's forward calls linear_f32, the kernel the C++
    ends call too, so the step goes from ids to logits in C++ with the same logits."""
    model, _ = lf.load(tiny_dirs[arch])
    assert type(model.lm_head) is FastLinear
    ref = decode(model, monkeypatch, tokens_path=False)
    assert torch.equal(decode(model, monkeypatch, tokens_path=True), ref)
    assert model._decode_plan.stack.has_ends


def test_a_plain_fp32_head_keeps_the_torch_head(tiny_dirs, monkeypatch):
    """F.linear (a plain nn.Linear head) is not a kernel the C++ step calls: no ends, same logits."""
    model, _ = lf.load(tiny_dirs["llama"])
    plain_head(model)
    ref = decode(model, monkeypatch, tokens_path=False)
    assert torch.equal(decode(model, monkeypatch, tokens_path=True), ref)
    assert not model._decode_plan.stack.has_ends


def test_a_swapped_head_rebuilds_the_ends(tiny_dirs, monkeypatch):
    model, _ = lf.load(tiny_dirs["llama"])
    plain_head(model)
    decode(model, monkeypatch, tokens_path=True)
    assert not model._decode_plan.stack.has_ends
    lf.quantize_(model, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))  # the head module is replaced
    ref = decode(model, monkeypatch, tokens_path=False)
    assert torch.equal(decode(model, monkeypatch, tokens_path=True), ref)
    assert model._decode_plan.stack.has_ends


def test_bad_token_ids_are_refused_in_one_line(tiny_dirs):
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))
    cache = KVCache.for_model(model, 1, 8)
    with torch.inference_mode():
        model(torch.tensor([[1]]), cache=cache)  # builds the stack
        stack = model._decode_plan.stack
        cos, sin = model.rotary(torch.tensor([[1]]), torch.float32)
        with pytest.raises(RuntimeError, match="token ids outside the vocabulary"):
            stack.forward_tokens(
                torch.tensor([500]), cos.reshape(1, -1), sin.reshape(1, -1), cache.k, cache.v, cache.k_scale,
                cache.v_scale, torch.tensor([0]), torch.tensor([1]),
            )  # fmt: skip


def test_hooks_on_the_ends_keep_the_module_path(tiny_dirs, monkeypatch):
    """A forward hook on the head (e.g. a logits probe) must still run: such steps leave the C++ ends out."""
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, lf.Int8WeightOnly(targets=["lm_head"], ignore=[]))
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    try:
        got = decode(model, monkeypatch, tokens_path=True)
    finally:
        handle.remove()
    assert len(seen) == len(PROMPTS) + 5  # every prefill and every decode step went through the head
    assert torch.equal(got, decode(model, monkeypatch, tokens_path=True))
