"""TensorSource.rows (formats/lazy.py): a slice or sorted indices of a tensor's rows read from the file,
equal to the same rows of the whole tensor, for safetensors, GGUF (block-quantized rows) and memory."""

from __future__ import annotations

import gguf
import torch
from safetensors.torch import save_file

from leanformer.formats.gguf import read_gguf_raw
from leanformer.formats.lazy import GGUFSource, MemorySource, SafetensorsSource
from tests.formats.test_gguf import tiny_config
from tests.formats.tiny_gguf import hf_llama_state_dict, write_gguf

Q = gguf.GGMLQuantizationType
PICKS = [slice(3, 11), slice(0, 1), slice(90, 200), torch.tensor([0, 1, 2, 7, 8, 40, 95])]


def check(source, name: str) -> None:
    parts = [source.rows(name, which) for which in PICKS]  # first: MemorySource.get hands over
    whole = source.get(name)
    for which, part in zip(PICKS, parts):
        assert torch.equal(part, whole[which]), which


def test_safetensors_rows(tmp_path):
    tensors = {"a": torch.randn(96, 5).to(torch.bfloat16), "b": torch.randn(96, 3, 2)}
    save_file(tensors, tmp_path / "m.safetensors")
    src = SafetensorsSource([tmp_path / "m.safetensors"])
    for name in tensors:
        check(src, name)
    assert src.rows("a", torch.tensor([4, 5, 6])).dtype == torch.bfloat16  # the file's dtype, 2 bytes


def test_gguf_and_memory_rows(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)  # vocab rows: the table streaming reads in slices
    path = tmp_path / "t.gguf"
    qtypes = {"embed": Q.Q8_0, "mlp": Q.Q4_1, "self_attn": Q.Q4_0}
    write_gguf(path, cfg, hf_llama_state_dict(cfg, seed=1), qtypes=qtypes)
    _, raw = read_gguf_raw(path)
    src = GGUFSource(raw)
    check(src, "model.embed_tokens.weight")
    check(src, "model.layers.0.mlp.gate_proj.weight")  # Q4_1 blocks, 96 rows
    mem = MemorySource({"t": torch.randn(96, 4)})
    check(mem, "t")
