"""Int4Linear / Int8Linear holding their group-32 scales (and int4 zero points) as fp16 where that holds
every value (QuantLinear.compact_scales: a GGUF's block scales, int4 round-to-nearest's bf16 values): the
module, the fused decode step and the prefill give bit for bit what the same model holding fp32 arrays
gives; loads and writes never round. Kernel level: tests/kernels/test_half_scales.py."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.compress import Int4Linear, Int4WeightOnly, Int8Linear, quantize_
from leanformer.compress.int5 import Int5Linear
from leanformer.kernels import cpu
from leanformer.models.fused import set_decode_activations
from tests.formats.test_gguf import tiny_config
from tests.formats.tiny_gguf import hf_llama_state_dict, write_gguf
from tests.models.test_fused import decode_logits

Q = gguf.GGMLQuantizationType


def held_fp32(model: nn.Module) -> nn.Module:
    """A copy whose int4 / int8 modules hold fp32 arrays of the same values (as before compact_scales)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, (Int4Linear, Int8Linear, Int5Linear)):
            for name in ("scales", "zeros"):
                if m._buffers.get(name) is not None:
                    m._buffers[name] = m._buffers[name].float()
    return out


def int4_modules(model: nn.Module) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def test_compacts_exact_group_32_only():
    torch.manual_seed(0)
    lin = nn.Linear(96, 24)
    m = Int4Linear.from_linear(lin, 32)  # RTN's scales / zeros are bf16 values: fp16 holds them
    assert m.scales.dtype == m.zeros.dtype == torch.float16
    assert Int4Linear.from_linear(lin, 64).scales.dtype == torch.float32  # the loops read fp16 at 32 only
    s, z = m.group_params()
    m.set_params(s, z + 1e-7)  # zeros fp16 cannot hold: fp32, the scales stay fp16
    assert m.scales.dtype == torch.float16 and m.zeros.dtype == torch.float32
    assert torch.equal(m.zeros, z + 1e-7)
    m.set_params(s * (1 + 1e-6), z)  # neither: both fp32 (zeros go with the scales)
    assert m.scales.dtype == m.zeros.dtype == torch.float32
    assert m.group_params()[0].dtype == torch.float32


def test_load_state_dict_into_fp16_buffers_does_not_round():
    torch.manual_seed(0)
    m = Int4Linear.from_linear(nn.Linear(64, 16), 32)
    assert m.scales.dtype == torch.float16
    sd = m.state_dict()
    sd["scales"] = sd["scales"].float() * (1 + 1e-6)  # values fp16 cannot hold
    m.load_state_dict(sd)  # a copy into the existing buffers, not assign
    assert m.scales.dtype == torch.float32 and torch.equal(m.scales, sd["scales"])


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0", "Q5_0"])
@pytest.mark.parametrize("act", ["avx2", "avx_vnni", "avx512_vnni"])
def test_fused_step_and_prefill_equal_fp32_arrays(tmp_path, qtype, act):
    """A Q4_1 / Q4_0 / Q8_0 / Q5_0 file's modules hold fp16 scales (and Q4_1's zero points where fp16 holds min
    + 8 d); decode through the fused step (int8 activations, 1 and 3 rows; the tied table as the head and
    the embedding) and a 20-token prompt (the int8 GEMM prefill) give the logits of the same model
    holding fp32 arrays, bit for bit."""
    if act not in cpu.act_isas():
        pytest.skip(f"this CPU lacks {act} (has {cpu.act_isas()})")
    cfg = tiny_config(tie_word_embeddings=True)
    path = tmp_path / f"{qtype}.gguf"
    write_gguf(path, cfg, hf_llama_state_dict(cfg, seed=3), qtypes={"": Q[qtype]})
    q, _ = lf.load(path)
    mods = [m for m in q.modules() if isinstance(m, (Int4Linear, Int8Linear, Int5Linear))]
    assert mods and all(m.scales.dtype == torch.float16 for m in mods)
    ref = held_fp32(q)
    cpu.set_act_isa(act)
    try:
        for model in (q, ref):
            set_decode_activations(model, "int8")
        for prompts in ([[3, 14, 15, 92, 65]], [[3, 14, 15], [35, 89], list(range(40, 60))]):
            assert torch.equal(decode_logits(q, True, prompts), decode_logits(ref, True, prompts))
    finally:
        cpu.set_act_isa(None)


