"""load(gguf, keep_quantized=True) for llama.cpp's K-quant mixes: Q4_K -> int4 group 32, Q6_K -> int8
group 16, Q5_0 -> int5 (alone or with Q4_0; with an int8 type: int8 group 32), exactly the weights a float load dequantizes; Q5_K stays float.

K-quant rows need in_features % 256 == 0, hence the wider tiny model (hidden 256, intermediate 512).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import leanformer as lf
from leanformer.compress import Int4Linear, Int8Linear, qbase
from leanformer.compress.gguf_quant import _int4
from leanformer.compress.kernels import int4_dequant
from leanformer.compress.layout import QuantEmbedding
from leanformer.formats.gguf import CODE_OFFSET, GGUFTensor, unpack_blocks
from tests.formats.kquants import write_kquant_gguf
from tests.formats.test_gguf import tiny_config
from tests.formats.tiny_gguf import hf_llama_state_dict

Q = gguf.GGMLQuantizationType
BLOCK = {"Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32)}
BLOCK |= {"Q4_K": (144, 256), "Q6_K": (210, 256)}
F16_AT = {"Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets of fp16 d / m / dmin

# name -> (tied, {HF-name substring: type}, {our module: (class, group)} expected; None = float Linear)
CASES = {
    # llama.cpp's Q4_K_M mix: v and down Q6_K, the rest Q4_K; the tied table Q6_K. q|k (int4) and
    # v (int8) cannot share one fused module, so qkv_proj is float
    "q4_k_m": (
        True,
        {"v_proj": Q.Q6_K, "down": Q.Q6_K, "embed": Q.Q6_K, "": Q.Q4_K},
        {
            "self_attn.qkv_proj": None,
            "self_attn.o_proj": (Int4Linear, 32),
            "mlp.gate_up_proj": (Int4Linear, 32),
            "mlp.down_proj": (Int8Linear, 16),
            "lm_head": (Int8Linear, 16),
        },
    ),
    # narrow-row fallbacks fused with a K-type: q Q5_0 + k Q8_0 + v Q6_K -> int8 group 16; untied
    # Q4_K table with its own Q6_K head
    "fallbacks": (
        False,
        {
            "q_proj": Q.Q5_0,
            "k_proj": Q.Q8_0,
            "v_proj": Q.Q6_K,
            "o_proj": Q.Q6_K,
            "lm_head": Q.Q6_K,
            "": Q.Q4_K,
        },
        {
            "self_attn.qkv_proj": (Int8Linear, 16),
            "self_attn.o_proj": (Int8Linear, 16),
            "mlp.gate_up_proj": (Int4Linear, 32),
            "mlp.down_proj": (Int4Linear, 32),
            "lm_head": (Int8Linear, 16),
            "model.embed_tokens.table": (Int4Linear, 32),
        },
    ),
    # Q5_K (5-bit codes with a zero point) has no exact int form: dequantized, with a warning
    "q5_k": (
        True,
        {"down": Q.Q5_K, "embed": Q.Q8_0, "": Q.Q4_K},
        {"mlp.down_proj": None, "mlp.gate_up_proj": (Int4Linear, 32), "lm_head": (Int8Linear, 32)},
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case name, keep_quantized model, float model) for one CASES entry."""
    tied, qtypes, _ = CASES[request.param]
    cfg = tiny_config(hidden_size=256, intermediate_size=512, tie_word_embeddings=tied)
    path = tmp_path_factory.mktemp("kquant") / f"{request.param}.gguf"
    write_kquant_gguf(path, cfg, hf_llama_state_dict(cfg, seed=5), qtypes)
    if request.param == "q5_k":
        with pytest.warns(UserWarning, match="Q5_K"):
            q, _ = lf.load(path, keep_quantized=True)
    else:
        q, _ = lf.load(path, keep_quantized=True)
    f, _ = lf.load(path, keep_quantized=False)
    return request.param, q, f


