"""Int4Linear with 8-bit scale codes (scale_bits=8) keeps only the codes (no fp32 [N, G] scales/zeros)
and computes bit for bit what the same module with the decoded fp32 scales/zeros computes, on every
path: GEMV kernel, chunked dequantize (prefill), torch fallback, fused decode step (fp32 and int8
activations)."""

from __future__ import annotations

import copy

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.compress import qbase
from leanformer.compress.int4 import Int4Linear
from leanformer.models.fused import set_decode_activations
from tests.models.test_fused import PROMPTS, decode_logits


def _coded(tiny_dirs):
    model, _ = lf.load(tiny_dirs["qwen2"])  # qkv bias: the bias pointer follows the decode chunks too
    lf.quantize_(model, lf.Int4WeightOnly(group_size=32, scale_bits=8), progress=False)
    return model


def _decoded_twin(model):
    """A copy whose coded Int4Linears are plain ones holding group_params() (the fp32 decoding)."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, Int4Linear) and m.scale_bits == 8:
            plain = Int4Linear(m.in_features, m.out_features, m.group_size, m.bias is not None)
            plain.qweight = m.qweight.clone()
            plain.scales, plain.zeros = (t.clone() for t in m.group_params())
            if m.bias is not None:
                plain.bias.data.copy_(m.bias.data)
            qbase.set_module(twin, name, plain)
    return twin


def test_coded_module_holds_no_fp32_group_scales(tiny_dirs):
    model = _coded(tiny_dirs)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, Int4Linear) and layer.scale_bits == 8
    names = {n for n, _ in layer.named_buffers()}
    assert names == {"qweight", "scale_codes", "zero_codes", "scale_ranges"}
    s, z = layer.group_params(slice(0, 3))
    assert s.shape == z.shape == (3, layer.scale_codes.shape[1]) and s.dtype == torch.float32


def test_torch_dequantize_equals_decoded_twin(tiny_dirs):
    """dequantize_rows is the torch fallback's weight (no kernels, CUDA aside) and the reference."""
    model = _coded(tiny_dirs)
    twin = _decoded_twin(model)
    a = model.get_submodule("model.layers.1.mlp.gate_up_proj")
    b = twin.get_submodule("model.layers.1.mlp.gate_up_proj")
    assert torch.equal(a.dequantize_rows(slice(None)), b.dequantize_rows(slice(None)))
    assert torch.equal(a.dequantize_rows(torch.tensor([5, 0, 7])), b.dequantize_rows(torch.tensor([5, 0, 7])))
    if kernels.available():  # the compiled dequantizer on codes: what it gives on the fp32 arrays
        for bf16 in (False, True):
            assert torch.equal(a._dequant_native(slice(2, 40), bf16), b._dequant_native(slice(2, 40), bf16))
        # and the torch formula's values up to the FMA the compiler may contract (q - 8) * s + z into
        torch.testing.assert_close(a._dequant_native(slice(2, 40), False), a.dequantize_rows(slice(2, 40)))


@pytest.mark.skipif(not kernels.available(), reason="leanformer kernels unavailable here")
@pytest.mark.parametrize("acts", ["fp32", "int8"])
def test_every_path_equals_decoded_twin(tiny_dirs, acts):
    model = _coded(tiny_dirs)
    twin = _decoded_twin(model)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.inference_mode():
        assert torch.equal(model(ids), twin(ids))  # prefill: chunked dequantize
        assert torch.equal(model(ids[:, :1]), twin(ids[:, :1]))  # one row: the GEMV kernel
    for m in (model, twin):
        set_decode_activations(m, acts)
    for fused in (False, True):
        assert torch.equal(decode_logits(model, fused, PROMPTS), decode_logits(twin, fused, PROMPTS))
    assert model._decode_plan.stack is not None, "the fused step did not run"