def test_quantize_then_save_and_reload(tiny_lm, heldout, tmp_path):
    """quantize_ at group 32 leaves fp16 scales; a save holds them (bf16 where exact) and a reload holds
    fp16 again, same outputs."""
    quantize_(tiny_lm, Int4WeightOnly(group_size=32))
    assert all(m.scales.dtype == torch.float16 for m in int4_modules(tiny_lm))
    with torch.no_grad():
        ref = tiny_lm(heldout)
        assert torch.equal(held_fp32(tiny_lm)(heldout), ref)
    sd = tiny_lm.state_dict()
    fresh = copy.deepcopy(tiny_lm)
    for m in int4_modules(fresh):
        m.set_params(torch.ones_like(m.scales), torch.zeros_like(m.zeros))
    fresh.load_state_dict(sd)
    assert all(m.scales.dtype == torch.float16 for m in int4_modules(fresh))
    with torch.no_grad():
        assert torch.equal(fresh(heldout), ref)


def test_smollm2_holds_about_its_file_size(smollm2):
    """SmolLM2's Q4_1 file (98 MB): its modules hold fp16 block scales, and zero points (zero = min + 8 d)
    as fp16 wherever fp16 holds them (118 of 120 matrices), ~file size in RAM instead of 112 MB of
    modules; the fused step's logits are the fp32 arrays' bit for bit."""
    q, tok = lf.load(smollm2)
    mods = int4_modules(q)
    assert all(m.scales.dtype == torch.float16 for m in mods)
    for m in mods:  # fp32 only where fp16 would round
        assert m.zeros.dtype == torch.float16 or not torch.equal(m.zeros.half().float(), m.zeros)
    assert sum(m.zeros.dtype == torch.float16 for m in mods) > 0.9 * len(mods)
    assert q.lm_head.scales.dtype == torch.float16  # the tied Q8_0 table: Int8Linear group 32
    held = sum(b.numel() * b.element_size() for b in q.buffers()) + sum(
        p.numel() * p.element_size() for p in q.parameters()
    )
    assert held < 1.03 * smollm2.stat().st_size, held / 1e6
    prompts = [tok("The capital of France is").input_ids, tok("Once upon a time").input_ids]
    set_decode_activations(q, "int8")
    ref = held_fp32(q)
    assert torch.equal(decode_logits(q, True, prompts, steps=3), decode_logits(ref, True, prompts, steps=3))


def test_set_params_refuses_bad_operands():
    m = Int4Linear.from_linear(nn.Linear(64, 16), 32)
    s, z = m.group_params()
    with pytest.raises(lf.LeanformerError, match=r"scales must be \[out_features, groups\] = \[16, 2\]"):
        m.set_params(s[:, :1], z)
    with pytest.raises(lf.LeanformerError, match="zeros are required"):
        m.set_params(s)
    with pytest.raises(lf.LeanformerError, match="8-bit scale codes"):
        Int4Linear.from_linear(nn.Linear(64, 16), 32, scale_bits=8).set_params(s, z)


def test_int8_compacts_group_32_over_whole_blocks_only():
    m = Int8Linear(96, 8, group_size=32)
    m.load_state_dict({"weight_int8": torch.ones(8, 96, dtype=torch.int8), "scales": torch.full((8, 3), 0.5)})
    assert m.scales.dtype == torch.float16
    for k, g in ((100, 32), (96, 48)):  # a partial last block / another group: fp32 (the loops read fp32)
        m = Int8Linear(k, 8, group_size=g)
        m.load_state_dict(
            {"weight_int8": torch.ones(8, k, dtype=torch.int8), "scales": torch.full((8, -(-k // g)), 0.5)}
        )
        assert m.scales.dtype == torch.float32
    per_row = Int8Linear.from_linear(nn.Linear(64, 8))
    assert per_row.scales.dtype == torch.float32
