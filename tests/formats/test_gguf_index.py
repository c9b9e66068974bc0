"""formats/gguf_index.py against gguf.GGUFReader on a file with every metadata value type and the
tensor types read as typed arrays or bytes; and its refusals."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from leanformer.formats.gguf_index import GGUFIndex


def _write(path, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "bc", "", "✓"])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.arange(8, dtype=np.float16).reshape(2, 4))
    w.add_tensor("i32", np.arange(5, dtype=np.int32))
    q8 = gguf.quants.quantize(
        np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_equals_the_gguf_reader(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    _write(path, alignment)
    ours, ref = GGUFIndex(path), gguf.GGUFReader(path)
    assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for key, value in ours.fields.items():
        assert value == ref.fields[key].contents(), key
    assert ours.fields["t.str"] == "héllo" and ours.fields["t.strs"] == ["a", "bc", "", "✓"]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.name, a.tensor_type) == (b.name, b.tensor_type) and np.array_equal(a.shape, b.shape)
        assert (
            a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
        )


def _patched(tmp_path, offset: int, data: bytes):
    path = tmp_path / "t.gguf"
    _write(path)
    blob = bytearray(path.read_bytes())
    blob[offset : offset + len(data)] = data
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize(
    ("offset", "data", "match"),
    [
        (0, b"GGUX", "magic"),
        (4, struct.pack("<I", 1), "version 1"),
        (24, struct.pack("<Q", 10**9), "past the end"),  # the first key's length
    ],
)
def test_refuses_malformed_files(tmp_path, offset, data, match):
    with pytest.raises(ValueError, match=match):
        GGUFIndex(_patched(tmp_path, offset, data))


def test_a_truncated_file_fails_before_any_tensor_view(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="past the end"):
        GGUFIndex(path)
