"""BERT-family encoders: forward parity with transformers, sentence-transformers pooling, loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanformer.encoders.build import build_encoder, load_encoder
from leanformer.encoders.embed import embed
from leanformer.errors import LeanformerError
from leanformer.models.bert import ARCHITECTURES, Model, ModelArgs, sanitize
from tests.encoders.helpers import ARCHS, SENTENCES, need_glue, need_minilm, tiny_encoder_dir, tiny_hf_encoder


def _batch(vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask [3, 12] with right padding of two rows."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 4:] = 0, 0
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_matches_transformers(tmp_path, arch):
    hf = tiny_hf_encoder(arch)
    hf.save_pretrained(str(tmp_path))
    ours = build_encoder(
        json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")
    )
    ids, mask = _batch(hf.config.vocab_size, hf.config.pad_token_id)
    with torch.no_grad():
        if "Sequence" in arch:
            want, got = hf(input_ids=ids, attention_mask=mask).logits, ours.logits(ids, mask)
            assert ours.args.id2label == {0: "neg", 1: "pos", 2: "neutral"}
        else:
            base = getattr(hf, hf.base_model_prefix) if "MaskedLM" in arch else hf
            want = base(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
            got = ours(ids, mask)[mask.bool()]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_onednn_fused_path_matches_plain(tmp_path, act):
    """The packed oneDNN path (activation / residual as post-ops) computes the same as F.linear."""
    d = tiny_encoder_dir(tmp_path, "BertModel", hidden_act=act)
    plain, _ = load_encoder(d, fast=False)
    assert not hasattr(plain.layers[0].ffn_in, "packed_weight")
    packed, _ = load_encoder(d, fast=True)  # forced: on AVX2 CPUs the default (None) leaves it off
    assert hasattr(packed.layers[0].ffn_in, "packed_weight")
    ids, mask = _batch(plain.args.vocab_size, 1)
    with torch.inference_mode():
        assert (plain(ids, mask) - packed(ids, mask)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("pooling", "normalize"), [(["mean"], True), (["cls"], False), (["max"], False), (["cls", "mean"], True)]
)
def test_sentence_transformers_folder(tmp_path, pooling, normalize):
    st = pytest.importorskip("sentence_transformers")
    d = tiny_encoder_dir(tmp_path, "BertModel", pooling=pooling, normalize=normalize, max_seq_length=8)
    ours, tok = load_encoder(d)
    assert ours.args.pooling == pooling and ours.args.normalize == normalize and ours.args.max_length == 8
    ref = st.SentenceTransformer(str(d), device="cpu").encode(SENTENCES, batch_size=3)
    with pytest.warns(UserWarning, match="truncated to the model's maximum of 8 tokens"):
        got = embed(ours, tok, SENTENCES, batch_size=3)
    assert got.shape == ref.shape == (len(SENTENCES), 64 * len(pooling))
    assert abs(got - ref).max() < 1e-4


def test_sanitize_is_idempotent_and_fuses_qkv():
    hf = tiny_hf_encoder("DistilBertForSequenceClassification")
    args = ModelArgs.from_hf_config(hf.config.to_dict() | {"architectures": [type(hf).__name__]})
    ours = sanitize(hf.state_dict(), args)
    assert "layers.0.qkv.weight" in ours and ours["layers.0.qkv.weight"].shape == (3 * 64, 64)
    assert set(sanitize(ours, args)) == set(ours)
    assert set(ours) == set(Model(args).state_dict())


def test_loading_errors(tmp_path):
    with pytest.raises(LeanformerError, match="unsupported encoder 'GPT2Model'.*BertModel"):
        ModelArgs.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2Model"]})
    d = tiny_encoder_dir(tmp_path, "BertModel")
    cfg, sd = json.loads((d / "config.json").read_text()), load_file(d / "model.safetensors")
    sd.pop("encoder.layer.1.output.dense.weight")
    with pytest.raises(LeanformerError, match="missing 1 tensors"):
        build_encoder(cfg, sd)
    sd = load_file(d / "model.safetensors")
    with pytest.raises(LeanformerError, match="has shape"):
        build_encoder(cfg | {"intermediate_size": 80}, sd)
    with pytest.raises(LeanformerError, match="no config.json"):
        load_encoder(tmp_path / "nowhere")
    assert "XLMRobertaForSequenceClassification" in ARCHITECTURES


def test_saved_state_dict_reloads(tmp_path):
    """Our own names go through sanitize unchanged, so a save of our model loads back (with pooling)."""
    d = tiny_encoder_dir(tmp_path / "src", "RobertaModel", pooling=["max"], normalize=True)
    m, _ = load_encoder(d)
    out = tmp_path / "saved"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(m.config))
    again, _ = load_encoder(out)
    assert again.args.pooling == ["max"] and again.args.normalize
    ids, mask = _batch(m.args.vocab_size, 1)
    with torch.inference_mode():
        assert torch.equal(m.embed(ids, mask), again.embed(ids, mask))


def test_real_minilm_matches_sentence_transformers():
    path = need_minilm()
    st = pytest.importorskip("sentence_transformers")
    from leanformer.encoders.quality import cosine_to_reference, read_tsv

    rows = read_tsv(need_glue("stsb"), 64)
    texts = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]
    import leanformer as lf

    model, tok = lf.load(path)  # the generic loader: the folder's pooling and Normalize must survive
    assert model.args.pooling == ["mean"] and model.args.normalize and model.args.max_length == 256
    ref = st.SentenceTransformer(str(path), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True
    )
    got = embed(model, tok, texts)
    assert abs(got - ref).max() < 1e-4
    assert cosine_to_reference(got, ref)["cosine_min"] > 0.99999


@pytest.mark.parametrize("fast", [False, True])
def test_fused_layer_norm_matches_torch_and_keeps_inputs(tmp_path, fast):
    """The C++ in-place LayerNorm path (kernels/layer_norm.cpp, residual fused on unpacked Linears) gives
    the same hidden states as torch's ops, and never writes into a tensor the caller passed in."""
    from leanformer import kernels

    if not kernels.available():
        pytest.skip("kernels unavailable on this machine")
    d = tiny_encoder_dir(tmp_path, "BertModel")
    model, _ = load_encoder(d, fast=fast)
    ids, mask = _batch(model.args.vocab_size, 1)
    with torch.inference_mode():
        x = model.embeddings(ids, None)
        before = x.clone()
        fused = model.layers[0](x, None)
        assert torch.equal(x, before)
        got = model(ids, mask)
    with torch.no_grad(), torch.enable_grad():  # a gradient-carrying input takes torch's ops
        xg = before.clone().requires_grad_()
        want = model.layers[0](xg, None).detach()
    assert (fused - want).abs().max().item() < 1e-5
    saved = kernels.ext()
    kernels.disable()  # torch's ops everywhere (attention included)
    try:
        with torch.inference_mode():
            ref = model(ids, mask)
    finally:
        kernels._ext = saved  # back on for the tests after this one
    assert (got - ref).abs().max().item() < 1e-5
