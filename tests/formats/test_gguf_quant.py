"""load(gguf, keep_quantized=True): Q8_0 / Q4_0 / Q4_1 blocks straight into int8 / int4 modules and F16 /
BF16 matrices into 16-bit ones, exactly the weights a float load dequantizes; tiny synthetic files and the
real SmolLM2 Q4_1 file."""

from __future__ import annotations

from contextlib import nullcontext

import gguf
import pytest
import torch

import leanformer as lf
from leanformer.compress import F16Linear, Int4Linear, Int8Linear, qbase
from leanformer.compress.half import HalfLinear
from leanformer.compress.layout import QuantEmbedding
from tests.formats.test_gguf import tiny_config
from tests.formats.tiny_gguf import hf_llama_state_dict, write_gguf

Q = gguf.GGMLQuantizationType

# substring of the HF name -> GGML type, first match wins (norms stay F32)
CASES = {
    # untied; gate Q4_0 + up Q4_1 fuse into int4, q/k/v Q8_0 into int8 per 32 columns, embedding F16
    # reads an F16Linear table of its own, an unsupported Q5_1 head is dequantized to a float Linear
    "untied-mixed": (
        False,
        {"mlp.gate": Q.Q4_0, "mlp": Q.Q4_1, "self_attn": Q.Q8_0, "embed": Q.F16, "lm_head": Q.Q5_1},
    ),
    # tied Q8_0 table: one Int8Linear is both the head and the embedding; q Q4_0 + k Q5_0 + v Q8_0
    # -> int8 (codes q - 8, q - 16, q)
    "tied-q8": (
        True,
        {"v_proj": Q.Q8_0, "k_proj": Q.Q5_0, "self_attn": Q.Q4_0, "mlp": Q.Q4_1, "embed": Q.Q8_0},
    ),
    # tied Q4_1 table (int4 embedding lookups); Q4_1 mixed with Q8_0 in qkv has no exact int form -> float
    "tied-q4_1": (True, {"v_proj": Q.Q8_0, "self_attn": Q.Q4_1, "mlp": Q.Q4_0, "embed": Q.Q4_1}),
    # untied with a quantized embedding table of its own
    "untied-q4_0-table": (False, {"embed": Q.Q4_0, "lm_head": Q.Q8_0, "": Q.Q4_1}),
    # every matrix Q4_0 (tied): symmetric Int4Linears, no zero points held
    "tied-q4_0": (True, {"": Q.Q4_0}),
    # llama.cpp's converter output: every matrix F16 (tied: the head is the embedding's table), or BF16
    "tied-f16": (True, {"": Q.F16}),
    "untied-bf16": (False, {"": Q.BF16}),
}
QUANTIZED = (Int4Linear, Int8Linear, HalfLinear)


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    tied, qtypes = CASES[request.param]
    cfg = tiny_config(tie_word_embeddings=tied)
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    write_gguf(path, cfg, hf_llama_state_dict(cfg, seed=3), qtypes=qtypes)
    return request.param, path


@pytest.fixture
def fp32_prefill(monkeypatch):
    """The weights' own math in prefill: fp32 GEMMs on fp32 activations (not bf16, not the int8 GEMM)."""
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    monkeypatch.setattr(qbase.QuantLinear, "prefill_activations", "fp32")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def load_both(path):
    """(keep_quantized model, float model); the Q5_1 case must warn that it was dequantized."""
    with pytest.warns(UserWarning, match="Q5_1") if "untied-mixed" in path.name else nullcontext():
        q, _ = lf.load(path, keep_quantized=True)
    f, _ = lf.load(path, keep_quantized=False)
    return q, f


