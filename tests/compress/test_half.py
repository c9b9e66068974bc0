"""BF16Linear / F16Linear (compress/half.py): 16-bit float weights applied in fp32, through every path of a
quantized Linear."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer import kernels
from leanformer.compress import (
    BF16Linear,
    BF16WeightOnly,
    F16Linear,
    F16WeightOnly,
    apply,
    load_recipe,
    quantize_,
)
from leanformer.compress.layout import QuantEmbedding
from leanformer.models.kv_cache import KVCache

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")

# (config, module, its weight buffer, dtype, the preset with the head)
KINDS = [
    (BF16WeightOnly, BF16Linear, "weight_bf16", torch.bfloat16, "bf16+head-bf16"),
    (F16WeightOnly, F16Linear, "weight_f16", torch.float16, "f16+head-f16"),
]
kinds = pytest.mark.parametrize("cfg,cls,buffer,dtype,preset", KINDS, ids=["bf16", "f16"])


def _round_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """The reference: the fp32 model with every Linear weight (and so a tied embedding) made exact in dtype."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.to(dtype).float())


@kinds
def test_weights_are_16_bit_and_stay_so(tiny_lm, heldout, err, cfg, cls, buffer, dtype, preset):
    ref = tiny_lm(heldout)
    w = tiny_lm.layers[0].qkv_proj.weight.detach().clone()
    quantize_(tiny_lm, cfg())
    lin = tiny_lm.layers[0].qkv_proj
    assert isinstance(lin, cls) and getattr(lin, buffer).dtype == dtype
    assert torch.equal(getattr(lin, buffer), w.to(dtype))
    assert isinstance(tiny_lm.lm_head, nn.Linear)  # ignored by default, as every weight-only config
    assert err(tiny_lm(heldout), ref) < 0.01
    assert err(tiny_lm(heldout[:1, :1]), ref[:1, :1]) < 0.01  # decode-sized call: the GEMV kernel
    tiny_lm.to(torch.float32)  # a model cast moves the weight, never widens or rounds it
    assert getattr(lin, buffer).dtype == dtype
    tiny_lm.to(torch.bfloat16)
    assert getattr(lin, buffer).dtype == dtype and tiny_lm(heldout).dtype == torch.bfloat16
    assert f"weight={str(dtype)[6:]}" in str(lin)


@kinds
def test_state_dict_is_half_of_fp32_and_round_trips(
    tiny_lm, make_tiny_lm, heldout, cfg, cls, buffer, dtype, preset
):
    fp32 = sum(t.numel() * t.element_size() for k, t in tiny_lm.state_dict().items() if "proj" in k)
    quantize_(tiny_lm, cfg())
    sd = tiny_lm.state_dict()
    assert sd[f"layers.1.down_proj.{buffer}"].dtype == dtype
    assert sum(t.numel() * t.element_size() for k, t in sd.items() if "proj" in k) * 2 == fp32
    out = tiny_lm(heldout)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = make_tiny_lm(seed=123).eval()  # different weights: everything must come from the file
    apply(fresh, [cfg()], structure_only=True)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(heldout), out)
    with torch.device("meta"):
        meta = make_tiny_lm()
    apply(meta, [cfg()], structure_only=True)
    meta.load_state_dict({k: v.float() if k.endswith(buffer) else v for k, v in sd.items()}, assign=True)
    assert getattr(meta.layers[0].qkv_proj, buffer).dtype == dtype  # assigned fp32: made 16-bit again
    assert torch.equal(meta(heldout), out)


@needs_kernels
@kinds
def test_prefill_and_decode_paths_apply_the_same_weight(cfg, cls, buffer, dtype, preset):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    m = cls.from_linear(lin)
    w = lin.weight.detach().to(dtype).float()
    for rows in (1, 3, 8, 9, 40):  # <= 8: the GEMV (fp32 math); more: the chunked prefill
        x = torch.randn(rows, 96)
        ref = nn.functional.linear(x.double(), w.double(), lin.bias.detach().double()).float()
        tol = 1e-5 if rows <= 8 else 2e-2  # bf16 activations where the CPU prefills in bf16
        assert (m(x) - ref).abs().max() / ref.abs().max() < tol, rows


