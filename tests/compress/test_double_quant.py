"""8-bit coding of int4 group scales/zeros: bounded relative error, exact decode of what was chosen."""

from __future__ import annotations

import torch

from leanformer.compress import double_quant as DQ


def _params(n: int = 64, g: int = 18, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.rand(n, g, generator=gen) * 4.6 - 2.3) * 1e-2  # 100x spread, as in real tensors
    zeros = (torch.rand(n, g, generator=gen) * 15 - 7) * scales
    return scales, zeros


def test_codes_are_bytes_and_decode_is_deterministic():
    scales, zeros = _params()
    sc, zc, ranges = DQ.encode(scales, zeros)
    assert sc.dtype == zc.dtype == torch.uint8 and sc.shape == zc.shape == scales.shape
    assert ranges.dtype == torch.float32 and ranges.shape == (4,)
    s1, z1 = DQ.decode(sc, zc, ranges)
    s2, z2 = DQ.round_trip(scales, zeros)
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_relative_scale_error_and_zero_error_in_steps():
    scales, zeros = _params()
    s, z = DQ.round_trip(scales, zeros)
    spread = float((scales.max() / scales.min()).log())
    max_rel = spread / DQ.SCALE_LEVELS / 2 * 1.01  # half a log-step
    assert float(((s / scales) - 1).abs().max()) <= max_rel
    offsets = zeros / scales
    step = float(offsets.max() - offsets.min()) / DQ.SCALE_LEVELS
    # zero error, in units of the group's own quantization step: half a code + the scale's rounding
    err = ((z - zeros) / scales).abs()
    assert float(err.max()) <= step / 2 + float(offsets.abs().max()) * max_rel + 1e-6


def test_degenerate_group_does_not_ruin_the_others():
    scales, zeros = _params()
    scales[0, 0] = 0.0  # a group of identical weights
    s, _ = DQ.round_trip(scales, zeros)
    rel = ((s / scales) - 1)[scales > 0].abs().max()
    assert float(rel) < 0.03
    assert torch.isfinite(s).all()


def test_int4_dq8_module_saves_codes_and_reloads_exactly(tiny_dirs, tmp_path, err):
    import leanformer as lf
    from leanformer.compress import Int4Linear, Int4WeightOnly, quantize_

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref_model, _ = lf.load(tiny_dirs["llama"])
    plain, _ = lf.load(tiny_dirs["llama"])
    coded, _ = lf.load(tiny_dirs["llama"])
    quantize_(plain, Int4WeightOnly(group_size=32), progress=False)
    quantize_(coded, Int4WeightOnly(group_size=32, scale_bits=8), progress=False)
    with torch.no_grad():
        ref, out_plain, out = ref_model(ids), plain(ids), coded(ids)
    # 8-bit scale/zero codes cost little accuracy next to bf16 ones
    assert err(out, ref) < 1.5 * err(out_plain, ref) + 1e-3
    layer = coded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, Int4Linear) and layer.scale_bits == 8
    keys = [k for k in coded.state_dict() if k.startswith("model.layers.0.mlp.down_proj.")]
    assert sorted(k.rsplit(".", 1)[1] for k in keys) == [
        "qweight",
        "scale_codes",
        "scale_ranges",
        "zero_codes",
    ]
    lf.save(plain, None, tmp_path / "plain")
    lf.save(coded, None, tmp_path / "coded")
    again, _ = lf.load(tmp_path / "coded")
    with torch.no_grad():
        assert torch.equal(again(ids), out)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "coded") < size(tmp_path / "plain")
