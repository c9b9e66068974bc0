"""The fused decode step with int8 activations (model.decode_activations = "int8"): close to the
fp32-activation step on quantized models, the option validated, fp32 Linears untouched."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.errors import LeanformerError
from leanformer.models.fused import int8_activations, set_decode_activations
from leanformer.models.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [32, 38, 46, 26, 43, 38, 32, 79]])  # [B, T]


def logits_for(model, activations: str) -> torch.Tensor:
    """Teacher-forced decode steps (one token per row per step, the fused path from position 0), so a
    near tie flipping a greedy choice cannot send the two runs down different texts: -> [T, B, V]."""
    set_decode_activations(model, activations)
    b, t = TOKENS.shape
    cache = KVCache.for_model(model, b, 16)
    out = []
    with torch.inference_mode():
        for i in range(t):
            out.append(model(TOKENS[:, i : i + 1], cache=cache)[:, 0])
            cache.advance(torch.arange(b), 1)
    return torch.stack(out)


@pytest.mark.parametrize(
    "config",
    [
        lf.Int4WeightOnly(group_size=32),
        lf.Int4WeightOnly(group_size=64, pad=True),  # down_proj K = 96: codes padded to 128 columns
        lf.Int8WeightOnly(),
    ],
    ids=repr,
)
def test_int8_activations_close_to_fp32(config, tiny_dirs):
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, config)
    ref = logits_for(model, "fp32")
    got = logits_for(model, "int8")
    assert model._decode_plan.stack.int8_act and model._decode_plan.stack.int8_linears() > 0
    assert not torch.equal(got, ref)  # the integer kernels really ran
    assert float((got - ref).norm() / ref.norm()) < 0.03  # int8 rounding of every Linear input
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8  # random tiny weights: near ties


def test_fp32_linears_ignore_the_option(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    assert torch.equal(logits_for(model, "int8"), logits_for(model, "fp32"))
    assert model._decode_plan.stack.int8_linears() == 0


def test_option_is_validated(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    with pytest.raises(LeanformerError, match="auto, int8, fp32"):
        set_decode_activations(model, "int4")
    model.decode_activations = "bf16"  # set by hand: caught at the next step, one line
    with pytest.raises(LeanformerError, match="decode_activations"):
        int8_activations(model)
    set_decode_activations(model, "auto")
    assert int8_activations(model) in (True, False)


def test_symmetric_int4_skips_zeros_until_they_change(tiny_dirs):
    """All-zero zero points (GGUF Q4_0's symmetric blocks) make the int4 kernel skip reading them; an
    in-place write to the zeros after the step was built must bring them back (decode.cpp q4_zeros)."""
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, lf.Int4WeightOnly(group_size=32))
    int4 = [m for m in model.modules() if hasattr(m, "zeros") and hasattr(m, "decode_operands")]
    with torch.no_grad():
        for m in int4:
            m.zeros.zero_()
    sym = logits_for(model, "int8")  # the plan is built here, with every zero point 0
    assert float((sym - logits_for(model, "fp32")).norm() / sym.norm()) < 0.03
    stack = model._decode_plan.stack
    with torch.no_grad():
        for m in int4:
            m.zeros.add_(0.01)  # same tensors: the plan is not rebuilt
    shifted = logits_for(model, "int8")
    assert model._decode_plan.stack is stack
    model._decode_plan.reset()  # a fresh plan sees nonzero zeros from the start
    assert torch.equal(shifted, logits_for(model, "int8"))
    assert not torch.equal(shifted, sym)


def test_int8_head_follows_the_layers(tiny_dirs):
    """An Int8Linear LM head takes the activations the fused step's layers take (int8 or fp32)."""
    from leanformer.compress.int8 import Int8Linear

    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, lf.Int8WeightOnly(ignore=[]))
    assert isinstance(model.lm_head, Int8Linear)
    ref = logits_for(model, "fp32")
    assert not model.lm_head.int8_activations
    got = logits_for(model, "int8")
    assert model.lm_head.int8_activations
    assert float((got - ref).norm() / ref.norm()) < 0.03
    head, x = model.lm_head, torch.randn(1, model.lm_head.in_features)  # one decode row
    with torch.inference_mode():
        y8 = head(x)
        head.int8_activations = False
        y32 = head(x)
    assert not torch.equal(y8, y32) and float((y8 - y32).norm() / y32.norm()) < 0.03