def test_modules_hold_exactly_the_file_weights(tiny, fp32_prefill):
    name, path = tiny
    q, f = load_both(path)
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"Int4Linear", "Int8Linear", "F16Linear", "BF16Linear"} & kinds
    if name.endswith("f16"):  # every matrix, the embedding's table too, as 2 bytes a weight
        assert kinds >= {"F16Linear" if name == "tied-f16" else "BF16Linear"} and "Linear" not in kinds
    float_weights = dict(f.named_parameters())  # tied: lm_head.weight is listed once, as the embedding
    for mod_name, m in q.named_modules():
        if isinstance(m, QUANTIZED):
            key = (
                f"{mod_name}.weight" if f"{mod_name}.weight" in float_weights else "model.embed_tokens.weight"
            )
            assert torch.equal(m.dequantize(), float_weights[key]), mod_name  # bit-exact, not merely close
            assert isinstance(m, HalfLinear) or m.group_size == 32
    emb = q.model.embed_tokens
    if name == "untied-mixed":
        assert isinstance(emb.source(), F16Linear) and type(q.lm_head) is not F16Linear
    assert isinstance(emb, QuantEmbedding) and emb.tied == name.startswith("tied")
    assert torch.equal(emb(torch.arange(7)), f.model.embed_tokens.weight[:7])
    if name == "tied-q4_0":  # symmetric: no zeros in memory or in the state dict
        assert all(m.symmetric and m.zeros is None for m in q.modules() if isinstance(m, Int4Linear))
        assert not any(k.endswith(".zeros") for k in q.state_dict())
    if name == "tied-q4_1":
        assert not isinstance(q.model.layers[0].self_attn.qkv_proj, (Int4Linear, Int8Linear))
        assert isinstance(q.model.layers[0].mlp.gate_up_proj, Int4Linear)


def test_logits_match_float_load(tiny, fp32_prefill):
    """Same weights, fp32 math: prefill (dequantize path) and decode-sized (GEMV kernel) calls agree
    with the float model to fp32 rounding."""
    _, path = tiny
    q, f = load_both(path)
    ids = torch.randint(3, 290, (2, 24))
    with torch.no_grad():
        assert rel(q(ids), f(ids)) < 1e-5
        assert rel(q(ids[:1, :3]), f(ids[:1, :3])) < 1e-5


def test_save_reload_and_bf16(tiny, tmp_path, fp32_prefill):
    name, path = tiny
    q, _ = load_both(path)
    ids = torch.randint(3, 290, (1, 20))
    with torch.no_grad():
        ref = q(ids)
        lf.save(q, None, tmp_path / "saved")
        again, _ = lf.load(tmp_path / "saved")
        assert torch.equal(again(ids), ref)
    assert again.config["leanformer"]["quantized_modules"] == q.config["leanformer"]["quantized_modules"]
    b, _ = lf.load(path, dtype="bfloat16", keep_quantized=True) if name != "untied-mixed" else (None, None)
    if b is not None:  # scales survive a bf16 load exactly (and fp16 weights stay fp16)
        for (n1, m1), (_, m2) in zip(q.named_modules(), b.named_modules()):
            if isinstance(m1, F16Linear):
                assert torch.equal(m1.weight_f16, m2.weight_f16), n1
            if isinstance(m1, (Int4Linear, Int8Linear)):
                # fp16 at group 32 (GGUF block scales: QuantLinear.compact_scales), else fp32
                want = torch.float16 if m1._reads_half_scales() else torch.float32
                assert m2.scales.dtype == m1.scales.dtype == want and torch.equal(m1.scales, m2.scales), n1
        with torch.no_grad():
            out = b(ids)
        assert out.dtype == torch.bfloat16 and rel(out.float(), ref) < 0.1


def test_keep_quantized_is_the_default_and_a_no_op_for_other_formats(shared):
    """keep_quantized=True is the default now: for a checkpoint that is not a GGUF it changes nothing."""
    path = shared / "models/stories260K"
    a, _ = lf.load(path, keep_quantized=True, fast=False)
    b, _ = lf.load(path, keep_quantized=False, fast=False)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())


# --- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pair(smollm2):
    q, tok = lf.load(smollm2, keep_quantized=True)
    f, _ = lf.load(smollm2, keep_quantized=False)
    return q, f, tok


