"""ONNX export of encoders: parity report, dynamic axes, and the ONNX Runtime runner behind embed/classify."""

from __future__ import annotations

import pytest
import torch

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import classify, embed
from leanformer.encoders.probe import train_probe
from leanformer.errors import LeanformerError
from tests.encoders.helpers import SENTENCES, need_minilm, tiny_encoder_dir

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from leanformer.export.encoder import OrtEncoder, export_onnx, load_onnx_encoder  # noqa: E402


@pytest.mark.parametrize(
    ("arch", "dynamo"),
    [("BertForSequenceClassification", True), ("RobertaModel", False), ("DistilBertModel", False)],
)
def test_export_parity_and_dynamic_axes(tmp_path, arch, dynamo):
    model, tok = load_encoder(tiny_encoder_dir(tmp_path / "m", arch, pooling=["mean"], normalize=True))
    report = export_onnx(model, tmp_path / "onnx", tok, dynamo=dynamo)
    want = {"last_hidden_state", "sentence_embedding"} | ({"logits"} if "Sequence" in arch else set())
    assert set(report["max_abs_diff"]) == want
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner = OrtEncoder(report["path"])
    for b, t in [(1, 3), (5, 17)]:  # shapes other than the traced [3, T]
        ids = torch.randint(5, model.args.vocab_size, (b, t))
        mask = torch.ones_like(ids)
        mask[-1, 2:] = 0
        ids[mask == 0] = model.args.pad_token_id
        with torch.inference_mode():
            assert (runner.embed(ids, mask) - model.embed(ids, mask)).abs().max() < 1e-4
            assert (runner(ids, mask)[mask.bool()] - model(ids, mask)[mask.bool()]).abs().max() < 1e-4


def test_onnx_backend_runs_embed_and_probe_classify(tmp_path):
    model, tok = load_encoder(tiny_encoder_dir(tmp_path / "m", "BertModel", pooling=["mean"], normalize=True))
    train_probe(model, tok, SENTENCES, ["pos", "neg", "neg", "pos", "neg", "pos", "pos"])
    export_onnx(model, tmp_path / "onnx", tok, dynamo=False)
    runner, rtok = load_onnx_encoder(tmp_path / "onnx")
    assert runner.args.probe_labels == ["neg", "pos"]
    assert abs(embed(runner, rtok, SENTENCES) - embed(model, tok, SENTENCES)).max() < 1e-5
    assert [c["label"] for c in classify(runner, rtok, SENTENCES)] == [
        c["label"] for c in classify(model, tok, SENTENCES)
    ]


def test_export_errors(tmp_path):
    with pytest.raises(LeanformerError, match="ONNX file not found"):
        OrtEncoder(tmp_path / "missing.onnx")
    model, _ = load_encoder(tiny_encoder_dir(tmp_path / "m", "BertModel"), dtype=torch.bfloat16)
    with pytest.raises(LeanformerError, match="float32"):
        export_onnx(model, tmp_path / "onnx")


@pytest.mark.slow
def test_real_minilm_export(tmp_path):
    model, tok = load_encoder(need_minilm())
    report = export_onnx(model, tmp_path, tok)
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner, rtok = load_onnx_encoder(tmp_path)
    assert abs(embed(runner, rtok, SENTENCES) - embed(model, tok, SENTENCES)).max() < 1e-5


# ---- decoder LMs: past key/values in and out, incremental greedy generation with ONNX Runtime ----


def test_decoder_export_greedy_equals_ours(tiny_dirs, tmp_path):
    """Llama with GQA, loaded fast (oneDNN / GEMV Linears, swapped for plain ones while exporting)."""
    import leanformer as lf
    from leanformer.export.decoder import export_decoder_onnx, load_onnx_decoder

    model, _ = lf.load(tiny_dirs["llama"])
    report = export_decoder_onnx(model, tmp_path)
    assert set(report["max_abs_diff"]) == {"prefill_logits", "step_logits"}
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner, tok = load_onnx_decoder(tmp_path)
    assert tok is None  # the tiny folder has no tokenizer
    shapes = {i.name: i.shape for i in runner.session.get_inputs()}
    assert shapes["attention_mask"] == ["batch", "past + seq"]
    assert shapes["past_key_values.1.value"] == ["batch", 2, "past", 16]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [20, 21, 22]]  # unequal: the runner left-pads
    want = lf.generate(model, None, prompts, max_new_tokens=10, ignore_eos=True)
    assert runner.generate(prompts, 10, stop_ids=()) == want
    assert runner.generate([prompts[1]], 10, stop_ids=()) == [want[1]]
    assert runner.stop_ids == {model.config["eos_token_id"]}  # from the exported config.json
    # EOS ends a row (the token itself not returned) in both: make a token greedy reaches the EOS
    eos = want[0][3]
    model.config["eos_token_id"], runner.stop_ids = eos, {eos}
    stopped = lf.generate(model, None, prompts, max_new_tokens=10)
    assert stopped[0] == want[0][: want[0].index(eos)] and runner.generate(prompts, 10) == stopped