def test_prefill_logits_do_not_depend_on_an_earlier_decode(tiny_dirs):
    """The head's int8 activations are for the fused step's rows only: a prefill (all positions, or
    logits_at the last one) gives the same logits before and after the model has decoded (it used to
    keep the int8 head once a decode step had run, so a second generate() could pick another token)."""
    model, _ = lf.load(tiny_dirs["qwen2"])
    lf.quantize_(model, lf.Int8WeightOnly(ignore=[]))
    set_decode_activations(model, "int8")
    prompt, last = TOKENS[:1], torch.tensor([TOKENS.shape[1] - 1])

    def prefill() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            full = model(prompt)
            cache = KVCache.for_model(model, 1, 16)
            return full, model(prompt, cache=cache, logits_at=last)

    full0, at0 = prefill()
    decoded = logits_for(model, "int8")  # fused decode steps with the int8 head
    assert model.lm_head.int8_activations
    full1, at1 = prefill()
    assert not model.lm_head.int8_activations
    assert torch.equal(full0, full1) and torch.equal(at0, at1)
    assert torch.allclose(at1[0, 0], full1[0, -1], atol=1e-4)
    assert not torch.equal(decoded[-1, 0], full1[0, -1])  # the decode rows did take int8 activations


def _int8_group32(model) -> list:
    """Every block Linear swapped for a random group-32 Int8Linear whose scales fp16 holds (a GGUF
    Q8_0's): the fused step then keeps their fp16 copy (Q8I8::add_half, on AVX-512 VNNI)."""
    from leanformer.compress.int8 import Int8Linear

    swapped = []
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and not hasattr(child, "decode_operands"):
                    q = Int8Linear(
                        child.in_features, child.out_features, child.bias is not None, group_size=32
                    )
                    with torch.no_grad():
                        q.weight_int8.copy_(torch.randint(-127, 128, q.weight_int8.shape, dtype=torch.int8))
                        q.scales.copy_((torch.rand(q.scales.shape) * 0.004 + 1e-3).half().float())
                        if child.bias is not None:
                            q.bias.copy_(child.bias)
                    setattr(parent, name, q)
                    swapped.append(q)
    return swapped


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_half_scale_copies_follow_in_place_writes(kind, tiny_dirs):
    """The fused step reads fp16 copies of scales (and int4 zero points) that fp16 holds exactly, made
    when the step is built; an in-place write to the scales or zeros afterwards must reach the logits
    exactly as a freshly built step's (decode_linear.h: the tensors' version counters)."""
    torch.manual_seed(0)
    model, _ = lf.load(tiny_dirs["qwen2"])
    if kind == "int4":
        lf.quantize_(model, lf.Int4WeightOnly(group_size=32))
        quant = [m for m in model.modules() if hasattr(m, "zeros") and hasattr(m, "decode_operands")]
    else:
        quant = _int8_group32(model)
    assert quant
    with torch.no_grad():
        for m in quant:
            m.scales.copy_(m.scales.half().float())
            if kind == "int4":
                m.zeros.copy_(m.zeros.half().float())
    before = logits_for(model, "int8")  # the plan is built here, with the fp16 copies
    stack = model._decode_plan.stack
    for tensor in ("scales", "zeros") if kind == "int4" else ("scales",):
        with torch.no_grad():
            for m in quant:
                getattr(m, tensor).mul_(1.25)  # same tensors: the plan is not rebuilt
        changed = logits_for(model, "int8")
        assert model._decode_plan.stack is stack
        model._decode_plan.reset()  # a fresh plan makes fresh copies
        assert torch.equal(changed, logits_for(model, "int8"))
        assert not torch.equal(changed, before)
        stack, before = model._decode_plan.stack, changed
