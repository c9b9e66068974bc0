"""engine/prefill.py: short prompts through the fused decode step as chained rows, against the padded
forward; longer ones (or more rows in all than the step takes) through the padded forward."""

from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer import kernels
from leanformer.compress import Int4WeightOnly, quantize_, set_activations
from leanformer.engine import prefill as P
from leanformer.models.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the fused decode step needs the kernels")


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return lf.load(tiny_dirs["llama"])[0]


def padded(model, prompts):
    """The reference: one forward over right-padded prompts, logits at each last token."""
    cache = KVCache.for_model(model, len(prompts), 64)
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    last = torch.tensor([len(p) - 1 for p in prompts])
    with torch.inference_mode():
        return model(ids, cache=cache, logits_at=last)[:, -1].float(), cache


def chained(model, prompts, monkeypatch):
    """P.prefill, and whether it took the fused step (its `chained` gave logits)."""
    taken, real = [], P.chained

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(P, "chained", spy)
    cache = KVCache.for_model(model, len(prompts), 64)
    with torch.inference_mode():
        logits = P.prefill(model, cache, prompts)
    return logits, cache, taken


@pytest.mark.parametrize("prompts", [[[3, 17, 42, 5]], [[3, 17, 42, 5, 99, 8, 1], [9, 2, 44]], [[7, 8]]])
def test_chained_prefill_equals_padded_forward(llama, prompts, monkeypatch):
    logits, cache, taken = chained(llama, prompts, monkeypatch)
    ref, ref_cache = padded(llama, prompts)
    assert taken == [True]
    assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    for i, p in enumerate(prompts):  # the K/V it left behind, and the lengths
        assert int(cache.lengths[i]) == len(p)
        assert torch.allclose(cache.k[1][i, :, : len(p)], ref_cache.k[1][i, :, : len(p)], atol=1e-5)