@needs_kernels
@kinds
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: a tied head, so the embedding reads it too
def test_fused_decode_equals_fp32_on_the_rounded_weights(arch, tiny_dirs, cfg, cls, buffer, dtype, preset):
    """The +head preset through the fused step (ids to logits in one C++ call) gives, bit for bit, the
    logits of the fp32 model whose weights were rounded to the dtype: the same fp32 loop on the same
    values."""
    model, _ = lf.load(tiny_dirs[arch])
    ref_model, _ = lf.load(tiny_dirs[arch])
    apply(model, load_recipe(preset))
    _round_linears(ref_model, dtype)
    assert isinstance(model.lm_head, cls)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) == (arch == "qwen2")
    got, ref = (_greedy_logits(m, steps=12) for m in (model, ref_model))
    assert model._decode_plan.stack is not None and model._decode_plan.stack.has_ends
    assert torch.equal(got, ref)


def _greedy_logits(model, prompt=(3,), steps: int = 8) -> torch.Tensor:
    """A one-token prompt: every step, the first included, runs in the fused step (a longer prompt's
    prefill would run the modules, whose GEMMs sum in another order than the fp32 reference's)."""
    cache = KVCache.for_model(model, 1, 32)
    slot, out = torch.tensor([0]), []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, slots=slot)
        cache.advance(slot, len(prompt))
        ids = logits[:, -1:].argmax(-1)
        for _ in range(steps):
            logits = model(ids, cache=cache, slots=slot)
            cache.advance(slot, 1)
            out.append(logits[:, -1])
            ids = logits[:, -1:].argmax(-1)
    return torch.stack(out)


@needs_kernels
@kinds
def test_saved_and_reloaded(tiny_dirs, tmp_path, cfg, cls, buffer, dtype, preset):
    model, tok = lf.load(tiny_dirs["qwen2"])
    apply(model, load_recipe(preset))
    before = _greedy_logits(model)
    lf.save(model, tok, tmp_path / "saved")
    again, _ = lf.load(tmp_path / "saved")
    assert isinstance(again.lm_head, cls) and getattr(again.lm_head, buffer).dtype == dtype
    assert torch.equal(_greedy_logits(again), before)


@needs_kernels
def test_a_bf16_checkpoint_loses_nothing(tmp_path):
    """A checkpoint shipped in bf16, loaded in fp32 then given `bf16+head-bf16`: every Linear holds exactly
    the file's bf16 values (the fp32 detour is exact both ways), and the GEMVs compute on them in fp32."""
    from safetensors.torch import load_file

    from tests.conftest import tiny_hf_model

    tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    file = load_file(tmp_path / "model.safetensors")
    model, _ = lf.load(tmp_path)  # float32
    apply(model, load_recipe("bf16+head-bf16"))
    layer = model.model.layers[1]
    qkv = torch.cat([file[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(layer.self_attn.qkv_proj.weight_bf16, qkv)
    assert torch.equal(layer.mlp.down_proj.weight_bf16, file["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(model.lm_head.weight_bf16, file["lm_head.weight"])


def test_fp16_weights_widen_to_bf16_for_the_prefill_as_a_direct_conversion_would():
    """F16Linear's bf16 prefill rows go through fp32 (torch's direct fp16 -> bf16 is a scalar loop, 5x the
    time): the same bits for every fp16 value, infinities and NaN included."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    m = F16Linear(256, 256)
    m.weight_f16.copy_(every.view(256, 256))
    got, want = m._dequant_native(slice(None), bf16=True), every.view(256, 256).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    same = got.view(torch.int16) == want.view(torch.int16)
    assert bool((same | (got.isnan() & want.isnan())).all())
