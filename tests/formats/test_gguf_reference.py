"""Our reading of the real SmolLM2 Q4_1 GGUF against transformers' own GGUF utilities, in the default run.

test_gguf.py's check against transformers' full GGUF loader needs `accelerate` and is slow, so it never
runs; without this file the real file's tensors were checked only through a perplexity figure. Here a
subset of tensors (embedding, first and last layer) is read the way transformers' `load_gguf_checkpoint`
reads it — its tensor-name map, `gguf.dequantize`, and its own inverse of llama.cpp's q/k row
permutation — and compared with `read_gguf_raw` dequantized, and with the int4/int8 block codes
`unpack_blocks` hands to `--keep-quantized` modules.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from leanformer.formats import gguf as ours
from leanformer.formats.gguf import read_gguf_raw, unpack_blocks


@pytest.fixture(scope="module")
def reader(smollm2):
    return gguf.GGUFReader(smollm2, "r")  # parsing the 49k-token vocabulary takes ~3 s: do it once


def _field(reader, key: str):
    return reader.fields[key].contents()


def _transformers_tensors(reader, wanted_layers: list[int]) -> dict[str, torch.Tensor]:
    """HF name → float32 tensor, by transformers' GGUF code path (no accelerate needed for these parts)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    heads, kv = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    cfg = LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=_field(reader, "llama.embedding_length"),
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )
    # the name map as get_gguf_hf_weights_map builds it (which recurses into every submodule: 10 s)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    with torch.device("meta"):  # only its parameter names are needed
        hf_names = list(LlamaForCausalLM(cfg).state_dict())
    names = {}
    for hf_name in hf_names:
        base, suffix = hf_name.rsplit(".", 1)
        if (gguf_name := name_map.get_name(base)) is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": heads, "num_key_value_heads": kv})
    out = {}
    for t in reader.tensors:
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        if (
            layer is None
            and t.name != "token_embd.weight"
            or layer is not None
            and layer not in wanted_layers
        ):
            continue
        weights = processor.process(weights=gguf.dequantize(t.data, t.tensor_type), name=t.name).weights
        out[names[t.name]] = torch.from_numpy(np.array(weights, dtype=np.float32))
    return out


def test_smollm2_index_equals_the_gguf_reader(smollm2, reader):
    """formats/gguf_index.py (our one-pass parse) reads every metadata value and every tensor view the
    way gguf.GGUFReader does, on the real file (its 49k-token vocabulary and merges included)."""
    index = ours.GGUFIndex(smollm2)
    assert list(index.fields) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in index.fields.items():
        assert field == reader.fields[key].contents(), key
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for a, b in zip(index.tensors, reader.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.shape, b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_smollm2_tensors_match_transformers_gguf_reading(smollm2, reader):
    config, raw = read_gguf_raw(smollm2)
    last = config["num_hidden_layers"] - 1
    want = _transformers_tensors(reader, [0, last])
    assert len(want) == 1 + 2 * 9  # embedding; per layer q, k, v, o, gate, up, down and two norms
    kinds = {raw[name].ggml_type for name in want}
    assert {"Q4_1", "Q8_0", "F32"} <= kinds  # the int4 layers, the int8 embedding, the norms
    for name, ref in want.items():
        t = raw[name]
        got = t.dequantize()
        assert got.shape == ref.shape and torch.equal(got, ref), name
        if t.ggml_type in ("Q4_1", "Q8_0"):  # the codes --keep-quantized builds int modules from
            parts = unpack_blocks(t)
            scale = np.repeat(parts["scale"].astype(np.float32), 32, axis=1)
            if t.ggml_type == "Q8_0":
                values = scale * parts["q"].astype(np.float32)
            else:
                values = scale * parts["q"] + np.repeat(parts["min"].astype(np.float32), 32, axis=1)
            assert np.allclose(values, ref.numpy(), rtol=0, atol=1e-6 * float(ref.abs().max())), name
    q = want["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (config["num_attention_heads"] * 64, config["hidden_size"])
    # the permutation is not the identity here, so the comparison above could tell a wrong one apart
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert not torch.equal(torch.from_numpy(np.array(gguf.dequantize(stored.data, stored.tensor_type))), q)