@pytest.fixture
def fp32_prefill(monkeypatch):
    """The weights' own math in prefill: fp32 GEMMs on fp32 activations (not bf16, not the int8 GEMM)."""
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    monkeypatch.setattr(qbase.QuantLinear, "prefill_activations", "fp32")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_modules_are_int_and_bit_exact(pair):
    name, q, f = pair
    tied = CASES[name][0]
    float_weights = dict(f.named_parameters())
    for suffix, want in CASES[name][2].items():
        top = suffix.startswith(("lm_head", "model."))
        paths = [suffix] if top else [f"model.layers.{i}.{suffix}" for i in range(2)]
        for path in paths:
            m = q.get_submodule(path)
            if want is None:
                assert isinstance(m, torch.nn.Linear) and not isinstance(m, qbase.QuantLinear), path
                continue
            assert type(m) is want[0] and m.group_size == want[1], (path, m)
            key = path.replace(".table", "") + ".weight"
            key = "model.embed_tokens.weight" if path == "lm_head" and tied else key
            assert torch.equal(m.dequantize(), float_weights[key]), path  # bit-exact
    emb = q.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.tied == tied
    assert torch.equal(emb(torch.arange(9)), f.model.embed_tokens.weight[:9])
    floats = sum(p.numel() for n, p in q.named_parameters() if "qkv" not in n and "down" not in n)
    assert floats == 5 * 256  # besides the float modules the cases name: the 2 x 2 + 1 norms


def test_logits_match_float_load(pair, fp32_prefill):
    """Prefill (dequantize + GEMM) and decode-sized calls (GEMV kernels, incl. int8 group 16)."""
    _, q, f = pair
    ids = torch.randint(3, 290, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(q(ids), f(ids)) < 1e-5
        assert rel(q(ids[:1, :3]), f(ids[:1, :3])) < 1e-5


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> GGUFTensor:
    """Any byte pattern is a valid block; only the fp16 scales are set to finite values."""
    size, width = BLOCK[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // width * size), dtype=np.uint8)
    blocks = data.reshape(rows, -1, size)
    for at in F16_AT.get(kind, (0,)):
        d = rng.uniform(-0.1, 0.1, blocks.shape[:2]).astype(np.float16)
        blocks[..., at : at + 2] = d[..., None].view(np.uint8)
    return GGUFTensor("w", kind, (rows, cols), data)


def reference(t: GGUFTensor) -> np.ndarray:
    values = gguf.quants.dequantize(t.data, Q[t.ggml_type])
    return np.asarray(values, np.float32).reshape(t.shape)


@pytest.mark.parametrize("kind", sorted(BLOCK))
def test_unpack_blocks_bit_exact_on_random_bytes(kind):
    t = random_blocks(kind, 8, 512, seed=len(kind))
    b = unpack_blocks(t)
    width = 512 // b["scale"].shape[1]
    assert width == (16 if kind == "Q6_K" else 32)
    w = np.repeat(b["scale"].astype(np.float32), width, 1) * (b["q"].astype(np.float32) - CODE_OFFSET[kind])
    if "min" in b:
        w = w + np.repeat(b["min"].astype(np.float32), width, 1)
    assert np.array_equal(w, reference(t))


def test_q4_k_zero_rounding_bound():
    """zero = 8 d sc - dmin m is rounded to fp32 once. With d and dmin drawn independently over a wide
    range it is sometimes inexact; the error then stays within one rounding of zero's terms."""
    t = random_blocks("Q4_K", 64, 2048, seed=1)
    codes, scales, zeros = _int4(t)
    ours, ref = int4_dequant(codes, scales, zeros, 32), torch.from_numpy(reference(t))
    b = unpack_blocks(t)
    terms = np.repeat(8 * np.abs(b["scale"]) + np.abs(b["min"]), 32, 1)  # |8 d sc| + |dmin m|
    eps = torch.finfo(torch.float32).eps
    err = (ours - ref).abs()
    assert bool((err <= eps * (ref.abs() + torch.from_numpy(terms))).all())
    assert float((err == 0).float().mean()) > 0.99  # exact for all but a few ill-scaled sub-blocks