def test_smollm2_quantized_matches_fp32_and_generates(smollm2_pair, fp32_prefill):
    q, f, tok = smollm2_pair
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.group_size == 32  # token_embd is Q8_0
    assert isinstance(q.model.embed_tokens, QuantEmbedding) and q.model.embed_tokens.tied
    n_int4 = sum(isinstance(m, Int4Linear) for m in q.modules())
    assert n_int4 == 4 * 30  # qkv, o, gate_up, down per layer
    floats = sum(p.numel() for p in q.parameters())
    assert floats < 100_000  # only the norms are float: no full-precision copy of any matrix
    float_weights = dict(f.named_parameters())
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.29.mlp.down_proj", "lm_head"):
        key = f"{name}.weight" if name != "lm_head" else "model.embed_tokens.weight"  # tied
        assert torch.equal(q.get_submodule(name).dequantize(), float_weights[key]), name
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel(q(ids), f(ids)) < 1e-3  # prefill: dequantize + fp32 GEMM
        assert rel(q(ids[:, :9]), f(ids[:, :9])) < 1e-3  # decode-sized: the GEMV kernels
    answer = lf.generate(q, tok, prompt, max_new_tokens=12)
    assert "Paris" in answer
    assert answer == lf.generate(f, tok, prompt, max_new_tokens=12)


@pytest.mark.parametrize("activations", ["int8", "fp32"])
def test_symmetric_q4_0_through_the_fused_step(tmp_path, activations):
    """A Q4_0 file's symmetric Int4Linears (no zeros) through the fused step: on fp32 activations the
    module path's logits; on int8 activations, bit for bit the step of the same model holding all-zero
    zero points."""
    import copy

    from leanformer.models.fused import set_decode_activations
    from tests.models.test_fused import assert_fused_matches, decode_logits

    cfg = tiny_config(tie_word_embeddings=True)
    path = tmp_path / "q4_0.gguf"
    write_gguf(path, cfg, hf_llama_state_dict(cfg, seed=3), qtypes={"": Q.Q4_0})
    q, _ = lf.load(path)
    set_decode_activations(q, activations)
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    if activations == "fp32":  # the module path runs fp32 activations
        assert_fused_matches(q, prompts=prompts)
        return
    zeros = copy.deepcopy(q)
    for m in zeros.modules():
        if isinstance(m, Int4Linear):
            m.zeros, m.symmetric = torch.zeros_like(m.scales), False
    assert torch.equal(decode_logits(q, True, prompts), decode_logits(zeros, True, prompts))


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_smollm2_as_f16_and_bf16_files(smollm2, tmp_path, qtype):
    """SmolLM2's weights re-written as an F16 / BF16 GGUF (llama.cpp's unquantized forms) load as 16-bit
    modules holding the file's values (271 MB, not 540), and decode through the fused step to the very
    logits of the same file loaded as fp32: the same fp32 loop on the same values."""
    from tests.formats.kquants import requantize_gguf
    from tests.models.test_fused import decode_logits

    path = tmp_path / f"smollm2-{qtype}.gguf"
    requantize_gguf(smollm2, path, lambda name, shape: Q[qtype])
    half, tok = lf.load(path)
    ref, _ = lf.load(path, keep_quantized=False)
    kinds = {type(m).__name__ for m in half.modules() if "Linear" in type(m).__name__}
    assert kinds == {f"{'F' if qtype == 'F16' else 'BF'}16Linear"}
    assert sum(b.numel() * b.element_size() for b in half.buffers()) < 0.51 * sum(
        p.numel() * p.element_size() for p in ref.parameters()
    )
    prompts = [tok("The capital of France is").input_ids]  # <= 8 tokens: the prefill runs the GEMVs too
    assert torch.equal(
        decode_logits(half, True, prompts, steps=4), decode_logits(ref, True, prompts, steps=4)
    )


@pytest.mark.parametrize("tied", [True, False])
def test_16_bit_tables_in_the_fused_ends(tmp_path, tied):
    """A BF16 file's embedding table (tied: the head's; untied: its own BF16Linear) is looked up inside
    the fused step's ends: the logits of the same file loaded as fp32, bit for bit."""
    from tests.models.test_fused import decode_logits

    cfg = tiny_config(tie_word_embeddings=tied)
    path = tmp_path / "bf16.gguf"
    write_gguf(path, cfg, hf_llama_state_dict(cfg, seed=5), qtypes={"": Q.BF16})
    half, _ = lf.load(path)
    ref, _ = lf.load(path, keep_quantized=False)
    emb = half.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.tied == tied
    prompts = [[3, 14, 15], [35, 89]]  # short: their prefill runs the GEMVs too
    assert torch.equal(decode_logits(half, True, prompts), decode_logits(ref, True, prompts))
    assert half._decode_plan.stack.has_ends
