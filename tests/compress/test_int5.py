"""Int5Linear (compress/int5.py): GGUF Q5_0 kept at 5 bits. Bit-exact with gguf's dequantization (random
blocks, Q5_0 + Q4_0 fused, real SmolLM2 weights re-quantized to Q5_0), its int8-activation kernel
against the float64 reference on every instruction set this CPU has, the fused decode step, saves."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import leanformer as lf
from leanformer import kernels as lk
from leanformer.compress import qbase
from leanformer.compress.gguf_quant import quantized_form
from leanformer.compress.int5 import Int5Linear, pack_codes, unpack_codes
from leanformer.compress.kernels import pack_nibbles
from leanformer.compress.layout import _empty_linear
from leanformer.errors import LeanformerError
from leanformer.formats.gguf import GGUFTensor, read_gguf_raw
from leanformer.kernels import cpu
from leanformer.kernels.int8_act import ref_dequantize_act
from leanformer.models.fused import set_decode_activations
from tests.formats.test_gguf import tiny_config
from tests.formats.tiny_gguf import hf_llama_state_dict, write_gguf
from tests.models.test_fused_int8 import TOKENS, logits_for

Q = gguf.GGMLQuantizationType
needs_kernels = pytest.mark.skipif(not lk.available(), reason="GEMV kernels unavailable on this machine")


@pytest.fixture(params=["avx2", "avx_vnni", "avx512_vnni"])
def act_isa(request):
    if not lk.available():
        pytest.skip("GEMV kernels unavailable on this machine")
    if request.param not in cpu.act_isas():
        pytest.skip(f"this CPU lacks {request.param} (has {cpu.act_isas()})")
    cpu.set_act_isa(request.param)
    yield request.param
    cpu.set_act_isa(None)


def random_codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def random_module(n: int, k: int, seed: int = 0, bias: bool = True) -> Int5Linear:
    g = torch.Generator().manual_seed(seed + 1)
    scales = (torch.rand(n, -(-k // 32), generator=g) - 0.5).half().float()  # fp16 values, as GGUF's d
    return Int5Linear.from_codes(
        random_codes(n, k, seed), scales, torch.randn(n, generator=g) if bias else None
    )


def old_packing(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first int5 layout (saves made before `packing`): nibbles as Int4Linear's, 5th bits per 64-column
    chunk at bit 8p + 4 + Q (even column 2 (8Q + p)) and 8p + Q (odd column 2 (8Q + p) + 1); a last 32
    columns bit j for column j."""
    n, kp = codes.shape
    full = kp // 64 * 64
    p, r = np.divmod(np.arange(64), 8)
    order = np.where(r >= 4, 2 * (8 * (r - 4) + p), 2 * (8 * r + p) + 1)
    bits = (codes.numpy() >> 4).astype(np.uint8)
    parts = [bits[:, :full].reshape(n, -1, 64)[:, :, order].reshape(n, -1), bits[:, full:]]
    high = np.packbits(np.concatenate(parts, 1), axis=-1, bitorder="little").view("<i4")
    return pack_nibbles(codes & 15), torch.from_numpy(np.ascontiguousarray(high))


@pytest.mark.parametrize("k", [576, 96, 32, 100, 1000])  # 96: a half chunk last; 100 / 1000: padded
def test_codes_round_trip_and_dequantize(k):
    m = random_module(13, k)
    kp = m.k_padded
    codes = m.codes()
    assert codes.shape == (13, kp) and int(codes.max()) <= 31
    assert torch.all(codes[:, k:] == 16)  # padding: weight 0
    assert torch.equal(codes[:, :k], random_codes(13, k))
    for seed in range(3):  # every code pattern's XOR chain through E, last half chunk included
        c = random_codes(9, kp, seed)
        assert torch.equal(unpack_codes(*pack_codes(c), kp), c)
    want = (codes[:, :k].float() - 16) * m.scales.repeat_interleave(32, 1)[:, :k]
    assert torch.equal(m.dequantize(), want)


@needs_kernels
@pytest.mark.parametrize("k", [576, 96, 100])
def test_native_dequant_is_bit_exact(k):
    m = random_module(21, k)
    rows = torch.tensor([20, 0, 7, 7])
    for r in (slice(None), slice(3, 9), rows):
        assert torch.equal(m.dequantize_as(r, torch.float32), m.dequantize_rows(r))
        assert torch.equal(m.dequantize_as(r, torch.bfloat16), m.dequantize_rows(r).bfloat16())


