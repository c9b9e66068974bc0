"""The scaling model's arithmetic, and its measurement running end to end (one gloo rank, tiny steps)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from leanformer.distributed.scaling import measure, predict_step_s


def test_prediction_is_compute_share_plus_two_allreduces_per_layer():
    assert predict_step_s(10e-3, 2, 30, 50e-6) == pytest.approx(5e-3 + 3e-3)
    assert predict_step_s(10e-3, 1, 30, 0.0) == pytest.approx(10e-3)


def test_measure_runs_on_one_rank(shared, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        out = measure(str(shared / "models" / "stories260K" / "stories260K.bin"), steps=4, repeats=10)
    finally:
        dist.destroy_process_group()
    assert out["layers"] == 5 and out["hidden"] == 64 and out["ranks"] == 1
    assert out["allreduce_hidden_us"] > 0 and out["step_1proc_module_ms"] > 0 and out["step_tp1_ms"] > 0
    assert out["predicted_tp1_tok_s"] == pytest.approx(out["measured_1proc_module_tok_s"])
    expected = predict_step_s(out["step_1proc_module_ms"], 2, 5, 1e-3 * out["allreduce_hidden_us"])
    assert out["predicted_tp2_tok_s"] == pytest.approx(1e3 / expected)  # 4 KV heads: 1, 2, 4 predicted
    assert set(k for k in out if k.startswith("predicted")) == {f"predicted_tp{n}_tok_s" for n in (1, 2, 4)}
