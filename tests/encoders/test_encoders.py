"""embed / classify / probe / evaluation / head pruning on tiny encoders, and the real MiniLM (slow)."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import classify, embed
from leanformer.encoders.probe import train_probe
from leanformer.encoders.prune_heads import head_importance, prune_heads_, prune_heads_auto_
from leanformer.encoders.quality import cosine_to_reference, eval_sst2, eval_stsb, read_tsv, spearman
from leanformer.errors import LeanformerError
from leanformer.kernels.h16 import H16Linear, native_f16
from tests.encoders.helpers import SENTENCES, need_glue, need_minilm, tiny_encoder_dir, tiny_hf_encoder


@pytest.fixture
def tiny(tmp_path):
    d = tiny_encoder_dir(tmp_path / "m", "BertModel", pooling=["mean"], normalize=True)
    model, tok = load_encoder(d)
    return d, model, tok


def test_embed_restores_order_and_ignores_padding(tiny):
    _, model, tok = tiny
    alone = np.stack([embed(model, tok, [s])[0] for s in SENTENCES])
    for bs in (1, 3, 32):
        got = embed(model, tok, SENTENCES, batch_size=bs)
        assert got.shape == (len(SENTENCES), 64) and got.dtype == np.float32
        assert abs(got - alone).max() < 1e-5  # row i is text i, whatever its batch and padding
    assert np.allclose((alone**2).sum(1), 1, atol=1e-5)  # the folder's Normalize module
    raw = embed(model, tok, SENTENCES[:2], normalize=False, numpy=False)
    assert isinstance(raw, torch.Tensor) and not torch.allclose(raw.norm(dim=-1), torch.ones(2))


def test_embed_truncates_with_warning(tiny):
    _, model, tok = tiny
    with pytest.warns(UserWarning, match="1 of 2 texts were truncated to the model's maximum of 32"):
        e = embed(model, tok, ["good " * 100, "bad"])
    assert e.shape == (2, 64)


def test_classify_uses_id2label(tmp_path):
    d = tiny_encoder_dir(tmp_path, "RobertaForSequenceClassification")
    model, tok = load_encoder(d)
    hf = tiny_hf_encoder("RobertaForSequenceClassification")
    out = classify(model, tok, SENTENCES, batch_size=2)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.softmax(-1)
    assert [o["label"] for o in out] == [["neg", "pos", "neutral"][i] for i in probs.argmax(-1)]
    assert all(abs(o["score"] - float(p.max())) < 1e-4 for o, p in zip(out, probs))


def test_one_text_and_bad_texts(tmp_path, tiny):
    """A single string is one text (classify returned one entry per character); anything but strings is
    refused in one line."""
    _, model, tok = tiny
    assert embed(model, tok, SENTENCES[0]).shape == (1, 64)
    assert np.array_equal(embed(model, tok, SENTENCES[0]), embed(model, tok, SENTENCES[:1]))
    clf, ctok = load_encoder(tiny_encoder_dir(tmp_path / "c", "RobertaForSequenceClassification"))
    assert classify(clf, ctok, SENTENCES[0]) == classify(clf, ctok, SENTENCES[:1])
    for bad, message in ((None, "got NoneType"), ([["a"]], "got a list"), (["a", 3], "got a int")):
        with pytest.raises(LeanformerError, match=message):
            embed(model, tok, bad)
        with pytest.raises(LeanformerError, match=message):
            classify(clf, ctok, bad)


@pytest.mark.parametrize("fast", [False, True])  # plain torch / oneDNN-packed, whatever this CPU is
def test_probe_trains_saves_and_reloads(tmp_path, tiny, fast):
    import leanformer as lf

    d = tiny[0]
    model, tok = load_encoder(d, fast=fast)
    with pytest.raises(LeanformerError, match="no classification head and no probe"):
        classify(model, tok, ["good"])
    texts = [f"{w} movie {x}" for w in ("good", "great", "fun") for x in WORDS6] + [
        f"{w} film {x}" for w in ("bad", "awful", "dull") for x in WORDS6
    ]
    labels = ["1"] * 18 + ["0"] * 18
    result = train_probe(model, tok, texts, labels, save_to=d)
    assert result["labels"] == ["0", "1"] and result["train_accuracy"] >= 0.9
    assert (d / "probe.safetensors").exists() and json.loads((d / "probe.json").read_text())["labels"] == [
        "0",
        "1",
    ]
    before = classify(model, tok, texts)
    again, tok2 = load_encoder(d, fast=fast)
    assert again.args.probe_labels == ["0", "1"]
    assert classify(again, tok2, texts) == before  # exactly: the reloaded probe runs the same matmul
    lf.save(again, tok2, tmp_path / "saved")  # the probe inside model.safetensors this time
    assert classify(load_encoder(tmp_path / "saved", fast=fast)[0], tok2, texts) == before
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    assert eval_sst2(again, tok2, tsv)["sst2_accuracy"] == pytest.approx(result["train_accuracy"])


WORDS6 = ["the plot", "the actor", "it was", "very", "and fun", "of it"]


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    b[:50] = a[:50]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_eval_stsb_and_cosine(tmp_path, tiny):
    _, model, tok = tiny
    tsv = tmp_path / "stsb.tsv"
    rows = [(SENTENCES[i], SENTENCES[(i + k) % 7], str(5 - k)) for i in range(7) for k in range(3)]
    tsv.write_text("sentence1\tsentence2\tscore\n" + "".join("\t".join(r) + "\n" for r in rows))
    r = eval_stsb(model, tok, tsv)
    assert r["stsb_pairs"] == 21 and -1 <= r["stsb_spearman"] <= 1
    e = embed(model, tok, SENTENCES)
    assert cosine_to_reference(e, e)["cosine_min"] == pytest.approx(1.0)
    with pytest.raises(LeanformerError, match="shapes differ"):
        cosine_to_reference(e, e[:3])


def test_prune_heads_equals_masking_and_reloads(tmp_path, tiny):
    _, model, tok = tiny
    ids = tok(SENTENCES, padding=True, return_tensors="pt")
    masks = [torch.tensor([1.0, 0, 1, 0]), torch.ones(4)]
    with torch.inference_mode():
        want = model(ids["input_ids"], ids["attention_mask"], head_mask=masks)
    prune_heads_(model, {0: [1, 3]})
    prune_heads_(model, {0: [1], 1: []})  # already pruned: ignored
    assert model.args.heads_per_layer == [2, 4] and model.layers[0].qkv.weight.shape == (3 * 32, 64)
    assert model.config["pruned_heads"] == {"0": [1, 3]}
    with torch.inference_mode():
        got = model(ids["input_ids"], ids["attention_mask"])
    assert (got - want).abs().max().item() < 1e-5
    out = tmp_path / "pruned"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(model.config))
    again, _ = load_encoder(out)
    assert again.args.heads_per_layer == [2, 4]
    with torch.inference_mode():
        assert torch.equal(again(ids["input_ids"], ids["attention_mask"]), got)
    with pytest.raises(LeanformerError, match="layer 5 out of range"):
        prune_heads_(model, {5: [0]})
    with pytest.raises(LeanformerError, match="head 9 out of range"):
        prune_heads_(model, {1: [9]})


@pytest.mark.parametrize(("method", "steps"), [("taylor", 1), ("taylor", 2), ("norm", 1)])
def test_prune_heads_auto(tiny, method, steps):
    _, model, tok = tiny
    imp = head_importance(model, tok, SENTENCES, method)
    assert [s.shape for s in imp] == [(4,), (4,)] and all(
        torch.isfinite(s).all() and (s >= 0).all() for s in imp
    )
    pruned = prune_heads_auto_(model, tok, SENTENCES, 0.5, method=method, steps=steps)
    assert sum(len(v) for v in pruned.values()) == 4 and sum(model.args.heads_per_layer) == 4
    assert embed(model, tok, SENTENCES).shape == (7, 64)
    if steps == 1:  # one round: exactly the 4 heads the importance ranks lowest (with 2, it is re-ranked)
        ranked = sorted((float(v), li, h) for li, s in enumerate(imp) for h, v in enumerate(s))
        assert pruned == _plan([(li, h) for _, li, h in ranked[:4]])


def _plan(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    plan: dict[int, list[int]] = {}
    for li, h in sorted(heads):
        plan.setdefault(li, []).append(h)
    return plan


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_prune_heads_auto_removes_the_lowest_ranked(tiny, monkeypatch, steps):
    """Whatever the importance says, auto-pruning removes the least important heads, round after round
    (importance given here per original head, so re-ranking the survivors keeps the same order)."""
    import leanformer.encoders.prune_heads as ep

    _, model, tok = tiny
    score = {(0, 0): 5, (0, 1): 2, (0, 2): 7, (0, 3): 0, (1, 0): 3, (1, 1): 6, (1, 2): 1, (1, 3): 4}
    rounds = []

    def fake_importance(model, tok, texts, method="taylor", batch_size=32):
        rounds.append(sum(model.args.heads_per_layer))
        gone = model.args.pruned_heads
        alive = [[h for h in range(4) if h not in gone.get(li, [])] for li in range(2)]
        return [torch.tensor([float(score[li, h]) for h in hs]) for li, hs in enumerate(alive)]

    monkeypatch.setattr(ep, "head_importance", fake_importance)
    pruned = prune_heads_auto_(model, tok, SENTENCES, 0.5, steps=steps)
    assert pruned == _plan([k for k, v in score.items() if v < 4])  # scores 0-3, not the top 4
    assert len(rounds) == min(steps, 4) and rounds[0] == 8  # re-ranked before every round that prunes


@pytest.mark.parametrize("fast", [False, True])
def test_prune_a_whole_layer_and_classifier_importance(tmp_path, fast):
    import leanformer as lf

    model, tok = load_encoder(
        tiny_encoder_dir(tmp_path / "m", "DistilBertForSequenceClassification"), fast=fast
    )
    assert all(s.sum() > 0 for s in head_importance(model, tok, SENTENCES))  # pseudo-label loss
    prune_heads_(model, {0: [0, 1, 2, 3]})  # qkv becomes [0, hidden]: nothing for oneDNN to pack
    assert model.args.heads_per_layer == [0, 4] and model.layers[0].qkv.weight.shape == (0, 64)
    want = classify(model, tok, SENTENCES)
    assert len(want) == 7
    lf.save(model, tok, tmp_path / "pruned")
    again, tok2 = load_encoder(tmp_path / "pruned", fast=fast)
    assert again.args.heads_per_layer == [0, 4]
    assert hasattr(again.layers[1].qkv, "packed_weight") == fast  # the empty layer did not stop packing
    assert [c["label"] for c in classify(again, tok2, SENTENCES)] == [c["label"] for c in want]


def test_cli_embed_and_eval(tmp_path, tiny, capsys):
    from leanformer.cli.encoders import add_parser as add_encoder_commands

    d = tiny[0]
    parser = argparse.ArgumentParser()
    add_encoder_commands(parser.add_subparsers())
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    args = parser.parse_args(
        ["embed", str(d), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "e.npy")]
    )
    args.func(args)
    e32 = np.load(tmp_path / "e.npy")
    assert e32.shape == (7, 64)
    out16 = str(tmp_path / "e16.npy")
    args = parser.parse_args(
        ["embed", str(d), "--input", str(tmp_path / "in.txt"), "--output", out16, "--dtype", "bfloat16"]
    )
    args.func(args)
    e16 = np.load(out16)  # float32 out; bf16 weights and activations inside: close, not equal
    assert e16.dtype == np.float32 and not np.array_equal(e16, e32) and (e16 * e32).sum(1).min() > 0.99
    args = parser.parse_args(["embed", str(d), "--input", str(tmp_path / "in.txt"), "--no-normalize"])
    args.func(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["text"] == SENTENCES[0]
    tsv = tmp_path / "stsb.tsv"
    tsv.write_text(
        "sentence1\tsentence2\tscore\n"
        + "".join(f"{a}\t{b}\t{i}\n" for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:])))
    )
    ref = tmp_path / "ref"
    shutil.copytree(d, ref)
    args = parser.parse_args(["eval-encoder", str(d), "--stsb", str(tsv), "--reference", str(ref)])
    r = args.func(args)
    assert r["cosine_min"] == pytest.approx(1.0) and "stsb_spearman" in r


def test_lf_load_builds_the_same_encoder(tiny):
    """leanformer.load on an encoder folder = load_encoder: pooling, Normalize, probe, packing."""
    import leanformer as lf

    d, model, tok = tiny
    train_probe(model, tok, SENTENCES, ["pos", "neg", "neg", "pos", "neg", "pos", "pos"], save_to=d)
    again, tok2 = lf.load(d)
    assert again.family == "bert" and again.args.pooling == ["mean"] and again.args.normalize
    assert again.args.probe_labels == ["neg", "pos"]
    assert type(again.layers[0].qkv) is type(model.layers[0].qkv)  # the same oneDNN decision
    assert np.array_equal(embed(again, tok2, SENTENCES), embed(model, tok, SENTENCES))
    assert classify(again, tok2, SENTENCES) == classify(model, tok, SENTENCES)
    assert not hasattr(lf.load(d, fast=False)[0].layers[0].qkv, "packed_weight")


def test_main_cli_eval_and_onnx_backend(tmp_path, tiny, capsys):
    """`leanformer eval` on an encoder (the README's commands, through the main parser)."""
    from leanformer.cli.main import main

    d = tiny[0]
    tsv = tmp_path / "stsb.tsv"
    tsv.write_text(
        "sentence1\tsentence2\tscore\n"
        + "".join(f"{a}\t{b}\t{i}\n" for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:])))
    )
    out = tmp_path / "r.json"
    assert main(["eval", str(d), "--stsb", str(tsv), "--reference", str(d), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["cosine_min"] == pytest.approx(1.0) and r["stsb_pairs"] == 6
    pytest.importorskip("onnxruntime")
    assert main(["eval", str(d), "--stsb", str(tsv), "--backend", "onnxruntime", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["stsb_spearman"] == pytest.approx(r["stsb_spearman"], abs=1e-6)
    assert main(["export", str(d), str(tmp_path / "onnx")]) == 0
    assert main(["eval", str(tmp_path / "onnx"), "--stsb", str(tsv), "--backend", "onnxruntime"]) == 0
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    args = [
        "--input",
        str(tmp_path / "in.txt"),
        "--output",
        str(tmp_path / "e.npy"),
        "--backend",
        "onnxruntime",
    ]
    assert main(["embed", str(tmp_path / "onnx"), *args]) == 0
    assert abs(np.load(tmp_path / "e.npy") - embed(tiny[1], tiny[2], SENTENCES)).max() < 1e-5
    capsys.readouterr()


@pytest.mark.slow
def test_real_minilm_stsb_spearman():
    path, stsb = need_minilm(), need_glue("stsb")
    model, tok = load_encoder(path)
    assert eval_stsb(model, tok, stsb)["stsb_spearman"] == pytest.approx(0.8672, abs=5e-4)


@pytest.mark.slow
def test_real_minilm_sst2_probe(tmp_path):
    path, train, dev = need_minilm(), need_glue("sst2", "train"), need_glue("sst2")
    model, tok = load_encoder(path)
    rows = read_tsv(train, 2000)
    train_probe(model, tok, [r["sentence"] for r in rows], [r["label"] for r in rows])
    assert eval_sst2(model, tok, dev)["sst2_accuracy"] > 0.75


def test_cli_train_probe_export_prune(tmp_path, tiny, capsys):
    from leanformer.cli.encoders import add_parser as add_encoder_commands
    from leanformer.cli.prune_encoders import add_parser as add_prune_commands

    d = tiny[0]
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    add_encoder_commands(commands)
    add_prune_commands(commands)
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES)))
    out = tmp_path / "with-probe"
    args = parser.parse_args(
        ["train-probe", str(d), "--data", str(data), "--output", str(out), "--eval", str(data)]
    )
    args.func(args)
    assert (out / "probe.safetensors").exists() and load_encoder(out)[0].args.probe_labels == ["0", "1"]
    args = parser.parse_args(["export", str(out), "--output", str(tmp_path / "onnx"), "--legacy-exporter"])
    args.func(args)
    assert "max abs diff" in capsys.readouterr().out and (tmp_path / "onnx" / "model.onnx").exists()
    args = parser.parse_args(
        ["prune-heads", str(d), "--heads", '{"1": [0, 2]}', "--output", str(tmp_path / "p")]
    )
    args.func(args)
    assert load_encoder(tmp_path / "p")[0].args.heads_per_layer == [4, 2]


def test_taylor_importance_is_the_mask_gradient(tiny):
    """Taylor importance = per-layer normalized |∂L/∂ξ_h| of the contrastive loss (module docstring),
    checked against central finite differences of that loss over the head mask, computed here."""
    import torch.nn.functional as F

    from leanformer.kernels.modules import plain_linears

    _, model, tok = tiny
    imp = head_importance(model, tok, SENTENCES, "taylor")  # 7 texts: one batch
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad(), plain_linears(model):
        target = model.pool(model(ids, mask), mask, normalize=True)  # detached: ∂/∂ξ does not see it

        def loss(li: int, h: int, delta: float) -> float:
            xi = [torch.ones(4), torch.ones(4)]
            xi[li][h] += delta
            e = model.pool(model(ids, mask, head_mask=xi), mask, normalize=True)
            return F.cross_entropy(e @ target.T / 0.05, torch.arange(len(e))).item()

        for li in range(2):
            g = torch.tensor([(loss(li, h, 1e-2) - loss(li, h, -1e-2)) / 2e-2 for h in range(4)]).abs()
            assert torch.allclose(imp[li], g / g.norm(), atol=3e-3), (li, imp[li], g / g.norm())


@pytest.mark.parametrize("method", ["taylor", "norm"])
def test_bf16_packed_encoder_keeps_fp32_between_its_matmuls(tiny, method):
    """load_encoder(bfloat16) with oneDNN packing: bf16 Linear weights, fp32 embeddings / LayerNorm /
    residual stream; embeddings close to fp32's (not equal); hooks (calibration) and autograd (Taylor
    head importance) run through the same model."""
    d, model, tok = tiny
    mixed, _ = load_encoder(d, dtype=torch.bfloat16, fast=True)
    layer = mixed.layers[0]
    assert layer.qkv.weight.dtype == torch.bfloat16 and hasattr(layer.qkv, "packed_weight")
    assert layer.attn_norm.weight.dtype == torch.float32
    assert mixed.embeddings.word_embeddings.weight.dtype == torch.float32
    e32, e16 = embed(model, tok, SENTENCES), embed(mixed, tok, SENTENCES)
    assert e16.dtype == np.float32 and not np.array_equal(e16, e32)
    assert (e16 * e32).sum(1).min() > 0.999
    seen = []
    hook = layer.ffn_in.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    hooked = embed(mixed, tok, SENTENCES)  # the GELU after the hooked matmul in fp32: close, not equal
    assert (hooked * e16).sum(1).min() > 0.999
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    pruned = prune_heads_auto_(mixed, tok, SENTENCES, 0.5, method=method, steps=1)
    assert sum(len(v) for v in pruned.values()) > 0 and embed(mixed, tok, SENTENCES).shape == e16.shape


@pytest.mark.slow
def test_real_minilm_bf16_matmuls_stay_within_cosine_0_9999():
    """Issue #17's quality bar for the bf16 encoder path on the real model: every STS-B sentence's
    embedding within cosine 0.9999 of fp32's (0.999961 measured on the full dev set, Zen 4)."""
    path, stsb = need_minilm(), need_glue("stsb")
    rows = read_tsv(stsb, 300)
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    model, tok = load_encoder(path)
    mixed, _ = load_encoder(path, dtype=torch.bfloat16, fast=True)
    e32, e16 = embed(model, tok, texts), embed(mixed, tok, texts)
    assert (e16 * e32).sum(1).min() >= 0.9999


@pytest.mark.skipif(not native_f16(), reason="this CPU lacks AVX512-FP16 (or the kernels are not built)")
@pytest.mark.parametrize("method", ["taylor", "norm"])
def test_f16_packed_encoder_is_an_fp32_model_with_fp16_matmuls(tiny, method, tmp_path):
    """load_encoder(float16) on an AVX512-FP16 CPU: an fp32 model (weights, state dict, LayerNorm, residual
    stream) whose Linears multiply in fp16 (H16Linear); embeddings close to fp32's, not equal; hooks,
    autograd (Taylor head importance), head pruning and save → load run through the same model."""
    d, model, tok = tiny
    mixed, _ = load_encoder(d, dtype=torch.float16, fast=True)
    layer = mixed.layers[0]
    assert type(layer.qkv) is H16Linear and layer.qkv.weight.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in mixed.state_dict().values() if v.is_floating_point())
    e32, e16 = embed(model, tok, SENTENCES), embed(mixed, tok, SENTENCES)
    assert e16.dtype == np.float32 and not np.array_equal(e16, e32)
    assert (e16 * e32).sum(1).min() > 0.9999
    seen = []
    hook = layer.ffn_in.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    hooked = embed(mixed, tok, SENTENCES)  # a hooked Linear runs in fp32: close, not equal
    assert (hooked * e16).sum(1).min() > 0.9999 and seen == [torch.float32] * len(seen) and seen
    hook.remove()
    pruned = prune_heads_auto_(mixed, tok, SENTENCES, 0.5, method=method, steps=1)
    assert sum(len(v) for v in pruned.values()) > 0 and type(mixed.layers[0].qkv) is H16Linear
    e_pruned = embed(mixed, tok, SENTENCES)
    import leanformer as lf

    lf.save(mixed, tok, tmp_path / "saved")
    back, btok = load_encoder(tmp_path / "saved", dtype=torch.float16, fast=True)
    assert type(back.layers[0].qkv) is H16Linear
    assert np.allclose(embed(back, btok, SENTENCES), e_pruned, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not native_f16(), reason="this CPU lacks AVX512-FP16 (or the kernels are not built)")
def test_real_minilm_f16_matmuls_stay_within_cosine_0_9999():
    """Issue #17's quality bar for the fp16 encoder path on the real model (min 0.99999 measured on the
    STS-B dev set, Intel Xeon with AVX512-FP16)."""
    path, stsb = need_minilm(), need_glue("stsb")
    rows = read_tsv(stsb, 300)
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    model, tok = load_encoder(path)
    mixed, _ = load_encoder(path, dtype=torch.float16, fast=True)
    e32, e16 = embed(model, tok, texts), embed(mixed, tok, texts)
    assert (e16 * e32).sum(1).min() >= 0.9999