def test_decoder_export_cli_gpt2(tiny_dirs, tmp_path, capsys):
    import leanformer as lf
    from leanformer.cli.main import main
    from leanformer.export.decoder import load_onnx_decoder

    assert main(["export", str(tiny_dirs["gpt2"]), str(tmp_path), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "prefill_logits" in out and "step_logits" in out
    model, _ = lf.load(tiny_dirs["gpt2"])
    runner, _ = load_onnx_decoder(tmp_path)
    prompts = [[5, 6, 7], [100, 3, 17, 9]]
    want = lf.generate(model, None, prompts, max_new_tokens=6, ignore_eos=True)
    assert runner.generate(prompts, 6, stop_ids=()) == want


def test_decoder_export_errors(tiny_dirs, tmp_path):
    import leanformer as lf
    from leanformer.export.decoder import export_decoder_onnx

    model, _ = lf.load(tiny_dirs["llama"], dtype="bfloat16")
    with pytest.raises(LeanformerError, match="float32"):
        export_decoder_onnx(model, tmp_path)
    model, _ = lf.load(tiny_dirs["llama"])
    lf.quantize_(model, lf.Int8WeightOnly())
    with pytest.raises(LeanformerError, match="quantized and sparse-stored Linears have no ONNX form"):
        export_decoder_onnx(model, tmp_path)
    runner = type("OrtDecoder", (), {"empty_past": None})()  # what load_onnx_decoder returns, for generate
    with pytest.raises(LeanformerError, match=r"generate takes a decoder model.*runner.generate\(ids\)"):
        lf.generate(runner, None, [1, 2, 3])


def test_low_rank_decoder_exports(tiny_dirs, tmp_path):
    """LowRankLinear is two plain Linears: the graph carries both, with parity, and greedy = ours."""
    import leanformer as lf
    from leanformer.compress.lowrank import LowRankLinear

    model, _ = lf.load(tiny_dirs["llama"])
    ids = torch.randint(0, model.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    lf.quantize_(model, lf.LowRank(ratio=0.5, multiple=8, keep="smaller"), calibration=ids, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert_reloads_and_exports(model, tmp_path)


def _first_layers(model, n: int):
    """Keep the first n blocks (config too, which the ONNX runner reads): the real model's shapes,
    weights and tokenizer at a fraction of the export time (~3 s a block here)."""
    model.model.layers = model.model.layers[:n]
    model.args.num_hidden_layers = model.config["num_hidden_layers"] = n
    return model


def test_real_smollm2_decoder_export(smollm2, tmp_path):
    """SmolLM2-135M (GQA 9/3 heads, tied 49k vocab) from its GGUF: two of its 30 blocks keep this fast;
    test_real_smollm2_full_export (slow) runs all of them."""
    import leanformer as lf
    from leanformer.export.decoder import export_decoder_onnx, load_onnx_decoder

    model, tok = lf.load(smollm2, keep_quantized=False)  # the float graph is exported
    model = _first_layers(model, 2)
    report = export_decoder_onnx(model, tmp_path, tok)
    assert max(report["max_abs_diff"].values()) < 1e-3
    runner, rtok = load_onnx_decoder(tmp_path)
    prompts = [rtok.encode("The capital of France is"), rtok.encode("Once upon a time, there")]
    assert runner.generate(prompts, 4) == lf.generate(model, tok, prompts, max_new_tokens=4)


@pytest.mark.slow
def test_real_smollm2_full_export(smollm2, tmp_path):
    import leanformer as lf
    from leanformer.export.decoder import export_decoder_onnx, load_onnx_decoder

    model, tok = lf.load(smollm2, keep_quantized=False)  # the float graph is exported
    report = export_decoder_onnx(model, tmp_path, tok)
    assert max(report["max_abs_diff"].values()) < 1e-3
    runner, rtok = load_onnx_decoder(tmp_path)
    ids = rtok.encode("The capital of France is")
    got = runner.generate([ids], 4)
    assert got == lf.generate(model, tok, [ids], max_new_tokens=4)
    assert "Paris" in rtok.decode(got[0])


def assert_reloads_and_exports(model, tmp_path) -> None:
    """`model` saves and reloads with the same greedy output; its ONNX export matches the logits within
    1e-4 and ONNX greedy decoding of a batch equals ours."""
    import leanformer as lf
    from leanformer.export.decoder import export_decoder_onnx, load_onnx_decoder

    lf.save(model, None, tmp_path / "pruned")
    again, _ = lf.load(tmp_path / "pruned")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    want = lf.generate(model, None, prompts, max_new_tokens=8, ignore_eos=True)
    assert lf.generate(again, None, prompts, max_new_tokens=8, ignore_eos=True) == want
    report = export_decoder_onnx(again, tmp_path / "onnx")
    assert max(report["max_abs_diff"].values()) < 1e-4
    runner, _ = load_onnx_decoder(tmp_path / "onnx")
    assert runner.generate(prompts, 8, stop_ids=()) == want


def test_pruned_decoder_saves_reloads_and_exports(tiny_dirs, tmp_path):
    """A structurally pruned model (smaller MLPs per layer, one layer dropped) is a model like any
    other: save, reload, ONNX export with parity, and ONNX greedy = ours."""
    import leanformer as lf

    model, _ = lf.load(tiny_dirs["llama"])
    ids = torch.randint(0, model.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    before = [m.mlp.down_proj.in_features for m in model.model.layers]
    lf.apply(model, [lf.PruneFFN(sparsity=0.5, multiple=8), lf.PruneLayers(n_layers=1)], calibration=ids)
    assert len(model.model.layers) == len(before) - 1
    assert all(m.mlp.down_proj.in_features < before[0] for m in model.model.layers)
    assert_reloads_and_exports(model, tmp_path)
