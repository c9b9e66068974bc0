"""pytorch_model.bin as a lazy tensor source (formats/lazy.py TorchBinSource): a memory map of the zip
pickle, tensors copied out one at a time in the file's dtype; streamed compression from a bf16 .bin,
one file or sharded with an index, equals compressing the whole model; a legacy pickle is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import leanformer as lf
from leanformer.compress import apply
from leanformer.compress.quant import Int4WeightOnly, Int8WeightOnly
from leanformer.errors import LeanformerError
from leanformer.formats.lazy import TorchBinSource, open_source
from tests.formats.test_lazy_rows import check

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = [Int4WeightOnly(group_size=32), Int8WeightOnly(targets=["lm_head"], ignore=[])]


def _bin_folder(src, dst, shards: int):
    """The tiny HF folder's weights as bf16 pytorch_model.bin (with an index when sharded)."""
    dst.mkdir()
    state = {n: t.to(torch.bfloat16) for n, t in load_file(src / "model.safetensors").items()}
    (dst / "config.json").write_text((src / "config.json").read_text())
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    files = {f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin": names[i::shards] for i in range(shards)}
    for f, ns in files.items():
        torch.save({n: state[n] for n in ns}, dst / f)
    index = {"weight_map": {n: f for f, ns in files.items() for n in ns}}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return dst


def test_bin_source_reads_rows_and_tensors_in_file_dtype(tmp_path):
    tensors = {"a": torch.randn(96, 5).to(torch.bfloat16), "b": torch.randn(96, 3, 2)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    src = TorchBinSource([tmp_path / "pytorch_model.bin"])
    for name in tensors:
        check(src, name)
    assert src.get("a").dtype == torch.bfloat16  # 2 bytes until its layer is processed
    src.get("a").zero_()  # a copy: the map (and the file) is never written
    src.release()  # the pages read leave the resident set; reading again faults them back in
    assert torch.equal(src.get("a"), tensors["a"])


@pytest.mark.parametrize("shards", [1, 2])
def test_bf16_bin_streams_exactly(tiny_dirs, tmp_path, shards):
    folder = _bin_folder(tiny_dirs["qwen2"], tmp_path / "bin", shards)
    lazy, _ = lf.load(folder, lazy=True)
    assert isinstance(lazy.lazy.source, TorchBinSource)
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    apply(lazy, RECIPE, progress=False)
    whole, _ = lf.load(folder)
    apply(whole, RECIPE, progress=False)
    sa, sb = whole.state_dict(), lazy.state_dict()
    assert sa.keys() == sb.keys() and [n for n in sa if not torch.equal(sa[n], sb[n])] == []
    ids = torch.randint(0, whole.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole(ids), lazy(ids))


def test_legacy_and_hostile_bins_fail_in_one_line(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    torch.save({"a": torch.zeros(2)}, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{}")
    (garbage / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    for folder, words in ((legacy, "legacy.*--in-memory"), (garbage, "corrupt or truncated")):
        with pytest.raises(LeanformerError, match=words) as e:
            open_source(folder)
        assert "\n" not in str(e.value)


def test_what_cannot_stream_names_itself(tiny_dirs, tmp_path):
    """Issue #12 item 4: every format / architecture the layer walk cannot serve fails before any read
    in one line naming it and the way out (--in-memory)."""
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    BertModel(cfg).save_pretrained(bert)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    for folder, words in (
        (bert, "Llama family.*GPT-2, not bert.*--in-memory"),  # GPT-2 streams (tests/compress/test_stream.py)
        (empty, "no weights in .*pytorch_model.bin"),
        (tmp_path / "model.onnx", "not found|cannot stream"),
    ):
        with pytest.raises(LeanformerError, match=words) as e:
            lf.load(folder, lazy=True)
        assert "\n" not in str(e.value)
