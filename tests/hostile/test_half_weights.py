"""Hostile input to the 16-bit weight paths (compress/half.py, GGUF F16 / BF16, fp16-held scales): one-line
errors or warnings, never a silent inf, a traceback or a half-done swap."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.compress import BF16WeightOnly, F16WeightOnly, Int4Linear, Int8Linear, quantize_
from leanformer.errors import LeanformerError
from tests.formats.test_gguf import tiny_config
from tests.formats.tiny_gguf import hf_llama_state_dict, write_gguf


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)


def test_f16_refuses_weights_beyond_its_range():
    m = Two()
    with torch.no_grad():
        m.b.weight[0, 0] = 1e6  # fp16's largest finite value is 65504
    with pytest.raises(LeanformerError, match=r"F16WeightOnly on b: .*\|w\| = 1e\+06.*BF16WeightOnly") as e:
        quantize_(m, F16WeightOnly(ignore=[]), progress=False)
    assert "\n" not in str(e.value)
    quantize_(m, BF16WeightOnly(ignore=[]), progress=False)  # bf16 has fp32's range
    assert float(m.b.weight_bf16[0, 0]) == pytest.approx(1e6, rel=1e-2)


def test_non_finite_weights_are_kept_and_not_called_out_of_range():
    """Already non-finite weights (a corrupt file warns on load) are carried over as they are."""
    m = Two()
    with torch.no_grad():
        m.a.weight[0, 0] = float("nan")
    quantize_(m, F16WeightOnly(ignore=[]), progress=False)
    assert torch.isnan(m.a.weight_f16[0, 0])


@pytest.mark.parametrize("config", [BF16WeightOnly, F16WeightOnly])
def test_bad_config_fields_are_one_line(config):
    with pytest.raises(LeanformerError, match="list of patterns"):
        quantize_(Two(), config(targets="*"), progress=False)
    with pytest.raises(LeanformerError, match="no nn.Linear matches"):
        quantize_(Two(), config(targets=["nothing"]), progress=False)


@pytest.mark.parametrize(
    "qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16], ids=["F16", "BF16"]
)
def test_nan_in_a_16_bit_gguf_warns_on_load(tmp_path, qtype):
    cfg = tiny_config()
    sd = hf_llama_state_dict(cfg, seed=1)
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.gguf"
    write_gguf(path, cfg, sd, qtypes={"": qtype})
    with pytest.warns(UserWarning, match=r"hold NaN or infinite"):
        lf.load(path)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # gguf's writer
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_nan_block_scale_warns_and_stays_fp32(tmp_path, qtype):
    """A NaN weight makes its block's scale NaN: the load warns in one line, and that matrix keeps fp32
    scales (fp16 would hold the NaN, but compact_scales only takes values it compares equal), the others
    fp16; nothing crashes."""
    cfg = tiny_config()
    sd = hf_llama_state_dict(cfg, seed=1)
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.gguf"
    write_gguf(path, cfg, sd, qtypes={"": gguf.GGMLQuantizationType[qtype]})
    with pytest.warns(UserWarning, match=r"hold NaN or infinite"):
        model, _ = lf.load(path)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, (Int4Linear, Int8Linear)) and down.scales.dtype == torch.float32
    assert model.model.layers[1].mlp.down_proj.scales.dtype == torch.float16
    with torch.no_grad():
        model(torch.tensor([[3, 14, 15]]))  # runs (NaN logits: what the file holds)


def test_paired_bench_refuses_a_missing_isa_in_one_line(monkeypatch):
    from leanformer import kernels
    from leanformer.measure.bench import paired

    def missing(name):
        raise ValueError(f"instruction set {name!r} unavailable here (have: ['avx2'])")

    monkeypatch.setattr(kernels, "set_isa", missing)
    with pytest.raises(LeanformerError, match="'avx512' unavailable here"):
        paired.main(["smollm2", "--isa", "avx512"])
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        paired.main(["smollm2", "--isa", "sse2"])
