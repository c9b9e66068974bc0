"""The encoder benchmark (python -m leanformer.measure.bench.encoders) end to end on a tiny random BERT, --quick."""

from __future__ import annotations

import json

from leanformer.kernels.h16 import native_f16
from leanformer.measure.bench.encoders import main
from leanformer.measure.bench.encoders_engines import BF16, F16, FP32, INT8, ORT8, ORT32, ST, pruned_name
from tests.encoders.helpers import SENTENCES, tiny_encoder_dir


def test_bench_encoders_quick_has_int8_ort_int8_and_pruning_rows(tmp_path, capsys, monkeypatch):
    # the bf16 row is timed where the CPU computes bf16 natively: taken here on any CPU
    monkeypatch.setattr("leanformer.kernels.cpu.native_bf16", lambda: True)
    model = tiny_encoder_dir(tmp_path / "m", "BertModel", pooling=["mean"], normalize=True)
    tsv = tmp_path / "stsb.tsv"
    pairs = [(a, b, f"{(i * 7) % 6:.1f}") for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] * 3))]
    tsv.write_text("sentence1\tsentence2\tscore\n" + "".join("\t".join(p) + "\n" for p in pairs * 2))
    out = tmp_path / "bench.json"
    argv = [str(model), "--stsb", str(tsv), "--quick", "--prune", "0.5", "--lengths", "16,24"]
    argv += ["--calibration-count", "32"]
    assert main(argv + ["--chunks", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results, meta = report["results"], report["meta"]
    f16 = [F16] if native_f16() else []  # the fp16 row: CPUs with AVX512-FP16 only
    assert list(results) == [ST, FP32, BF16, *f16, INT8, ORT32, ORT8, pruned_name(0.5)]
    assert {w: v["tokens_per_text"] for w, v in meta["workloads"].items()} == {
        "stsb": None,
        "long16": 16,
        "long24": 24,
    }
    for r in results.values():
        for w in ("stsb", "long16", "long24"):
            assert r[f"{w}_sentences_per_s"] > 0 and r[f"{w}_vs_fp32"] > 0 and r[f"{w}_cpu_vs_fp32"] > 0
        assert abs(r["stsb_spearman_drop"]) <= 2
    assert results[FP32]["stsb_vs_fp32"] == 1.0 and results[FP32]["stsb_spearman_drop"] == 0
    assert results[ORT32]["cosine_min"] > 0.9999  # our export: the same math
    assert results[INT8]["cosine_min"] > 0.9  # int8 weights and activations on a random model
    assert 0.99 < results[BF16]["cosine_min"] < 1  # bf16 weights and activations: close, not the same
    if f16:
        assert 0.9999 < results[F16]["cosine_min"] < 1  # fp16 matmuls: closer still
    assert results[pruned_name(0.5)]["heads_pruned"] == 0.5
    assert sum(results[pruned_name(0.5)]["heads_per_layer"]) == 4  # of 2 layers × 4 heads
    checks = {(c["engine"], c["check"]) for c in report["targets"]}
    assert (INT8, "× fp32, STS-B") in checks and (INT8, "× ONNX Runtime int8, 16-tok") in checks
    assert (ORT8, "STS-B Spearman drop vs fp32") in checks and (
        INT8,
        "min cosine vs fp32, all workloads",
    ) in checks
    assert (pruned_name(0.5), "× unpruned, 24-tok") in checks
    for name in (FP32, BF16):  # issue #17: × sentence-transformers at its quality
        assert (name, "× ST, 24-tok") in checks and (name, "min cosine vs ST, all workloads") in checks
    text = capsys.readouterr().out
    assert "Issue targets" in text and "16-tok sent/s" in text and ORT8 in text