@pytest.mark.parametrize("rows", [1, 3, 11])  # 11: two calls of at most 8 rows
@pytest.mark.parametrize("k", [576, 1536, 96, 32, 100, 1000])
def test_kernel_matches_reference(act_isa, rows, k):
    """Integer dot products are exact: only fp32 summation order separates kernel and reference."""
    m = random_module(67, k, seed=k)
    x = torch.randn(rows, k) * 3
    y = lk.ext().linear_q5_i8(
        torch.nn.functional.pad(x, (0, m.k_padded - k)), m.qweight, m.qhigh, m.scales, m.bias
    )
    xd = ref_dequantize_act(x)
    w = m.dequantize().double()
    ref = xd @ w.T + m.bias.double()
    err = ((y.double() - ref).abs() / (xd.abs() @ w.abs().T + 1)).max()
    assert float(err) < 1e-5
    m.int8_activations = True  # the module path of an LM head in the fused step: same kernel
    with torch.inference_mode():
        assert torch.equal(m(x), y)


@pytest.mark.parametrize("rows", [1, 5, 9])
@pytest.mark.parametrize("k", [1536, 576, 100, 120])  # 100 / 120: a last block of 4 / 24 columns
def test_int8_group16_kernel(act_isa, rows, k):
    """Int8Linear group 16 (GGUF Q6_K) on int8 activations: two scales per 32-column block."""
    n = 37
    wq = torch.randint(-32, 32, (n, k), dtype=torch.int8)
    scales = torch.rand(n, -(-k // 16))
    x = torch.randn(rows, k)
    y = lk.ext().linear_q8_i8(x, wq, scales, None, 16)
    xd, w = ref_dequantize_act(x), lk.dequant_int8(wq, scales, 16).double()
    err = ((y.double() - xd @ w.T).abs() / (xd.abs() @ w.abs().T + 1)).max()
    assert float(err) < 1e-5


@pytest.mark.parametrize("k", [576, 96])
def test_first_layout_saves_repack_on_load(k):
    """A state dict from before the XOR layout (no `packing`) loads as the same weights."""
    m = random_module(7, k)
    qweight, qhigh = old_packing(m.codes())
    old = {n: t for n, t in m.state_dict().items() if n != "packing"} | {"qweight": qweight, "qhigh": qhigh}
    again = Int5Linear(k, 7, bias=True)
    again.load_state_dict(old)
    assert torch.equal(again.dequantize(), m.dequantize())
    with pytest.raises(LeanformerError, match="int5 layout 9"):
        again.load_state_dict(m.state_dict() | {"packing": torch.tensor([9], dtype=torch.uint8)})


@needs_kernels
def test_kernel_rejects_bad_operands():
    m = random_module(4, 64)
    with pytest.raises(RuntimeError, match="high bits"):
        lk.ext().linear_q5_i8(torch.randn(1, 64), m.qweight, m.qhigh.long(), m.scales)
    with pytest.raises(RuntimeError, match="more columns"):
        lk.ext().linear_q5_i8(torch.randn(1, 96), m.qweight, m.qhigh, m.scales)


def q5_tensor(w: np.ndarray, kind: Q = Q.Q5_0) -> GGUFTensor:
    data = gguf.quants.quantize(w.astype(np.float32), kind)
    return GGUFTensor("w", kind.name, tuple(w.shape), data)


def module_for(parts: list[GGUFTensor]):
    spec, tensors = quantized_form(parts)
    k, n = parts[0].shape[1], sum(p.shape[0] for p in parts)
    m = _empty_linear(spec, k, n, False, "cpu", torch.float32)  # as a load builds it from the layout
    m.load_state_dict(tensors)
    return spec, m


def test_gguf_q5_0_and_q4_0_map_to_int5_bit_exact():
    rng = np.random.default_rng(0)
    q5 = q5_tensor(rng.standard_normal((40, 192)) * 0.05)
    q4 = q5_tensor(rng.standard_normal((24, 192)) * 0.05, Q.Q4_0)
    q8 = q5_tensor(rng.standard_normal((8, 192)) * 0.05, Q.Q8_0)
    spec, m = module_for([q5])
    assert spec == {"type": "Int5Linear", "group_size": 32}
    assert torch.equal(m.dequantize(), q5.dequantize())
    spec, m = module_for([q5, q4])  # Q4_0 codes shift into Q5_0's: q + 8
    assert spec["type"] == "Int5Linear"
    assert torch.equal(m.dequantize(), torch.cat([q5.dequantize(), q4.dequantize()]))
    spec, m = module_for([q4])
    assert spec["type"] == "Int4Linear" and m.zeros is None  # Q4_0 alone stays 4-bit, symmetric
    assert torch.equal(m.dequantize(), q4.dequantize())
    spec, m = module_for([q5, q8])  # no 5-bit form for Q8_0: int8, codes q - 16
    assert spec["type"] == "Int8Linear"
    assert torch.equal(m.dequantize(), torch.cat([q5.dequantize(), q8.dequantize()]))


def test_real_smollm2_weights_as_q5_0(smollm2):
    """SmolLM2's own weights re-quantized to Q5_0 (what a Q4_K_M file holds for its 576-column rows)."""
    _, raw = read_gguf_raw(smollm2)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.gate_proj.weight"):
        t = q5_tensor(raw[name].dequantize().numpy())
        _, m = module_for([t])
        assert torch.equal(m.dequantize(), t.dequantize()), name


# --- a whole model: tiny GGUF with Q5_0 layers -----------------------------------------------------


@pytest.fixture(scope="module")
def q5_gguf(tmp_path_factory):
    """Tied Q8_0 table; gate Q5_0 + up Q4_0 (int5), down Q4_0 (int4, K = 96), the rest Q5_0."""
    cfg = tiny_config(tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("q5") / "q5.gguf"
    qtypes = {"embed": Q.Q8_0, "up_proj": Q.Q4_0, "down": Q.Q4_0, "": Q.Q5_0}
    write_gguf(path, cfg, hf_llama_state_dict(cfg, seed=3), qtypes=qtypes)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_model_loads_int5_and_matches_float(q5_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    q, _ = lf.load(q5_gguf, keep_quantized=True)
    f, _ = lf.load(q5_gguf, keep_quantized=False)
    layer = q.model.layers[1]
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"):
        m = layer.get_submodule(name)
        assert isinstance(m, Int5Linear), name
        assert torch.equal(m.dequantize(), f.model.layers[1].get_submodule(name).weight), name
    assert not isinstance(layer.mlp.down_proj, Int5Linear)
    ids = TOKENS
    with torch.no_grad():
        prefill = q(ids)
        assert rel(prefill, f(ids)) < 1e-5  # dequantize + GEMM
        assert rel(q(ids[:1, :3]), f(ids[:1, :3])) < 1e-5  # decode-sized module calls
    ref = logits_for(f, "fp32")
    assert rel(logits_for(q, "fp32"), ref) < 1e-5  # fused step, fp32 activations: exact weights
    got = logits_for(q, "int8")
    if lk.available():
        stack = q._decode_plan.stack
        assert stack is not None and stack.int8_act and stack.int8_linears() == 4 * 2
        assert rel(got, ref) < 0.03  # int8 rounding of every Linear input
    lf.save(q, None, tmp_path / "saved")
    again, _ = lf.load(tmp_path / "saved")
    assert isinstance(again.model.layers[0].self_attn.o_proj, Int5Linear)
    o_proj = q.model.layers[0].self_attn.o_proj
    assert again.model.layers[0].self_attn.o_proj.scales.dtype == torch.float16  # the file's (compact_scales)
    assert torch.equal(again.model.layers[0].self_attn.o_proj.scales, o_proj.scales)
    with torch.no_grad():  # (before the fused runs: they leave the Int8Linear head on int8 activations)
        assert torch.equal(again(ids), prefill)


@pytest.mark.slow
def test_smollm2_q4_k_m_file(smollm2, tmp_path):
    """The Q4_K_M file scripts/make_q4km_gguf.py makes (~20 s): every Q5_0 module int5 and bit-exact
    with the float load, and greedy text identical to the float load's."""
    from scripts.make_q4km_gguf import q4_k_m

    from tests.formats.kquants import requantize_gguf

    path = tmp_path / "q4km.gguf"
    requantize_gguf(smollm2, path, q4_k_m)
    q, tok = lf.load(path, keep_quantized=True)
    f, _ = lf.load(path, keep_quantized=False)
    int5 = {n: m for n, m in q.named_modules() if isinstance(m, Int5Linear)}
    assert len(int5) == 75  # o and gate_up everywhere, qkv where v is Q5_0 too (odd layers)
    floats = dict(f.named_parameters())
    for name, m in int5.items():
        assert torch.equal(m.dequantize(), floats[f"{name}.weight"]), name
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # the re-quantized weights themselves answer "L'Étoile ..." here: the int5 model must say the same
    set_decode_activations(q, "fp32")
    assert lf.generate(q, tok, prompt, max_new_tokens=12) == lf.generate(f, tok, prompt, max_new_tokens=12)
