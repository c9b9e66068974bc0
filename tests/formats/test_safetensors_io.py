"""formats/safetensors_io: same tensors as safetensors' own reader, aligned, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanformer.formats.safetensors_io import SafetensorsFormatError, read_safetensors


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 9, generator=g).bfloat16(),
        "f16": torch.randn(4, generator=g).half(),
        "i8": torch.randint(-128, 127, (3, 11), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_matches_safetensors_and_is_aligned(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(sample(), path, metadata={"format": "pt"})
    ours, ref = read_safetensors(path), load_file(path)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape and torch.equal(ours[name], t)
        if ours[name].numel():
            assert ours[name].data_ptr() % 64 == 0  # torch's CPU allocator: fresh, aligned storage


@pytest.mark.parametrize("cut", [4, 40, -3])
def test_truncated_file_is_an_error(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    save_file(sample(), path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(SafetensorsFormatError):
        read_safetensors(path)
