"""How `leanformer bench` / `demo` / bench.paired turn timings into decode tok/s, and how bench names columns.

The figure once came out 2x too high in the demo: (median t_N − median t_1) / (N − 1) subtracts two
noisy whole-run times, so one slow warm-up moves it. Decode is now a median over timed steps.
"""

from __future__ import annotations

import functools

import pytest
import torch

import leanformer as lf
from leanformer.measure.bench import paired, runner
from leanformer.measure.bench.runner import BenchConfig, decode_rate, leanformer_decode_steps, measure

STEP = 0.010  # a 10 ms decode step: 100 tok/s at batch 1


def test_decode_rate_is_the_median_step_rate():
    steady = [[STEP] * 63 for _ in range(3)]
    assert decode_rate(steady, 1) == pytest.approx(100)
    assert decode_rate(steady, 8) == pytest.approx(800)  # every step makes one token per row


def test_decode_rate_shrugs_off_a_slow_run_and_stalls():
    slow_warmup = [STEP * 2.5] * 63  # a whole run at 2.5x (cold caches, another tenant)
    stalled = [STEP] * 60 + [5.0, 3.0, STEP]  # two steps stalled for seconds
    jittery = [STEP * (1 + 0.1 * ((i % 5) - 2) / 2) for i in range(63)]  # ±10% noise around STEP
    rate = decode_rate([slow_warmup, stalled, jittery], 1)
    assert rate == pytest.approx(100, rel=0.06)
    # a figure from whole-run times would have been 5x off on the same runs
    assert 3 * 63 / sum(map(sum, [slow_warmup, stalled, jittery])) < 20


def test_decode_rate_needs_steps():
    with pytest.raises(ValueError, match="no decode steps"):
        decode_rate([[], []], 1)


def test_leanformer_decode_steps_times_each_step(tiny_dirs):
    model, _ = lf.load(tiny_dirs["llama"])
    steps = leanformer_decode_steps(model, [[5, 6, 7], [8, 9, 10]], 9)
    assert len(steps) == 8 and all(0 < t < 5 for t in steps)  # the prefill (before token 1) is not one


def test_transformers_streamer_stamps_prompt_then_each_token():
    from tests.conftest import tiny_hf_model

    hf = tiny_hf_model("llama")
    stamps = runner._Stamps()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.inference_mode():
        hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
            do_sample=False, pad_token_id=0, streamer=stamps,
        )  # fmt: skip
    assert len(stamps.times) == 1 + 7  # so times[1:] holds one stamp per new token: 6 decode steps


def test_measure_reports_the_median_of_timed_steps(tiny_dirs, monkeypatch):
    """measure() must go through the per-step timings: feed it steps with a slow first run and a stall
    and the figure must be the steady rate (a whole-run scheme would report the real, unrelated speed)."""
    calls = []

    def fake_steps(model, prompts, new_tokens):
        calls.append(new_tokens)
        slow = len(calls) <= 2  # the warm-ups (batch 1 and 2)
        steps = [STEP * (3 if slow else 1)] * (new_tokens - 1)
        if len(calls) == 3:
            steps[3] = 2.0  # one stalled step in the first timed run
        return steps

    monkeypatch.setattr(runner, "leanformer_decode_steps", fake_steps)
    cfg = BenchConfig(str(tiny_dirs["llama"]), prompt_tokens=8, new_tokens=9, batches=[1, 2], repeats=2)
    out = measure(cfg, "leanformer")
    assert calls == [9] * 6  # warm-up + 2 rounds, per batch size
    assert out["decode_tok_s_b1"] == pytest.approx(100) and out["decode_tok_s_b2"] == pytest.approx(200)
    assert out["decode_step_ms_b1"] == pytest.approx(10)


def test_paired_uses_timed_steps(tiny_dirs, monkeypatch):
    monkeypatch.setattr(runner, "leanformer_decode_steps", lambda m, p, n: [STEP] * (n - 2) + [4.0])
    model, _ = lf.load(tiny_dirs["llama"])
    assert paired.decode_tok_s(model, 2, 8, 6) == pytest.approx(200)


def test_bench_recipe_columns_carry_the_recipe_names(tiny_dirs, monkeypatch, tmp_path):
    """`bench --recipe none int8` once labelled both columns "float32"; each names its variant now."""
    from leanformer.cli import bench as bench_cli
    from leanformer.cli.main import main

    # in-process instead of one subprocess per engine: the columns are the point here, not RSS
    monkeypatch.setattr(runner, "contender", functools.partial(runner.contender, in_process=True))
    printed = {}
    monkeypatch.setattr(bench_cli, "print_table", lambda title, header, rows: printed.update(header=header))
    args = ["bench", str(tiny_dirs["llama"]), "--recipe", "none", "int8", "int4-g32"]
    args += ["--prompt-tokens", "8", "--new-tokens", "4", "--batch", "1", "--repeats", "1"]
    assert main(args) == 0
    columns = printed["header"][1:4]
    # the label names the recipe, the parenthesis the activation dtype
    assert columns == ["leanformer (float32)", "leanformer +int8 (float32)", "leanformer +int4-g32 (float32)"]


def test_variant_names(tmp_path):
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text("")
    cfg = BenchConfig("m")
    assert runner.variant_name(cfg, "leanformer") == "float32"
    assert runner.variant_name(BenchConfig("m", recipe="int8"), "leanformer") == "int8"
    assert runner.variant_name(BenchConfig("m", recipe=str(recipe)), "leanformer") == "my-recipe"
    assert runner.variant_name(BenchConfig("m", "bfloat16", recipe="int8"), "leanformer") == "bfloat16 int8"
    assert runner.variant_name(BenchConfig("m.gguf", keep_quantized=True), "leanformer") == "GGUF blocks"
    assert runner.variant_name(BenchConfig("folder", keep_quantized=True), "leanformer") == "float32"
    assert runner.variant_name(BenchConfig("m", recipe="int8"), "transformers") == "float32"  # ours only
