"""`leanformer report`: the sweep's rows, the Pareto front, the Markdown + PNGs written atomically."""

from __future__ import annotations

import functools
import json

import pytest

from leanformer.errors import LeanformerError
from leanformer.measure import report, sweep
from leanformer.measure.bench import runner

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(name, dppl, speed, **extra):
    row = {"recipe": name, "ppl": 10 * (1 + dppl / 100), "delta_ppl_pct": dppl, "kld": dppl / 100 + 1e-4}
    row |= {"top1": 0.9, "decode_tok_s_b1": speed, "prefill_tok_s": 500.0, "peak_rss_mb": 300.0}
    return row | {"size_mb": 100.0 / speed, "ceiling_tok_s": 4 * speed} | extra


RESULTS = {
    "config": {"model": "/m/smollm2.gguf", "data": "wiki.test.raw", "max_chars": 20000, "window": 512,
               "batches": [1], "prompt_tokens": 128, "new_tokens": 64, "repeats": 3, "base_ppl": 10.0},
    "machine": {"cpu": {"model": "AMD EPYC", "flags": ["avx2"], "cores": 2}, "kernel_isa": "avx2"},
    "recipes": [_row("none", 0.0, 50.0), _row("int8", 0.3, 120.0), _row("slow-bad", 3.0, 60.0),
                _row("int4", 4.0, 180.0), {"recipe": "w8a8", "error": "boom"}],
    "peers": [{"engine": "llama.cpp", "label": "llama.cpp", "dtype": "Q4_0", "decode_tok_s_b1": 200.0,
               "prefill_tok_s": 900.0, "peak_rss_mb": 250.0, "size_mb": 90.0},
              {"engine": "ctranslate2", "label": "ctranslate2", "dtype": "float32", "error": "not installed"}],
}  # fmt: skip


def test_pareto_front():
    pts = [(50, 0.0), (120, 0.3), (60, 3.0), (180, 4.0), (float("nan"), 0.0), (120, 0.3)]
    assert sweep.pareto_front(pts) == [0, 1, 5, 3]  # (60, 3.0) is beaten by (120, 0.3); ties both stay
    assert sweep.pareto_front([]) == []


def test_write_report(tmp_path):
    out = tmp_path / "rep"
    md = report.write_report(RESULTS, out).read_text()
    for png in ("pareto_ppl.png", "pareto_kld.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert "| ★ int8 |" in md and "| slow-bad |" in md  # off the front: no star
    assert "| w8a8 | failed: boom |" in md and "not measured: not installed" in md
    assert "AMD EPYC" in md and "llama.cpp | Q4_0 | 200.0" in md
    assert json.loads((out / "results.json").read_text()) == RESULTS
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temp folder left beside it
    report.write_report(RESULTS, out)  # an earlier report is replaced
    assert report.is_report(out)


def test_report_dir_and_results_checks(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(LeanformerError, match="not a leanformer report"):
        report.check_report_dir(str(foreign), False, [])
    bad = tmp_path / "r.json"
    bad.write_text("[1, 2]")
    with pytest.raises(LeanformerError, match="not a report's results.json"):
        report.read_results(str(bad))
    with pytest.raises(LeanformerError, match="cannot read"):
        report.read_results(str(tmp_path / "missing.json"))


def test_run_sweep_on_real_weights(shared, monkeypatch):
    """stories260K (llama2.c, with its tokenizer): quality in this process, bench rows per recipe."""
    # in-process: the rows are the point here
    monkeypatch.setattr(runner, "contender", functools.partial(runner.contender, in_process=True))
    model = shared / "models" / "stories260K"
    data = shared / "data" / "tinystories" / "sample.txt"
    cfg = sweep.SweepConfig(str(model), str(data), ["none", "int8", "no-such-preset"][:2], 6000, 128)
    cfg.batches, cfg.prompt_tokens, cfg.new_tokens, cfg.repeats = [1], 8, 3, 1
    res = sweep.run_sweep(cfg, progress=False)
    none, int8 = res["recipes"]
    assert none["delta_ppl_pct"] == pytest.approx(0, abs=1e-6) and none["kld"] == pytest.approx(0, abs=1e-6)
    assert 0 < int8["kld"] < 0.05 and int8["size_mb"] < none["size_mb"] and int8["decode_tok_s_b1"] > 0
    assert res["config"]["eval_tokens"] >= 128 and res["machine"]["cpu"]["physical_cores"] >= 1
    with pytest.raises(LeanformerError, match="no-such-preset"):
        sweep.check_recipes(["int8", "no-such-preset"])


def test_calibrated_recipes_in_the_sweep_and_bench(shared, monkeypatch, tmp_path, capsys):
    """A calibrated recipe (Wanda, GPTQ) in a report / bench calibrates on --calibration text, in the
    quality pass and in the bench process alike (the same pruned weights: the same size); without the
    file the CLI refuses before any work."""
    from leanformer.cli.common import check_calibration
    from leanformer.cli.main import main
    from leanformer.compress import load_recipe

    monkeypatch.setattr(runner, "contender", functools.partial(runner.contender, in_process=True))
    model = shared / "models" / "stories260K"
    data = shared / "data" / "tinystories" / "sample.txt"
    cfg = sweep.SweepConfig(str(model), str(data), ["none", "wanda-50", "gptq-int8"], 6000, 128)
    cfg.batches, cfg.prompt_tokens, cfg.new_tokens, cfg.repeats = [1], 8, 3, 1
    cfg.calibration, cfg.calibration_samples, cfg.calibration_len = str(data), 4, 64
    none, wanda, gptq = sweep.run_sweep(cfg, progress=False)["recipes"]
    assert "error" not in wanda and "error" not in gptq
    assert wanda["kld"] > 0 and gptq["size_mb"] < none["size_mb"] and wanda["decode_tok_s_b1"] > 0
    with pytest.raises(LeanformerError, match=r"this recipe \(Wanda\) needs --calibration FILE"):
        check_calibration([load_recipe("wanda-50")], None)
    with pytest.raises(LeanformerError, match="--calibration file not found"):
        check_calibration([load_recipe("wanda-50")], str(tmp_path / "missing.txt"))
    for argv, needs in (
        (["bench", str(model), "--recipe", "none", "wanda-50", "--batch", "1"], "Wanda"),
        (
            ["report", str(model), "-o", str(tmp_path / "r"), "--recipes", "gptq-int8", "--data", str(data)],
            "GPTQ",
        ),
    ):
        assert main(argv) == 2
        assert f"error: this recipe ({needs}) needs --calibration FILE" in capsys.readouterr().err
