"""Int8Linear / Int4Linear compute paths: the GEMV kernel (decode-sized inputs), chunked dequantize +
F.linear (prefill; fp32 or bf16), and the torch fallback with kernels disabled, all against the
dequantized weight in fp32; plus state-dict formats, dtype casts and the quantized embedding."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import leanformer.kernels as lk
from leanformer.compress import Int4Linear, Int8DynamicLinear, Int8Linear, qbase
from leanformer.compress.layout import QuantEmbedding

needs_kernels = pytest.mark.skipif(not lk.available(), reason="GEMV kernels unavailable on this machine")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make(kind: str, n: int, k: int, bias: bool, awq: bool, seed: int = 0) -> nn.Module:
    """A module with random codes, scales and zeros (not from a float weight: any values must work)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1 + 0.02)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    if kind == "int8":
        m = Int8Linear.from_linear(lin)
    elif kind == "int8-g32":  # GGUF Q8_0's form: fp16 scales per 32 columns
        m = Int8Linear(k, n, bias, group_size=32)
        m.weight_int8.copy_(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
        m.scales.copy_((torch.rand(m.scales.shape, generator=g) * 0.01 + 1e-3).half().float())
        if bias:
            m.bias.data.copy_(lin.bias)
    else:
        group = int(kind.split("g")[1])
        m = Int4Linear.from_linear(lin, group)
        m.set_params(m.scales, m.zeros + torch.randn(m.zeros.shape, generator=g) * 1e-3)  # not bf16 values
    if awq:
        m.set_input_scale(torch.rand(k, generator=g) + 0.5)
    return m.eval()


def reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp64 product with the module's effective weight (input scale folded in)."""
    y = x.double().reshape(-1, m.in_features) @ m.dequantize().double().t()
    if m.bias is not None:
        y = y + m.bias.double()
    return y.reshape(*x.shape[:-1], m.out_features)


KINDS = ["int8", "int8-g32", "int4-g32", "int4-g64"]
SHAPES = [(37, 64, False, False), (48, 96, True, False), (33, 80, True, True), (130, 576, False, True)]


def _count_kernel_calls(m: nn.Module, monkeypatch) -> list[int]:
    calls = [0]
    original = m._kernel

    def spy(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(m, "_kernel", spy)
    return calls


@needs_kernels
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k,bias,awq", SHAPES)
def test_kernel_path_is_exact(kind, n, k, bias, awq, monkeypatch):
    """Decode-sized calls (1..16 rows) run the GEMV kernel and match fp32 math to summation order. Odd
    N, K off the group size (80 with groups of 64 or 32: padded / partial groups), bias, AWQ scale."""
    m = make(kind, n, k, bias, awq)
    calls = _count_kernel_calls(m, monkeypatch)
    with torch.no_grad():
        for rows in (1, 3, 16):
            x = torch.randn(rows, k)
            assert rel(m(x), reference(m, x)) < 1e-5, rows
        x = torch.randn(2, 4, k)  # leading dims: 8 rows
        y = m(x)
    assert y.shape == (2, 4, n) and rel(y, reference(m, x)) < 1e-5
    assert calls[0] == 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k,bias,awq", SHAPES)
def test_prefill_path_fp32_and_bf16(kind, n, k, bias, awq, monkeypatch):
    """More rows than the kernel takes, fp32 activations: chunked dequantize + F.linear, fp32 (exact to
    rounding) or bf16 (where the CPU has native bf16; bf16 accuracy). Small chunks force several of them.
    (int8 activations: tests/kernels/test_gemm_q4_i8.py.)"""
    m = make(kind, n, k, bias, awq)
    m.prefill_activations = "fp32"
    calls = _count_kernel_calls(m, monkeypatch)
    monkeypatch.setattr(qbase, "CHUNK_ELEMS", 16 * k)  # 16 rows per chunk
    x = torch.randn(40, k)
    with torch.no_grad():
        monkeypatch.setattr(qbase, "PREFILL_BF16", False)
        assert rel(m(x), reference(m, x)) < 1e-5
        monkeypatch.setattr(qbase, "PREFILL_BF16", True)
        assert rel(m(x), reference(m, x)) < 2e-2
    assert calls[0] == 0


def test_int4_made_under_inference_mode_runs_its_prefill_outside_it():
    """An Int4Linear built under inference_mode holds inference tensors, which have no version counter: its
    int8 prefill GEMM's zero-point check (Int4Linear._nonzero) takes them as unchanged."""
    with torch.inference_mode():
        m = Int4Linear.from_linear(nn.Linear(64, 16), 32)
    assert m.zeros.is_inference()
    x = torch.randn(40, 64)
    with torch.no_grad():
        assert rel(m(x), reference(m, x)) < 2e-2  # int8 activations where the kernels run, else exact


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_disabled_fall_back(kind, monkeypatch):
    monkeypatch.setattr(lk, "available", lambda: False)
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    m = make(kind, 48, 96, True, True)
    calls = _count_kernel_calls(m, monkeypatch)
    with torch.no_grad():
        for rows in (1, 5, 40):
            x = torch.randn(rows, 96)
            assert rel(m(x), reference(m, x)) < 1e-5
    assert calls[0] == 0


def test_autograd_uses_torch_path(monkeypatch):
    monkeypatch.setattr(qbase, "PREFILL_BF16", False)
    m = make("int4-g32", 24, 64, True, False)
    x = torch.randn(2, 64, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand(2, -1), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_and_compact_dtypes(kind):
    m = make(kind, 48, 96, True, True)
    sd = m.state_dict()
    want = torch.float16 if kind == "int8-g32" else torch.bfloat16  # RTN scales are bf16 values
    assert sd["scales"].dtype == want
    if kind.startswith("int4"):
        assert sd["zeros"].dtype == torch.float32  # perturbed above: neither bf16 nor fp16 values
        assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (48, m.k_padded // 2)
    assert sd["input_scale"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = make(kind, 48, 96, True, True, seed=7)
    fresh.load_state_dict(torch.load(buf))
    # fp32 in memory, or fp16 where that holds them at group 32 (QuantLinear.compact_scales, after loads)
    assert fresh.scales.dtype == (torch.float16 if kind in ("int4-g32", "int8-g32") else torch.float32)
    assert torch.equal(fresh.scales.float(), m.scales.float())
    if kind.startswith("int4"):
        assert fresh.zeros.dtype == m.zeros.dtype == torch.float32  # not fp16 values either
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
        assert torch.equal(fresh.dequantize(), m.dequantize())


def test_old_format_bf16_scales_load():
    """Saves from before (bf16 scales/zeros tensors) load into the fp32 buffers unchanged."""
    m = make("int4-g32", 32, 64, False, False)
    sd = {k: (v.to(torch.bfloat16) if k in ("scales", "zeros") else v) for k, v in m.state_dict().items()}
    sd["zeros"] = m.zeros.to(torch.bfloat16)
    with torch.device("meta"):
        fresh = Int4Linear(64, 32, 32)
    fresh.load_state_dict(sd, assign=True)
    # bf16 values, which fp16 holds: kept as fp16 at group 32 (compact_scales), exact
    assert fresh.scales.dtype == fresh.zeros.dtype == torch.float16
    assert torch.equal(fresh.zeros, sd["zeros"].float()) and torch.equal(
        fresh.scales.float(), sd["scales"].float()
    )


def test_misaligned_codes_are_realigned_on_load():
    """safetensors hands out tensors at 8-byte offsets; modules keep aligned, contiguous codes."""
    m = make("int8", 16, 64, False, False)
    backing = torch.empty(16 * 64 + 64, dtype=torch.int8)
    start = next(i for i in range(64) if (backing.data_ptr() + i) % 64 == 8)
    w = backing[start : start + 16 * 64].view(16, 64)
    w.copy_(m.weight_int8)
    assert w.data_ptr() % 64 == 8
    with torch.device("meta"):
        fresh = Int8Linear(64, 16)
    fresh.load_state_dict({"weight_int8": w, "scales": m.scales.to(torch.bfloat16)}, assign=True)
    assert fresh.weight_int8.data_ptr() % 64 == 0 and fresh.weight_int8.is_contiguous()
    x = torch.randn(40, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_model_cast_keeps_scales_exact():
    m = make("int8-g32", 40, 64, True, True)
    scales, inp = m.scales.clone(), m.input_scale.clone()
    m.to(torch.bfloat16)
    assert m.scales.dtype == m.input_scale.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    assert torch.equal(m.scales, scales) and torch.equal(m.input_scale, inp)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert (
            m(x).dtype == torch.bfloat16
            and m(torch.randn(30, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
        )


def test_int8_dynamic_decode_uses_weight_only_path(monkeypatch):
    lin = nn.Linear(64, 24)
    m = Int8DynamicLinear.from_linear(lin, min_tokens=4).eval()
    calls = _count_kernel_calls(m, monkeypatch)
    x = torch.randn(2, 64)
    ref = x @ (m.weight_int8.float() * m.scales[:, None]).t() + m.bias
    with torch.no_grad():
        assert rel(m(x), ref) < 1e-5
    assert calls[0] == (1 if lk.available() else 0)


@pytest.mark.parametrize("kind", ["int8", "int8-g32", "int4-g32"])
@pytest.mark.parametrize("tied", [True, False])
def test_quant_embedding(kind, tied):
    table = make(kind, 50, 64, False, False)
    emb = QuantEmbedding(table, tied=tied)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    assert torch.equal(out, table.dequantize()[ids])
    assert ("table.scales" in emb.state_dict()) is not tied  # tied: the head's state holds it
    emb.to(torch.bfloat16)
    assert emb(ids).dtype == torch.bfloat16