def test_int4_model_fp32_activations_equal_and_int8_close(tiny_dirs, monkeypatch):
    model = lf.load(tiny_dirs["llama"])[0]
    quantize_(model, Int4WeightOnly(group_size=32))
    prompts = [[3, 17, 42, 5, 99, 8, 1, 60, 61]]
    set_activations(model, "fp32")
    logits, _, taken = chained(model, prompts, monkeypatch)
    ref, _ = padded(model, prompts)
    assert taken == [True] and (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    set_activations(model, "int8")
    logits8, _, _ = chained(model, prompts, monkeypatch)
    lp, lr = logits8.log_softmax(-1), ref.log_softmax(-1)
    assert 0 < float((lr.exp() * (lr - lp)).sum()) < 0.05  # int8 activations: close, and really taken


def test_one_prompt_in_several_steps(llama, monkeypatch):
    prompt = [list(range(1, P.CHAIN_MAX + 1))]  # two fused steps: rows 0-15, then 16-31
    logits, cache, taken = chained(llama, prompt, monkeypatch)
    ref, ref_cache = padded(llama, prompt)
    assert taken == [True] and (logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.allclose(cache.k[0][0, :, : P.CHAIN_MAX], ref_cache.k[0][0, :, : P.CHAIN_MAX], atol=1e-5)


def test_long_or_many_prompts_take_the_padded_forward(llama):
    too_long = [list(range(1, P.CHAIN_MAX + 2))]
    many = [list(range(1, 10)), list(range(20, 29))]  # 18 rows of two prompts
    for prompts in (too_long, many):
        cache = KVCache.for_model(llama, len(prompts), 64)
        with torch.inference_mode():
            assert P.chained(llama, cache, [(i, 0, p) for i, p in enumerate(prompts)]) is None
            logits = P.prefill(llama, cache, prompts)
        ref, _ = padded(llama, prompts)
        assert torch.equal(logits, ref)


def test_generate_same_tokens_either_way(llama, monkeypatch):
    prompt = [1, 5, 7, 9, 11]
    out = lf.generate(llama, None, prompt, max_new_tokens=12, ignore_eos=True)
    for limit in ("MAX_ROWS", "CHAIN_MAX", "GEMM_CHAIN_MAX"):  # every prompt through the padded forward
        monkeypatch.setattr(P, limit, 0)
    assert lf.generate(llama, None, prompt, max_new_tokens=12, ignore_eos=True) == out


@pytest.mark.parametrize("paged", [False, True])
def test_scheduler_prefills_short_chunks_chained(llama, paged, monkeypatch):
    """The server's scheduler: prompt chunks of up to 16 rows in all go through the fused step as chained
    rows at each sequence's own positions (prefix hits and chunking included); same tokens as padded."""
    from leanformer.engine.paged import PagedScheduler
    from leanformer.engine.scheduler import Scheduler
    from tests.engine.test_scheduler import PROMPTS, make, run

    def serve(chunk: int) -> tuple[list[list[int]], list[bool]]:
        if paged:
            sched = PagedScheduler(
                llama, None, max_batch=3, max_seq=64, num_blocks=40, block_size=4, prefill_chunk=chunk
            )
        else:
            sched = Scheduler(llama, None, n_slots=3, max_seq=64, prefill_chunk=chunk)
        jobs = [make(p, 6) for p in PROMPTS]
        for req, _ in jobs:
            sched.submit(req)
        run(sched)
        return [sink.tokens for _, sink in jobs]

    taken, real = [], P.chained

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr("leanformer.engine.scheduler.chained", spy)
    for chunk in (256, 3):
        taken.clear()
        got = serve(chunk)
        assert any(taken)
        for limit in ("MAX_ROWS", "CHAIN_MAX", "GEMM_CHAIN_MAX"):
            monkeypatch.setattr(P, limit, 0)
        assert serve(chunk) == got
        monkeypatch.undo()
        monkeypatch.setattr("leanformer.engine.scheduler.chained", spy)


@pytest.mark.parametrize("scale_bits", [None, 8])  # 8: scale codes, decoded for the GEMM per call
def test_long_prompt_one_step_on_the_gemm(tiny_dirs, monkeypatch, scale_bits):
    """int4 model, int8 activations: a prompt past 16 tokens in ONE fused step whose Linears take the GEMM
    (kernels/gemm_q4_i8), the head on its last row only; close to the padded forward (the same GEMM and
    activation quantization, attention summed in another order)."""
    model = lf.load(tiny_dirs["llama"])[0]
    quantize_(model, Int4WeightOnly(group_size=32, scale_bits=scale_bits))
    set_activations(model, "int8")
    steps = []
    real = P.Chain
    monkeypatch.setattr(P, "Chain", lambda *a: steps.append(a) or real(*a))
    prompts = [list(range(3, 43))]  # 40 tokens
    logits, cache, taken = chained(model, prompts, monkeypatch)
    ref, ref_cache = padded(model, prompts)
    assert taken == [True] and len(steps) == 2  # the probe, then one step of 40 rows
    assert steps[-1][3] == P.GEMM_CHAIN_MAX and steps[-1][4].tolist() == [39]
    lp, lr = logits.log_softmax(-1), ref.log_softmax(-1)
    assert float((lr.exp() * (lr - lp)).sum()) < 1e-3
    assert torch.allclose(cache.k[1][0, :, :40], ref_cache.k[1][0, :, :40], atol=2e-2, rtol=2e-2)
    # the head (fp32 here: the stack holds no ends) runs on the kept rows only, in torch too
    view = real(KVCache.for_model(model, 1, 64), [0] * 40, list(range(40)), 64, torch.tensor([39, 7]))
    with torch.inference_mode():
        out = model(torch.tensor(prompts[0])[:, None], cache=view, slots=torch.zeros(40, dtype=torch.long))
    assert out.shape == (2, 1, model.args.vocab_size) and torch.allclose(
        out[0, 0].float(), logits[0], atol=1e-4
    )


def test_int8_model_one_gemm_step_where_vnni(tiny_dirs, monkeypatch):
    """int8 weights: the chained GEMM step where the CPU has VNNI (the int8-weight GEMM), else 16-row steps."""
    from leanformer.compress import Int8WeightOnly
    from leanformer.kernels import cpu

    model = lf.load(tiny_dirs["llama"])[0]
    quantize_(model, Int8WeightOnly())
    set_activations(model, "int8")
    steps, real = [], P.Chain
    monkeypatch.setattr(P, "Chain", lambda *a: steps.append(a) or real(*a))
    prompts = [list(range(3, 27))]  # 24 tokens
    logits, _, taken = chained(model, prompts, monkeypatch)
    ref, _ = padded(model, prompts)
    vnni = cpu.act_isa() in ("avx_vnni", "avx512_vnni")
    assert taken == [True] and len(steps) == (2 if vnni else 3)  # the probe, then 1 step or 2 of 16 rows
    lp, lr = logits.log_softmax(-1), ref.log_softmax(-1)
    # without VNNI the padded forward dequantizes (fp32 activations) while the chained rows take int8
    assert float((lr.exp() * (lr - lp)).sum()) < (1e-3 if vnni else 1e-2)
