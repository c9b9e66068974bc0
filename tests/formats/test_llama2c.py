"""llama2.c reader against a numpy transcription of run.c (tests/formats/llama2c_reference.py)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from leanformer.errors import LeanformerError
from leanformer.formats.llama2c import Llama2cTokenizer, read_llama2c
from tests.formats.llama2c_reference import RunC, naive_encode

# run.c at temperature 0 from BOS (computed by llama2c_reference.RunC; the same text llama2.c prints)
GREEDY_IDS = [
    403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
    410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
    266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415,
]  # fmt: skip
GREEDY_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it, but it was too high."
)


@pytest.fixture(scope="module")
def stories(shared: Path) -> Path:
    return shared / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="module")
def read(stories):
    return read_llama2c(stories)


def hf_logits(config: dict, state: dict, ids: list[int]) -> np.ndarray:
    """Logits of transformers' (rotate_half RoPE) Llama built from our config and state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_reference_greedy_output(stories, read):
    ids, _ = RunC(stories).greedy(64)
    assert ids[1:61] == GREEDY_IDS
    assert read[2].decode(ids).startswith(GREEDY_TEXT)


def test_converted_weights_reproduce_runc(stories, read):
    config, state, _ = read
    ids, ref = RunC(stories).greedy(64)
    ours = hf_logits(config, state, ids[:64])
    assert np.abs(ours - ref).max() < 1e-4
    assert list(ours.argmax(-1)[:60]) == GREEDY_IDS


def test_config_and_names(read):
    config, state, tok = read
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 172, 5)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (8, 4, 512)
    assert config["max_position_embeddings"] == 512 and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert "lm_head.weight" not in state and len(state) == 2 + 5 * 9
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert isinstance(tok, Llama2cTokenizer) and tok.vocab_size == 512


def test_tokenizer_matches_runc_encode(shared, read):
    tok = read[2]
    story = (shared / "data" / "tinystories" / "sample.txt").read_text()
    texts = ["Once upon a time", "Hello world! 日本語 é", "a\nb  c", " leading", "x", story[:600]]
    rng = np.random.default_rng(0)
    texts += ["".join(rng.choice(list("ab cde\nLily."), size=40)) for _ in range(5)]
    for text in texts:
        assert tok.encode(text) == naive_encode(tok.pieces, tok.scores, text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == [1] and tok.encode("", add_bos=False) == []
    assert tok.encode("hi", add_special_tokens=False) == tok.encode("hi")[1:]
    assert tok.encode("hi", add_eos=True)[-1] == 2


def test_tokenizer_decode_details(read):
    tok = read[2]
    once = tok.encode("Once", add_bos=False)
    assert tok.decode(once) == " Once"  # run.c strips the dummy-prefix space only after BOS
    assert tok.decode([1, *once]) == "Once"
    assert tok.decode([1, *once], skip_special_tokens=False) == "\n<s>\nOnce"
    assert tok.decode(torch.tensor([[1, *once, 2]])) == "Once"
    assert tok.decode([0x0A + 3]) == "\n"  # a byte token
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.chat_template) == (1, 2, None, None)


def test_tokenizer_found_beside_checkpoint_and_folder_path(stories, tmp_path):
    shutil.copy(stories, tmp_path / "model.bin")
    assert read_llama2c(tmp_path / "model.bin")[2] is None
    shutil.copy(stories.parent / "tok512.bin", tmp_path / "tokenizer.bin")
    config, _, tok = read_llama2c(tmp_path)
    assert config["vocab_size"] == 512 and tok.vocab_size == 512
    explicit = read_llama2c(tmp_path / "model.bin", tokenizer_path=stories.parent / "tok512.bin")[2]
    assert explicit.pieces == tok.pieces


def write_random_llama2c(path: Path, dim=32, hidden=48, layers=2, heads=4, kv_heads=2, vocab=40, seq=16):
    """A random legacy llama2.c checkpoint with an unshared classifier (negative vocab in the header)."""
    rng = np.random.default_rng(1)
    head = dim // heads
    kv = kv_heads * head
    sizes = [vocab * dim, layers * dim, layers * dim * dim, layers * kv * dim, layers * kv * dim]
    sizes += [layers * dim * dim, layers * dim, 3 * layers * dim * hidden, dim, seq * head, vocab * dim]
    weights = [rng.normal(0, 0.3, n).astype("<f4") for n in sizes]
    weights[1] += 1
    weights[6] += 1
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab, seq)
    path.write_bytes(header + b"".join(w.tobytes() for w in weights))


def test_unshared_classifier_and_gqa_match_runc(tmp_path):
    path = tmp_path / "random.bin"
    write_random_llama2c(path)
    config, state, tok = read_llama2c(path)
    assert tok is None and config["tie_word_embeddings"] is False and "lm_head.weight" in state
    ref = RunC(path)
    ids = [1, 5, 9, 3, 30, 7, 7, 2, 11, 12, 13, 14]
    ref_logits = np.stack([ref.forward(t, pos) for pos, t in enumerate(ids)])
    assert np.abs(hf_logits(config, state, ids) - ref_logits).max() < 1e-4


def test_truncated_and_bad_files(stories, tmp_path):
    blob = stories.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(blob[:-4])
    with pytest.raises(LeanformerError, match=rf"expected {len(blob)} bytes .* got {len(blob) - 4}") as e:
        read_llama2c(bad)
    assert "\n" not in str(e.value)
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 3, 512, 512) + blob[28:])  # 8 heads, 3 kv heads
    with pytest.raises(LeanformerError, match="not a llama2.c checkpoint"):
        read_llama2c(bad)
    bad.write_bytes(b"12")
    with pytest.raises(LeanformerError, match="too short"):
        read_llama2c(bad)
    bad.write_bytes(struct.pack("<I", 0x616B3432) + bytes(300))
    with pytest.raises(LeanformerError, match="versioned export"):
        read_llama2c(bad)
    with pytest.raises(LeanformerError, match="cannot read"):
        read_llama2c(tmp_path / "absent.bin")


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tok.bin"
    bad.write_bytes(struct.pack("<ifi", 5, 0.0, 100) + b"abc")
    with pytest.raises(LeanformerError, match="runs past the end"):
        Llama2cTokenizer(bad)
    bad.write_bytes(struct.pack("<ifi", 5, 0.0, 1) + b"a")
    assert Llama2cTokenizer(bad).pieces == [b"a"]
    with pytest.raises(LeanformerError, match="has 1 tokens, the model expects 2"):
        Llama2cTokenizer(bad, vocab_size=2)
